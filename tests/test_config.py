"""Config files and overrides: every shipped config validates; bad keys and types are named."""

import glob
import os

import pytest

from munet_jax.config import apply_overrides, base_config, load_config_file, validate
from munet_jax.errors import UserError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
SHIPPED = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))


def test_the_required_configs_ship():
  names = {os.path.basename(p) for p in SHIPPED}
  assert {"lits.py", "ircadb.py", "unet_baseline.py"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_shipped_config_validates_and_has_the_spec_keys(path):
  c = load_config_file(path)
  assert isinstance(c.seed, int)
  assert isinstance(c.data.root, str) and c.data.root
  assert c.train.steps >= 1 and c.train.batch_size >= 1 and c.checkpoint.every_steps >= 1
  assert c.model.num_classes == 3   # background, liver, tumour


def test_lits_config_is_the_papers_recipe():
  c = load_config_file(os.path.join(CONFIG_DIR, "lits.py"))
  assert tuple(c.model.features) == (64, 128, 256, 512, 1024)
  assert c.data.image_size == 512 and c.train.batch_size == 15
  assert c.train.learning_rate == 1e-4 and c.train.lr_decay_rate == 0.9
  assert c.train.lr_decay_steps == 5000 and c.train.weight_decay == 0.003
  assert c.model.dropout_rate == 0.2 and c.model.bn_momentum == 0.9
  assert c.train.loss == "mse" and tuple(c.data.hu_window) == (-250.0, 250.0)
  assert c.model.odu_residual and c.model.skip_conv


def test_baseline_config_turns_both_mu_net_changes_off():
  c = load_config_file(os.path.join(CONFIG_DIR, "unet_baseline.py"))
  assert not c.model.odu_residual and not c.model.skip_conv
  lits = load_config_file(os.path.join(CONFIG_DIR, "lits.py")).to_dict()
  baseline = c.to_dict()
  for key in ("odu_residual", "skip_conv"):
    del lits["model"][key], baseline["model"][key]
  assert baseline == lits   # the same recipe otherwise


def test_override_parses_by_the_fields_type():
  c = apply_overrides(base_config(), ["train.steps=7", "train.learning_rate=1e-3",
                                      "model.features=(8,16)", "model.skip_conv=False",
                                      "data.root=/tmp/x", "data.cache_dir=/tmp/c"])
  assert c.train.steps == 7 and c.train.learning_rate == 1e-3
  assert tuple(c.model.features) == (8, 16) and c.model.skip_conv is False
  assert c.data.root == "/tmp/x" and c.data.cache_dir == "/tmp/c"


def test_integer_override_of_a_float_field_is_accepted():
  assert apply_overrides(base_config(), ["train.learning_rate=1"]).train.learning_rate == 1.0


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"),
    ("nothing.at.all=1", "nothing.at.all"),
    ("train.steps=ten", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("model.odu_residual=3", "model.odu_residual"),
    ("train.loss=hinge", "train.loss"),
    ("model.dtype=float16", "model.dtype"),
    ("train.batch_size=0", "train.batch_size"),
    ("data.hu_window=(250,-250)", "data.hu_window"),
    ("data.hu_window=('a','b')", "data.hu_window"),
    ("data.hu_window=(-250,)", "data.hu_window"),
    ("data.scaled_range=(True,2)", "data.scaled_range"),
    ("data.hu_window=(-inf,250)", "data.hu_window"),
    ("train.learning_rate=1e400", "train.learning_rate"),
    ("train.lr_decay_rate=-0.9", "train.lr_decay_rate"),
    ("train.weight_decay=-0.003", "train.weight_decay"),
    ("data.prefetch=-1", "data.prefetch"),
    ("eval.small_lesion_mm=-3", "eval.small_lesion_mm"),
    ("eval.nsd_tolerance_mm=-0.5", "eval.nsd_tolerance_mm"),
    ("data.foreground_tumour_share=1.5", "data.foreground_tumour_share"),
    ("data.synthetic.low_contrast_rate=-0.1", "data.synthetic.low_contrast_rate"),
    ("model=3", "model"),
    ("data.reference_hu=nan", "data.reference_hu"),
    ("data.reference_hu=hundred", "data.reference_hu"),
    ("data.reference_window=(250,-30)", "data.reference_window"),
    ("data.reference_window=(0.2,0.8)", "data.reference_window"),
    ("data.reference_percentile=101", "data.reference_percentile"),
])
def test_bad_override_is_a_user_error_naming_the_key(override, key):
  with pytest.raises(UserError, match=f"'{key}'"):
    apply_overrides(base_config(), [override])


def test_a_later_override_of_a_key_is_read_by_the_schemas_type():
  # The first (bad) value must not decide how the second is parsed.
  c = apply_overrides(base_config(), ["train.steps=abc", "train.steps=7"])
  assert c.train.steps == 7


def test_unknown_key_in_a_config_file_is_named(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("import ml_collections\nfrom munet_jax.config import base_config\n"
                  "def get_config():\n  c = base_config()\n  c.train = ml_collections.ConfigDict"
                  "(dict(c.train.to_dict(), warmup=3))\n  return c\n")
  with pytest.raises(UserError, match="'train.warmup'"):
    load_config_file(str(path))


def test_wrong_type_in_a_config_file_is_named(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("from munet_jax.config import base_config\nimport ml_collections\n"
                  "def get_config():\n  c = ml_collections.ConfigDict(base_config().to_dict(),"
                  " type_safe=False)\n"
                  "  c.train.batch_size = 'fifteen'\n  return c\n")
  with pytest.raises(UserError, match="'train.batch_size'"):
    load_config_file(str(path))


def test_type_error_inside_a_config_file_names_the_field(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("from munet_jax.config import base_config\n"
                  "def get_config():\n  c = base_config()\n  c.train.batch_size = 'x'\n  return c\n")
  with pytest.raises(UserError, match="bad.py.*'batch_size'"):
    load_config_file(str(path))


def test_missing_config_file_is_named(tmp_path):
  with pytest.raises(UserError, match="nope.py"):
    load_config_file(str(tmp_path / "nope.py"))


def test_config_file_without_get_config_is_named(tmp_path):
  path = tmp_path / "empty.py"
  path.write_text("x = 1\n")
  with pytest.raises(UserError, match="empty.py"):
    load_config_file(str(path))


def test_base_config_is_valid():
  validate(base_config())


def test_the_old_tumor_spellings_are_read_as_the_new_keys(tmp_path):
  from munet_jax.config import config_from_dict
  c = apply_overrides(base_config(), ["data.tumor_oversample=0.3",
                                      "data.sampling=tumor_oversample",
                                      "eval.tumor_inside_liver=True"])
  assert c.data.tumour_oversample == 0.3 and c.data.sampling == "tumour_oversample"
  assert c.eval.tumour_inside_liver is True
  saved = base_config().to_dict()   # a checkpoint's config written before the rename
  saved["data"]["tumor_oversample"] = saved["data"].pop("tumour_oversample")
  saved["data"]["sampling"] = "tumor_oversample"
  restored = config_from_dict(saved)
  assert restored.data.sampling == "tumour_oversample"
  path = tmp_path / "old.py"
  path.write_text("from munet_jax.config import base_config\n\ndef get_config():\n"
                  "  c = base_config()\n  c.data.tumor_oversample = 0.2\n  return c\n")
  assert load_config_file(str(path)).data.tumour_oversample == 0.2


def test_the_reference_hu_is_off_by_default_and_set_from_the_command_line():
  assert base_config().data.reference_hu is None
  c = apply_overrides(base_config(), ["data.reference_hu=100"])
  assert c.data.reference_hu == 100.0
  assert apply_overrides(c, ["data.reference_hu=None"]).data.reference_hu is None
