"""munet_jax.data.splits: patient splits, deterministic and disjoint."""

import pytest

from munet_jax.config import base_config
from munet_jax.data.discovery import Case
from munet_jax.data.splits import split_cases
from munet_jax.errors import UserError


def _cases(n, prefix="volume-"):
  return [Case(f"{prefix}{i}", f"/d/{prefix}{i}.nii.gz", f"/d/seg-{i}.nii.gz") for i in range(n)]


def _config(**data):
  c = base_config()
  for k, v in data.items():
    if k == "seed":
      c.seed = v
    else:
      c.data[k] = v
  return c


def _names(split):
  return {k: [c.name for c in v] for k, v in split.items()}


def _assert_disjoint(split):
  names = [c.name for v in split.values() for c in v]
  assert len(names) == len(set(names))


def test_lits_preset_takes_40_5_35_of_131_cases():
  split = split_cases(_cases(131), _config(split="lits"))
  assert [len(split[k]) for k in ("train", "val", "test")] == [40, 5, 35]
  _assert_disjoint(split)


@pytest.mark.parametrize("preset, n, want", [
    ("lits", 12, [6, 1, 5]), ("lits", 80, [40, 5, 35]), ("lits", 3, [1, 1, 1]),
    ("lits", 1, [1, 0, 0]), ("ircadb", 20, [15, 0, 5]), ("ircadb", 12, [9, 0, 3]),
    ("ircadb", 2, [1, 0, 1]),
])
def test_presets_scale_down_to_the_cases_available(preset, n, want):
  split = split_cases(_cases(n), _config(split=preset))
  assert [len(split[k]) for k in ("train", "val", "test")] == want
  _assert_disjoint(split)


def test_preset_split_does_not_depend_on_the_training_seed():
  cases = _cases(30)
  assert _names(split_cases(cases, _config(split="lits", seed=0))) == \
      _names(split_cases(cases, _config(split="lits", seed=7)))


def test_preset_split_does_not_depend_on_input_order():
  cases = _cases(30)
  assert _names(split_cases(cases, _config(split="lits"))) == \
      _names(split_cases(cases[::-1], _config(split="lits")))


def test_custom_counts_are_deterministic_from_the_seed():
  cases = _cases(20)
  config = _config(split="custom", num_train=10, num_val=3, num_test=5, seed=3)
  first, again = split_cases(cases, config), split_cases(cases, config)
  assert _names(first) == _names(again)
  assert [len(first[k]) for k in ("train", "val", "test")] == [10, 3, 5]
  _assert_disjoint(first)
  other = split_cases(cases, _config(split="custom", num_train=10, num_val=3, num_test=5,
                                     seed=4))
  assert _names(other) != _names(first)


def test_custom_names_are_taken_as_given():
  split = split_cases(_cases(5), _config(split="custom", train_cases=("volume-3", "volume-0"),
                                         test_cases=("volume-4",)))
  assert _names(split) == {"train": ["volume-3", "volume-0"], "val": [],
                           "test": ["volume-4"]}


@pytest.mark.parametrize("data, needle", [
    (dict(train_cases=("volume-1", "volume-99")), "data.train_cases.*volume-99"),
    (dict(train_cases=("volume-1",), test_cases=("volume-1",)), "already in"),
    (dict(num_train=20, num_val=1, num_test=1), "ask for 22 cases"),
    (dict(num_train=-1), "data.num_train"),
])
def test_bad_custom_splits_name_the_key(data, needle):
  with pytest.raises(UserError, match=needle):
    split_cases(_cases(5), _config(split="custom", **data))


def test_no_cases_is_an_error():
  with pytest.raises(UserError, match="no cases"):
    split_cases([], _config())
