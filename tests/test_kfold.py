"""data.split = 'kfold': patients dealt into folds, deterministically, test cases held out."""

import pytest

from munet_jax.config import base_config, validate
from munet_jax.data.discovery import Case
from munet_jax.data.splits import split_cases
from munet_jax.errors import UserError

CASES = [Case(f"volume-{i}", f"volume-{i}.nii.gz", f"segmentation-{i}.nii.gz") for i in range(11)]


def _config(fold=0, folds=3, test=("volume-10",), seed=0):
  c = base_config()
  c.seed = seed
  c.data.split, c.data.folds, c.data.fold, c.data.test_cases = "kfold", folds, fold, test
  return validate(c)


def _names(cases):
  return [c.name for c in cases]


def test_the_validation_folds_partition_the_non_test_cases():
  splits = [split_cases(CASES, _config(fold)) for fold in range(3)]
  vals = [set(_names(s["val"])) for s in splits]
  assert set().union(*vals) == {c.name for c in CASES[:10]}
  assert sum(len(v) for v in vals) == 10 and sorted(len(v) for v in vals) == [3, 3, 4]
  for s in splits:
    assert _names(s["test"]) == ["volume-10"]
    assert set(_names(s["train"])) == {c.name for c in CASES[:10]} - set(_names(s["val"]))


def test_folds_do_not_depend_on_the_seed_or_the_order_of_the_cases():
  a = split_cases(CASES, _config(1, seed=0))
  b = split_cases(list(reversed(CASES)), _config(1, seed=7))
  assert a == b


@pytest.mark.parametrize("change, message", [
    (lambda c: c.data.update(folds=12), "config key 'data.folds' is 12 but only 10 cases"),
    (lambda c: c.data.update(train_cases=("volume-1",)), "'data.train_cases' is not used"),
    (lambda c: c.data.update(test_cases=("volume-99",)), "'data.test_cases' names cases not"),
])
def test_bad_kfold_settings_name_the_key(change, message):
  c = _config()
  change(c)
  with pytest.raises(UserError, match=message):
    split_cases(CASES, c)


@pytest.mark.parametrize("fold, folds, key", [(3, 3, "data.fold"), (-1, 3, "data.fold"),
                                              (0, 1, "data.folds")])
def test_fold_and_folds_are_checked_by_the_schema(fold, folds, key):
  c = base_config()
  c.data.split, c.data.fold, c.data.folds = "kfold", fold, folds
  with pytest.raises(UserError, match=f"config key '{key}'"):
    validate(c)
