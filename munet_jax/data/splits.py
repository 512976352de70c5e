"""Train / validation / test splits by patient (never by slice), from `data.split`.

Presets (section III.A of the paper):
  'lits'    40 train / 5 val / 35 test, the paper's LiTS split.
  'ircadb'  15 train / 0 val / 5 test. The paper trains on 15 patients and tests on 5 and
            names no validation set; we keep those 15 for training rather than carve a
            validation set out of them, so the recipe is the paper's. Training with this
            preset runs without validation; use 'custom' to hold out patients for it.
  'custom'  `data.train_cases` / `val_cases` / `test_cases` (case names) when any is given,
            else `data.num_train` / `num_val` / `num_test` cases drawn with `config.seed`.
  'kfold'   cross-validation: `data.test_cases` (names, may be empty) are the test set of
            every fold; the other cases are dealt into `data.folds` folds (sizes differ by
            at most one) and fold `data.fold` is the validation set, the rest train. The
            runs of folds 0 .. folds-1 together validate on every non-test case once.

Which cases a preset takes is fixed by a hash of the case names, independent of
`config.seed`: changing the training seed must not move patients into the test set.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

from munet_jax.data.discovery import Case, find_cases, natural_key
from munet_jax.errors import UserError

PRESETS = {"lits": (40, 5, 35), "ircadb": (15, 0, 5)}
SPLITS = ("train", "val", "test")
_PRESET_KEY = "munet-preset"  # the fixed shuffle of the presets
_KFOLD_KEY = "munet-kfold"    # the fixed shuffle of the folds (independent of config.seed)


def split_cases(cases: Sequence[Case], config) -> dict[str, list[Case]]:
  """Splits cases (patients) into 'train', 'val' and 'test'.

  Args:
    cases: from `discovery.find_cases`, names unique.
    config: the experiment config; reads `seed` and `data.split`, `data.train_cases`,
      `data.val_cases`, `data.test_cases`, `data.num_train`, `data.num_val`,
      `data.num_test`, `data.folds`, `data.fold`.

  Returns:
    {'train': [...], 'val': [...], 'test': [...]}, disjoint, each in natural name order
    (explicit lists keep the order given). The same cases and config give the same split.

  A preset that asks for more cases than there are (a small synthetic set, say)
  is scaled down in proportion: counts are n * preset / sum(preset), rounded down, the
  cases left over going one each to the splits with the largest remainders (ties: train,
  val, test), and every split the preset asks for gets at least one case when there
  are at least as many cases as such splits. 12 cases under 'lits' give 6 / 1 / 5, under
  'ircadb' 9 / 0 / 3. With more cases than the preset uses (131 LiTS volumes), the
  extra cases are left out, as in the paper.

  Raises:
    UserError naming the key: unknown or repeated case names, counts that are negative
    or larger than the cases available, or no cases at all.
  """
  data = config.data
  if not cases:
    raise UserError(f"data.root '{data.root}': no cases to split")
  if data.split in PRESETS:
    counts = _scaled_counts(PRESETS[data.split], len(cases))
    ordered = _shuffled(cases, _PRESET_KEY)
    return _take(ordered, counts)
  if data.split == "kfold":
    return _kfold(cases, data)
  if data.split != "custom":
    raise UserError(f"config key 'data.split' must be one of {(*PRESETS, 'custom', 'kfold')}, "
                    f"got {data.split!r}")
  if data.train_cases or data.val_cases or data.test_cases:
    return _named(cases, {s: tuple(data[f"{s}_cases"]) for s in SPLITS})
  counts = [data.num_train, data.num_val, data.num_test]
  for split, n in zip(SPLITS, counts):
    if n < 0:
      raise UserError(f"config key 'data.num_{split}' must be >= 0, got {n}")
  if sum(counts) > len(cases):
    raise UserError(f"config keys 'data.num_train/num_val/num_test' ask for {sum(counts)} "
                    f"cases ({counts[0]}/{counts[1]}/{counts[2]}) but data.root "
                    f"'{data.root}' has only {len(cases)}")
  return _take(_shuffled(cases, f"seed-{config.seed}"), counts)


def _kfold(cases: Sequence[Case], data) -> dict[str, list[Case]]:
  for key in ("train_cases", "val_cases"):
    if data[key]:
      raise UserError(f"config key 'data.{key}' is not used with data.split='kfold' (the "
                      "folds decide train and validation; only data.test_cases is read)")
  test = _named(cases, {"train": (), "val": (), "test": tuple(data.test_cases)})["test"]
  held = {c.name for c in test}
  rest = _shuffled([c for c in cases if c.name not in held], _KFOLD_KEY)
  if len(rest) < data.folds:
    raise UserError(f"config key 'data.folds' is {data.folds} but only {len(rest)} cases are "
                    "left for the folds (after data.test_cases)")
  val = rest[data.fold::data.folds]
  train = [c for i, c in enumerate(rest) if i % data.folds != data.fold]
  order = lambda group: sorted(group, key=lambda c: natural_key(c.name))
  return {"train": order(train), "val": order(val), "test": list(test)}


def _scaled_counts(counts: Sequence[int], n: int) -> list[int]:
  total = sum(counts)
  if n >= total:
    return list(counts)
  exact = [c * n / total for c in counts]
  out = [math.floor(e) for e in exact]
  by_remainder = sorted(range(len(counts)), key=lambda i: (out[i] - exact[i], i))
  for i in by_remainder[:n - sum(out)]:
    out[i] += 1
  wanted = [i for i, c in enumerate(counts) if c > 0]
  if n >= len(wanted):
    for i in wanted:
      if out[i] == 0:  # take one from the largest split
        out[max(range(len(out)), key=lambda j: (out[j], -j))] -= 1
        out[i] += 1
  return out


def _shuffled(cases: Sequence[Case], key: str) -> list[Case]:
  """A fixed pseudo-random order: by hash of (key, name), the same on every platform."""
  def rank(case: Case) -> str:
    return hashlib.sha256(f"{key}/{case.name}".encode()).hexdigest()
  return sorted(cases, key=rank)


def _take(ordered: list[Case], counts: Sequence[int]) -> dict[str, list[Case]]:
  out, start = {}, 0
  for split, n in zip(SPLITS, counts):
    out[split] = sorted(ordered[start:start + n], key=lambda c: natural_key(c.name))
    start += n
  return out


def _named(cases: Sequence[Case], names: dict[str, tuple]) -> dict[str, list[Case]]:
  by_name = {c.name: c for c in cases}
  seen: dict[str, str] = {}
  out = {}
  for split in SPLITS:
    key = f"data.{split}_cases"
    unknown = [n for n in names[split] if n not in by_name]
    if unknown:
      some = ", ".join(sorted(by_name, key=natural_key)[:3])
      raise UserError(f"config key '{key}' names cases not in the data: "
                      f"{', '.join(map(str, unknown))} (cases are named like {some})")
    for n in names[split]:
      if n in seen:
        raise UserError(f"config key '{key}': case '{n}' is already in {seen[n]}")
      seen[n] = key
    out[split] = [by_name[n] for n in names[split]]
  return out


def cases_of_split(config, split: str, root: str | None = None) -> list[Case]:
  """The cases of one split of `config` under `root` (`config.data.root` when None).

  `split` is 'train', 'val' or 'test' by `config.data.split`, or 'all' for every case.
  An empty choice is a UserError naming the folder and the split.
  """
  root = config.data.root if root is None else root
  cases = find_cases(root)
  chosen = cases if split == "all" else split_cases(cases, config)[split]
  if not chosen:
    raise UserError(f"{root}: the '{split}' split of this run's config "
                    f"(data.split='{config.data.split}') has no case")
  return chosen
