"""The experiment configuration: one schema, validated once, at the edge.

Every config file in `configs/` starts from `base_config()` (the paper's recipe, Table I
and section II.E) and changes values. The returned ConfigDict is locked, so a misspelt
key fails where it is written, and `validate` checks the whole tree against the schema
before anything runs: an unknown key or a value of the wrong type is a `UserError`
naming the key.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

from munet_jax.errors import UserError

LOSSES = ("mse", "dice", "ce_dice")
SAMPLING = ("all", "liver", "tumour_oversample")
DTYPES = ("float32", "bfloat16")
SPLIT_PRESETS = ("lits", "ircadb", "custom", "kfold")
TRAIN_CROPS = ("centre", "foreground")


def base_config() -> ml_collections.ConfigDict:
  """The schema and the paper's defaults (LiTS, Table I widths, 512x512)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.num_classes = 3                                  # background, liver, tumour
  c.model.features = (64, 128, 256, 512, 1024)             # Table I, one per stage
  c.model.dropout_rate = 0.2                               # keep probability 0.8
  c.model.bn_momentum = 0.9                                # moving-average decay 0.9
  c.model.odu_residual = True                              # mU-Net change 1+2: r = x - u
  c.model.skip_conv = True                                 # mU-Net change 3: conv in skip
  c.model.residual_learning = True                         # residual around encoder stages
  c.model.dtype = "float32"                                # compute dtype; params float32
  c.model.init_std = 0.05                                  # truncated normal, section II.E
  c.model.bias_init = 0.1
  c.model.remat = False                                    # recompute encoder stages in backward

  c.data = ml_collections.ConfigDict()
  c.data.root = "data/lits"
  c.data.cache_dir = config_dict.placeholder(str)          # slice store; default root/.munet_cache
  c.data.image_size = 512                                  # slices centre-padded/cropped to this
  c.data.train_crop = "centre"                             # or "foreground": crops around labels
  c.data.foreground_tumour_share = 1.0                     # tumour slices: share of crops on tumour
  c.data.hu_window = (-250.0, 250.0)                       # clip, section II.E
  c.data.scaled_range = (-1.0, 1.0)                        # the window maps onto this range
  # Per-volume HU shift (None: none, as in the paper): each volume is shifted by a whole
  # number of HU so that the reference_percentile of its voxels within reference_window
  # lands at reference_hu (`munet_jax.preprocessing.intensity_shift`).
  c.data.reference_hu = config_dict.placeholder(float)
  c.data.reference_window = (-30.0, 250.0)                 # soft tissue, HU
  c.data.reference_percentile = 75.0
  c.data.split = "lits"                                    # preset: 40 train / 5 val / 35 test
  c.data.train_cases = ()                                  # explicit case names (split=custom)
  c.data.val_cases = ()
  c.data.test_cases = ()
  c.data.num_train = 40                                    # counts (split=custom, no lists)
  c.data.num_val = 5
  c.data.num_test = 35
  c.data.folds = 5                                         # split=kfold: folds of the non-test cases
  c.data.fold = 0                                          # split=kfold: the validation fold
  c.data.sampling = "all"                                  # all slices, as in the paper
  c.data.tumour_oversample = 0.0                            # extra share of tumour slices
  c.data.num_workers = 2
  c.data.prefetch = 4
  c.data.skip_bad = False
  c.data.synthetic = ml_collections.ConfigDict()           # made at data.root when it has no cases
  c.data.synthetic.cases = 0                               # 0: never generate
  c.data.synthetic.size = 64
  c.data.synthetic.slices = 24
  c.data.synthetic.crop = 0                                # >0: keep a liver-region window
  c.data.synthetic.tumour_rate = 2.5                       # lesions per case: 1 + Poisson(rate)
  c.data.synthetic.voxel_noise = False                     # noise scaled with the voxel volume
  c.data.synthetic.low_contrast_rate = 0.2                 # share of faint-tumour, noisier cases
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.enabled = False                           # off, as in the paper
  c.data.augment.flip = True
  c.data.augment.rotate_degrees = 10.0
  c.data.augment.scale = 0.1
  c.data.augment.intensity = 0.05

  c.train = ml_collections.ConfigDict()
  c.train.steps = 150_000                                  # 100 epochs of 1,500 steps; the paper gives no total
  c.train.batch_size = 15
  c.train.learning_rate = 1e-4
  c.train.lr_decay_rate = 0.9
  c.train.lr_decay_steps = 5_000                           # staircase
  c.train.weight_decay = 0.003                             # L2
  c.train.decoupled_weight_decay = False                   # AdamW-style instead of L2
  c.train.loss = "mse"                                     # on softmax probabilities
  c.train.ema_decay = 0.0                                  # >0: evaluate a moving average of the weights
  c.train.ema_stats_steps = 50                             # steps before a checkpoint that fit its batch norm
  c.train.log_every_steps = 50
  c.train.eval_every_steps = 5_000
  c.train.final_eval_split = "test"                        # evaluated when training ends; "" for none

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1_000
  c.checkpoint.keep = 3

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 16
  c.eval.largest_liver_component = False                   # post-processing, off as in paper
  c.eval.tumour_inside_liver = False
  c.eval.min_tumour_voxels = 0                             # tumour components below this -> liver
  c.eval.min_tumour_liver_share = 0.0                      # tumour bordering liver less -> background
  c.eval.tta = False                                       # mean softmax over in-plane mirrorings
  c.eval.choose_postprocessing = False                     # learn the four above on the val split
  c.eval.small_lesion_mm = 28.0                            # 28 x 28 mm^2 small-object bound
  c.eval.nsd_tolerance_mm = 2.0                            # NSD tolerance: ~2 in-plane voxels
  return c


# Keys and values spelt "tumor" before the code settled on "tumour": configs, saved
# checkpoints and command lines that use the old spelling are read as the new one.
RENAMED_KEYS = {"data.tumor_oversample": "data.tumour_oversample",
                "eval.tumor_inside_liver": "eval.tumour_inside_liver"}
RENAMED_VALUES = {"data.sampling": {"tumor_oversample": "tumour_oversample"}}


def _upgrade(values: dict) -> dict:
  """A nested config dict with the old spellings of `RENAMED_KEYS` / `RENAMED_VALUES` replaced."""
  values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
  for old, new in RENAMED_KEYS.items():
    (section, old_leaf), (_, new_leaf) = old.split("."), new.split(".")
    node = values.get(section)
    if isinstance(node, dict) and old_leaf in node:
      value = node.pop(old_leaf)
      node[new_leaf] = value   # set under its old name: that is the value meant
  for dotted, renamed in RENAMED_VALUES.items():
    section, leaf = dotted.split(".")
    node = values.get(section)
    if isinstance(node, dict) and isinstance(node.get(leaf), str):
      node[leaf] = renamed.get(node[leaf], node[leaf])
  return values


def _flatten(c: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key in c.keys():
    value = c[key]
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _field_type(c: ml_collections.ConfigDict, dotted: str):
  *parents, leaf = dotted.split(".")
  for p in parents:
    c = c[p]
  ref = c.get_ref(leaf)
  return ref.get_type()


def _schema_value(schema: ml_collections.ConfigDict, dotted: str) -> Any:
  *parents, leaf = dotted.split(".")
  for p in parents:
    schema = schema[p]
  return schema[leaf]


def _type_ok(value: Any, expected: type) -> bool:
  if value is None:
    return True
  if expected is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if expected is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if expected in (tuple, list):
    return isinstance(value, (tuple, list))
  return isinstance(value, expected)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks `config` against the schema; raises `UserError` naming the bad key."""
  schema = base_config()
  got = _flatten(config)
  want = _flatten(schema)
  for key in got:
    if key not in want:
      raise UserError(f"config key '{key}' is unknown")
  for key in want:
    if key not in got:
      raise UserError(f"config key '{key}' is missing")
  for key, value in got.items():
    expected = _field_type(schema, key)
    if not _type_ok(value, expected):
      raise UserError(f"config key '{key}' must be {expected.__name__}, got {value!r}")
  _check_values(config)
  return config


def _check_values(c: ml_collections.ConfigDict) -> None:
  def need(ok: bool, key: str, what: str):
    if not ok:
      raise UserError(f"config key '{key}' {what}")

  need(c.model.num_classes >= 2, "model.num_classes", "must be at least 2")
  need(len(c.model.features) >= 1 and all(isinstance(f, int) and f > 0 for f in c.model.features),
       "model.features", "must be positive integers, one per stage")
  need(0.0 <= c.model.dropout_rate < 1.0, "model.dropout_rate", "must be in [0, 1)")
  need(0.0 <= c.model.bn_momentum < 1.0, "model.bn_momentum", "must be in [0, 1)")
  need(c.model.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}")
  need(c.model.init_std > 0, "model.init_std", "must be positive")
  need(c.data.image_size >= 1, "data.image_size", "must be >= 1")
  for key in ("hu_window", "scaled_range"):
    pair = c.data[key]
    need(len(pair) == 2 and all(_finite_number(v) for v in pair) and pair[0] < pair[1],
         f"data.{key}", f"must be two numbers (low, high) with low < high, got {pair!r}")
  need(c.data.reference_hu is None or _finite_number(c.data.reference_hu), "data.reference_hu",
       f"must be None or a finite number, got {c.data.reference_hu!r}")
  window = c.data.reference_window
  need(len(window) == 2 and all(_finite_number(v) for v in window)
       and math.ceil(window[0]) <= math.floor(window[1]), "data.reference_window",
       f"must be two numbers (low, high) holding at least one whole HU, got {window!r}")
  need(_finite_number(c.data.reference_percentile) and 0 <= c.data.reference_percentile <= 100,
       "data.reference_percentile", "must be in [0, 100]")
  need(c.data.split in SPLIT_PRESETS, "data.split", f"must be one of {SPLIT_PRESETS}")
  need(c.data.folds >= 2, "data.folds", "must be >= 2")
  need(0 <= c.data.fold < c.data.folds, "data.fold", f"must be in [0, data.folds={c.data.folds})")
  need(c.data.sampling in SAMPLING, "data.sampling", f"must be one of {SAMPLING}")
  need(0.0 <= c.data.tumour_oversample < 1.0, "data.tumour_oversample", "must be in [0, 1)")
  need(c.data.num_workers >= 0, "data.num_workers", "must be >= 0")
  need(c.data.prefetch >= 0, "data.prefetch", "must be >= 0")
  need(c.train.steps >= 0, "train.steps", "must be >= 0")
  need(c.train.batch_size >= 1, "train.batch_size", "must be >= 1")
  need(0 < c.train.learning_rate < math.inf, "train.learning_rate", "must be positive and finite")
  need(0 < c.train.lr_decay_rate <= 1, "train.lr_decay_rate", "must be in (0, 1]")
  need(0 <= c.train.weight_decay < math.inf, "train.weight_decay", "must be >= 0 and finite")
  need(c.train.lr_decay_steps >= 1, "train.lr_decay_steps", "must be >= 1")
  need(c.train.loss in LOSSES, "train.loss", f"must be one of {LOSSES}")
  need(0.0 <= c.train.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
  need(c.train.ema_stats_steps >= 1, "train.ema_stats_steps", "must be >= 1")
  need(c.train.log_every_steps >= 1, "train.log_every_steps", "must be >= 1")
  need(c.train.eval_every_steps >= 1, "train.eval_every_steps", "must be >= 1")
  need(c.train.final_eval_split in ("", "train", "val", "test"), "train.final_eval_split",
       "must be one of '', 'train', 'val', 'test'")
  need(c.data.synthetic.cases >= 0, "data.synthetic.cases", "must be >= 0")
  need(c.data.synthetic.crop == 0 or 16 <= c.data.synthetic.crop <= c.data.synthetic.size,
       "data.synthetic.crop", "must be 0 or between 16 and data.synthetic.size")
  need(0 <= c.data.synthetic.low_contrast_rate <= 1, "data.synthetic.low_contrast_rate",
       "must be in [0, 1]")
  need(0 < c.data.synthetic.tumour_rate < 100, "data.synthetic.tumour_rate",
       "must be in (0, 100)")
  need(c.data.train_crop in TRAIN_CROPS, "data.train_crop", f"must be one of {TRAIN_CROPS}")
  need(0.0 <= c.data.foreground_tumour_share <= 1.0, "data.foreground_tumour_share",
       "must be in [0, 1]")
  need(c.checkpoint.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
  need(c.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
  need(c.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
  need(c.eval.min_tumour_voxels >= 0, "eval.min_tumour_voxels", "must be >= 0")
  need(0 <= c.eval.min_tumour_liver_share <= 1, "eval.min_tumour_liver_share",
       "must be in [0, 1]")
  need(0 < c.eval.small_lesion_mm < math.inf, "eval.small_lesion_mm", "must be positive and finite")
  need(0 <= c.eval.nsd_tolerance_mm < math.inf, "eval.nsd_tolerance_mm",
       "must be non-negative and finite")


def _finite_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Executes a config file and returns its validated, locked `get_config()`."""
  if not os.path.isfile(path):
    raise UserError(f"{path}: config file not found")
  spec = importlib.util.spec_from_file_location("_munet_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    config = module.get_config()
  except UserError:
    raise
  except AttributeError as e:
    raise UserError(f"{path}: {e}") from e
  except Exception as e:  # a broken config file is the user's to fix
    raise UserError(f"{path}: cannot load config: {type(e).__name__}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"{path}: get_config() must return an ml_collections.ConfigDict "
                    f"(start from munet_jax.config.base_config()), got {type(config).__name__}")
  return config_from_dict(config.to_dict())


def _parse_value(text: str, current: Any) -> Any:
  if isinstance(current, str) or (current is None and not _looks_literal(text)):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # left to the type check, which names the key
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  if isinstance(current, tuple) and not isinstance(value, tuple):
    value = (value,)
  return value


def _looks_literal(text: str) -> bool:
  try:
    ast.literal_eval(text)
    return True
  except (ValueError, SyntaxError):
    return False


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies `a.b=value` overrides (from `--config.a.b=value`) and re-validates."""
  config = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
  schema = base_config()
  for item in overrides:
    if "=" not in item:
      raise UserError(f"config override '{item}' must be KEY=VALUE")
    dotted, text = item.split("=", 1)
    dotted = RENAMED_KEYS.get(dotted, dotted)
    text = RENAMED_VALUES.get(dotted, {}).get(text, text)
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        raise UserError(f"config key '{dotted}' is unknown")
      node = node[p]
    if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
      raise UserError(f"config key '{dotted}' is unknown")
    # Parsed against the schema's value, so that an earlier (bad) override of the same
    # key does not decide how this one is read.
    current = _schema_value(schema, dotted)
    if current is None:
      expected = _field_type(schema, dotted)
      current = "" if expected is str else None
    node[leaf] = _parse_value(text, current)
  config = validate(config)
  config.lock()
  return config


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
  """Rebuilds a validated config from `to_dict()` output (JSON turns tuples into lists)."""
  config = ml_collections.ConfigDict(base_config().to_dict(), type_safe=False)

  def assign(node, tree, prefix):
    for key, value in tree.items():
      if key not in node:
        raise UserError(f"config key '{prefix}{key}' is unknown")
      if isinstance(value, dict):
        assign(node[key], value, f"{prefix}{key}.")
      else:
        node[key] = tuple(value) if isinstance(value, list) else value

  assign(config, _upgrade(values), "")
  config = validate(config)
  config.lock()
  return config
