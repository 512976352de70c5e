"""Permeation rate (Eq. 7): hand-made feature maps with known answers, then tiny models."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from munet_jax import diagnostics
from munet_jax.diagnostics import (SENTINEL, channel_mean_map, downsample_mask, masked_sums,
                                   normalise_maps, permeation_rate, rate_from_sums)
from munet_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def permeation_from_features(before, after, mask, pooling="area"):
  """Steps 1-4 of the definition at one stage, composed: (N,) rates per image."""
  small = downsample_mask(mask, before.shape[1:3], pooling)
  return rate_from_sums(*masked_sums(channel_mean_map(before), channel_mean_map(after), small))


def _maps(*channels):
  """(1, h, w, C) features from C (h, w) arrays."""
  return np.stack([np.asarray(c, np.float32) for c in channels], axis=-1)[None]


# ------------------------------------------------------------------ pure functions


def test_rate_by_hand_one_channel():
  # before: 0 outside, 4 on the object -> normalised 1 on the object (masked mean 1).
  # after: values 0..4 with 2 on the object -> normalised 0.5 there. Rate 0.5 / 1.
  before = np.zeros((4, 4)); before[1:3, 1:3] = 4.0
  after = np.zeros((4, 4)); after[0, 0] = 4.0; after[1:3, 1:3] = 2.0
  mask = np.zeros((1, 4, 4), bool); mask[0, 1:3, 1:3] = True
  rate = permeation_from_features(_maps(before), _maps(after), mask)
  np.testing.assert_allclose(rate, [0.5], rtol=1e-6)


def test_rate_is_ratio_of_channel_and_pixel_means_not_mean_of_ratios():
  # Channel 0: before normalised 1 on the object, after normalised 0.25 -> ratio 0.25.
  # Channel 1: before normalised 0.5 on the object, after normalised 1 -> ratio 2.
  # Ratio of means: (0.25 + 1) / (1 + 0.5) = 0.8333; a mean of ratios would be 1.125.
  mask = np.zeros((1, 2, 2), bool); mask[0, 0, 0] = True
  b0 = [[1.0, 0.0], [0.0, 0.0]]
  a0 = [[1.0, 4.0], [0.0, 0.0]]          # (1 - 0) / (4 - 0) = 0.25 at the object
  b1 = [[5.0, 10.0], [0.0, 0.0]]         # 0.5
  a1 = [[3.0, 1.0], [1.0, 1.0]]          # 1
  rate = permeation_from_features(_maps(b0, b1), _maps(a0, a1), mask)
  np.testing.assert_allclose(rate, [1.25 / 1.5], rtol=1e-6)


def test_normalisation_is_per_channel_and_per_image():
  # Scaling or shifting one channel of one image changes nothing: each map is min-max
  # normalised on its own.
  rng = np.random.default_rng(0)
  before = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  after = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  mask = rng.uniform(size=(2, 8, 8)) < 0.4
  base = permeation_from_features(before, after, mask)
  moved_b, moved_a = before.copy(), after.copy()
  moved_b[0, :, :, 1] = 100.0 * moved_b[0, :, :, 1] - 7.0
  moved_a[1, :, :, 2] = 0.01 * moved_a[1, :, :, 2] + 3.0
  np.testing.assert_allclose(permeation_from_features(moved_b, moved_a, mask), base, rtol=1e-5)
  n = normalise_maps(before)
  np.testing.assert_allclose(n.min(axis=(1, 2)), 0.0)
  np.testing.assert_allclose(n.max(axis=(1, 2)), 1.0)


def test_constant_map_normalises_to_zero():
  x = np.full((1, 3, 3, 2), 5.0, np.float32)
  x[..., 1] = np.arange(9).reshape(3, 3)
  n = np.asarray(normalise_maps(x))
  np.testing.assert_array_equal(n[..., 0], 0.0)
  np.testing.assert_allclose(n[0, :, :, 1], np.arange(9).reshape(3, 3) / 8.0)


def test_identical_features_give_rate_one():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 8, 8, 4)).astype(np.float32)
  mask = np.zeros((3, 8, 8), bool)
  mask[:, 2:6, 3:7] = True
  np.testing.assert_allclose(permeation_from_features(x, x, mask), 1.0, rtol=1e-6)


def test_sentinel_when_masked_mean_before_is_at_most_0_01():
  # before normalised: 1 at one background pixel, 0.01 or 0.02 on the object.
  before = np.zeros((10, 10)); before[0, 0] = 100.0
  obj = np.zeros((1, 10, 10), bool); obj[0, 5:7, 5:7] = True
  after = np.zeros((10, 10)); after[0, 0] = 1.0; after[5:7, 5:7] = 0.5
  at_threshold = before.copy(); at_threshold[5:7, 5:7] = 1.0     # masked mean exactly 0.01
  above = before.copy(); above[5:7, 5:7] = 2.0                   # 0.02
  assert float(permeation_from_features(_maps(at_threshold), _maps(after), obj)[0]) == SENTINEL
  np.testing.assert_allclose(permeation_from_features(_maps(above), _maps(after), obj),
                             [0.5 / 0.02], rtol=1e-5)


def test_sentinel_for_an_empty_mask_and_per_image():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 4, 4, 2)).astype(np.float32)
  mask = np.zeros((2, 4, 4), bool)
  mask[1, :2, :2] = True
  rate = np.asarray(permeation_from_features(x, x, mask))
  assert rate[0] == SENTINEL
  np.testing.assert_allclose(rate[1], 1.0, rtol=1e-6)


def test_mask_downsampling_by_area_and_by_max():
  mask = np.zeros((1, 8, 8), bool)
  mask[0, 0:2, 0:2] = True          # fills block (0, 0) at factor 2
  mask[0, 4, 4] = True              # one pixel of block (2, 2): 1/4 < 1/2
  mask[0, 6:8, 6] = True            # half of block (3, 3): exactly 1/2
  area = np.asarray(downsample_mask(mask, (4, 4), "area"))[0]
  maxp = np.asarray(downsample_mask(mask, (4, 4), "max"))[0]
  assert area[0, 0] and not area[2, 2] and area[3, 3]
  assert area.sum() == 2
  assert maxp[0, 0] and maxp[2, 2] and maxp[3, 3] and maxp.sum() == 3
  # Factor 1 is the identity; a factor that does not divide is an error.
  np.testing.assert_array_equal(downsample_mask(mask, (8, 8)), mask)
  with pytest.raises(ValueError):
    downsample_mask(mask, (3, 3))
  with pytest.raises(ValueError):
    downsample_mask(mask, (4, 4), "mean")


def test_rate_at_a_coarser_stage_uses_the_downsampled_mask():
  # Features at 4x4, mask at 8x8. The object covers block (1, 1) fully and one pixel of
  # block (2, 2). By area only block (1, 1) counts: before 1 there, after 0.5 -> 0.5.
  # By max, block (2, 2) counts too: before 0.5 / after 1 there -> (0.5 + 1) / (1 + 0.5) = 1.
  before = np.zeros((4, 4)); before[1, 1] = 2.0; before[2, 2] = 1.0
  after = np.zeros((4, 4)); after[1, 1] = 1.0; after[2, 2] = 2.0
  mask = np.zeros((1, 8, 8), bool); mask[0, 2:4, 2:4] = True; mask[0, 4, 4] = True
  np.testing.assert_allclose(permeation_from_features(_maps(before), _maps(after), mask, "area"),
                             [0.5], rtol=1e-6)
  np.testing.assert_allclose(permeation_from_features(_maps(before), _maps(after), mask, "max"),
                             [1.0], rtol=1e-6)
  # A lone pixel vanishes by area at factor 2: the sentinel.
  lone = np.zeros((1, 8, 8), bool); lone[0, 4, 4] = True
  assert float(permeation_from_features(_maps(before), _maps(after), lone, "area")[0]) == SENTINEL


# ------------------------------------------------------------------ through tiny models
# One batch shape (2, 16, 16, 1) throughout, so the jitted forward compiles once per model.


def _tiny_config(odu=True, skip_conv=True):
  from munet_jax.config import base_config
  c = base_config()
  c.model.features = (4, 8, 16)
  c.model.odu_residual, c.model.skip_conv = odu, skip_conv
  return c


@pytest.fixture(scope="module")
def munet(tiny_variables):
  # conftest's session variables: the same (4, 8, 16) mU-Net, initialised once.
  return _tiny_config(), tiny_variables


@pytest.fixture(scope="module")
def unet(tiny_variables):
  # The U-Net's variables are the mU-Net's without the skip connections' own layers
  # (ODU and skip convolution): every other shape is the same. Saves an init.
  def prune(tree):
    return {k: ({n: w for n, w in v.items() if n not in ("odu", "conv")}
                if k.startswith("skip_") else v) for k, v in tree.items()}
  variables = {"params": prune(tiny_variables["params"]),
               "batch_stats": prune(tiny_variables["batch_stats"])}
  variables = {k: {n: w for n, w in v.items() if not (isinstance(w, dict) and not w)}
               for k, v in variables.items()}
  return _tiny_config(odu=False, skip_conv=False), variables


def _batch(size=16, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (2, size, size, 1)).astype(np.float32)
  labels = np.zeros((2, size, size), bool)
  labels[:, 3:11, 4:12] = True
  return images, labels


def test_unet_without_residual_path_has_rate_one(unet):
  c, v = unet
  images, labels = _batch()
  rates = permeation_rate(v, images, labels, c)
  assert rates.shape == (2,)
  np.testing.assert_allclose(rates, 1.0, rtol=1e-6)
  per = permeation_rate(v, images, labels, c, per_image=True)
  assert per.shape == (2, 2)
  np.testing.assert_allclose(per, 1.0, rtol=1e-6)


def _zero_odu(variables, bias=0.0, slope=None):
  params = dict(variables["params"])
  for name in ("skip_1", "skip_2"):
    odu = dict(params[name]["odu"])
    tconv = dict(odu["ConvTranspose_0"])
    tconv["kernel"] = jnp.zeros_like(tconv["kernel"])
    tconv["bias"] = jnp.full_like(tconv["bias"], bias)
    odu["ConvTranspose_0"] = tconv
    if slope is not None:
      odu["PReLU_0"] = {"negative_slope": jnp.asarray(slope, jnp.float32)}
    params[name] = dict(params[name], odu=odu)
  return {**variables, "params": params}


@pytest.mark.parametrize("bias,slope", [(0.0, None), (-1.0, 0.0)])
def test_annihilating_odu_passes_everything(munet, bias, slope):
  # u = PReLU(0 * p + bias) = 0 (bias 0, or bias -1 through a PReLU of slope 0): r = x.
  c, v = munet
  v = _zero_odu(v, bias, slope)
  images, labels = _batch()
  feats = diagnostics.skip_features(v, images, c)
  for f in feats:
    np.testing.assert_array_equal(f["upsampled"], 0.0)
  np.testing.assert_allclose(permeation_rate(v, images, labels, c), 1.0, rtol=1e-6)


def test_model_rate_matches_the_pure_function_on_its_own_features(munet):
  c, v = munet
  images, labels = _batch(seed=3)
  labels[1] = False                        # no object: sentinel in that row
  labels[0, 12:15, 1:3] = True
  feats = diagnostics.skip_features(v, images, c)
  assert [f["before"].shape for f in feats] == [(2, 16, 16, 4), (2, 8, 8, 8)]
  for f in feats:   # the residual really is x - u
    np.testing.assert_allclose(f["after"], f["before"] - f["upsampled"], atol=1e-5)
  per = permeation_rate(v, images, labels, c, per_image=True)
  for s, f in enumerate(feats):
    expected = permeation_from_features(f["before"], f["after"], labels)
    np.testing.assert_allclose(per[:, s], expected, rtol=1e-5)
  assert np.all(per[1] == SENTINEL)
  assert np.all(per[0] != SENTINEL) and not np.allclose(per[0], 1.0)
  # The batch rate pools the masked sums: the empty row adds nothing.
  np.testing.assert_allclose(permeation_rate(v, images, labels, c), per[0], rtol=1e-5)


def test_slices_not_a_multiple_of_the_pooling_are_padded_like_the_model(munet):
  c, v = munet
  images, labels = _batch(seed=4)
  odd, odd_labels = images[:, :15, :14], labels[:, :15, :14]
  feats = diagnostics.skip_features(v, odd, c)
  assert feats[0]["before"].shape[1:3] == (16, 16)
  # The same as padding by hand (edge for images, background for the mask).
  padded = np.pad(odd, ((0, 0), (0, 1), (1, 1), (0, 0)), mode="edge")
  np.testing.assert_allclose(feats[0]["before"],
                             diagnostics.skip_features(v, padded, c)[0]["before"], atol=1e-6)
  rates = permeation_rate(v, odd, odd_labels, c, per_image=True)
  mask = np.pad(odd_labels, ((0, 0), (0, 1), (1, 1)))
  np.testing.assert_allclose(rates, permeation_rate(v, padded, mask, c, per_image=True),
                             rtol=1e-6)
  with pytest.raises(ValueError):
    permeation_rate(v, odd, labels, c)


def test_object_rates_equal_one_mask_at_a_time(munet):
  c, v = munet
  images, _ = _batch(seed=6)
  images = np.concatenate([images, images[::-1] * 0.5])
  masks = np.zeros((4, 16, 16), bool)
  masks[0, 2:6, 2:6] = True
  masks[1, 8:15, 1:12] = True
  masks[2, 5, 5] = True
  masks[3, 0:16, 0:8] = True
  index = np.array([0, 0, 2, 1])
  got = diagnostics.object_rates(v, c, images, masks, index, batch_size=2)
  assert got[2, 1] == SENTINEL      # one pixel: gone at stage 2 by area
  for m, i, row in zip(masks, index, got):
    pair = np.stack([m, np.zeros_like(m)])
    expected = permeation_rate(v, images[[i, i]], pair, c, per_image=True)[0]
    np.testing.assert_allclose(row, expected, rtol=1e-5)


def test_slice_objects_split_tumours_and_classify_by_physical_area():
  lab = np.zeros((20, 20), np.uint8)
  lab[2:18, 2:18] = 1
  lab[3:5, 3:5] = 2         # 4 pixels
  lab[10:16, 10:16] = 2     # 36 pixels
  objs = diagnostics.slice_objects(lab, (2.0, 1.5), small_area_mm2=50.0)  # 3 mm^2 per pixel
  kinds = [(o["kind"], o["pixels"], o["small"]) for o in objs]
  assert kinds == [("tumour", 4, True), ("tumour", 36, False), ("liver", 256, False)]
  np.testing.assert_allclose([o["area_mm2"] for o in objs], [12.0, 108.0, 768.0])


def test_summary_leaves_sentinels_out_of_the_mean_and_counts_them():
  records = [{"kind": "tumour", "small": True, "rates": [0.9, SENTINEL]},
             {"kind": "tumour", "small": True, "rates": [0.7, 0.2]},
             {"kind": "liver", "small": False, "rates": [0.4, 0.3]}]
  s = diagnostics.summarize_rates(records, 2)
  np.testing.assert_allclose(s["small"]["mean"], [0.8, 0.2])
  np.testing.assert_allclose(s["small"]["vanished"], [0.0, 0.5])
  assert s["small"]["defined"] == [2, 1] and s["large"]["objects"] == 1
  assert s["tumour_large"]["objects"] == 0 and s["tumour_large"]["mean"] == [None, None]


# ------------------------------------------------------------------ command line


def _synthetic_run(tmp_path, odu=True):
  """A tiny run (untrained mU-Net, widths 4/8/16) over 3 synthetic 32x32 volumes."""
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from helpers.tiny_run import make_tiny_run, tiny_run_config
  from munet_jax.data import synthetic
  data = tmp_path / "data"
  if not data.exists():
    synthetic.write_dataset(data, 3, 32, seed=3, slices=6, progress=False)
  c = tiny_run_config(data)
  c.model.features = (4, 8, 16)
  c.model.odu_residual = c.model.skip_conv = odu
  c.data.num_train, c.data.num_val, c.data.num_test = 1, 1, 1
  workdir = tmp_path / ("munet" if odu else "unet")
  make_tiny_run(workdir, config=c)
  return workdir, data


@pytest.mark.slow
def test_cli_writes_json_and_pictures(tmp_path):
  workdir, data = _synthetic_run(tmp_path)
  unet, _ = _synthetic_run(tmp_path, odu=False)
  out = tmp_path / "diag"
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-m", "munet_jax.diagnostics", "--workdir", str(workdir),
                         "--compare-workdir", str(unet), "--split", "all", "--out", str(out),
                         "--max-slices", "2", "--batch-size", "1"], capture_output=True, text=True, env=env,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  doc = json.loads((out / "permeation.json").read_text())
  assert doc["stages"] == [1, 2]
  assert doc["objects"] and all(len(o["rates"]) == 2 for o in doc["objects"])
  assert {o["kind"] for o in doc["objects"]} >= {"liver"}
  # The U-Net run, measured on the same objects, has rate 1 wherever it is defined.
  rates = np.array([o["rates"] for o in doc["compare"]["objects"]])
  assert rates.shape == (len(doc["objects"]), 2)
  assert np.all((rates == SENTINEL) | np.isclose(rates, 1.0, rtol=1e-5))
  for name in ("permeation.png", "skip_features.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Written with the permissions of any new file (the umask's), like the JSON beside them,
  # not the owner-only mode of a temporary file.
  modes = {n: os.stat(out / n).st_mode & 0o777
           for n in ("permeation.json", "permeation.png", "skip_features.png")}
  assert len(set(modes.values())) == 1, modes
  assert proc.stderr.count("WARNING") == 0, proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["--workdir", "MISSING"], "--workdir not found"),
    (["--workdir", "RUN", "--data", "NODATA"], "data folder not found"),
    (["--workdir", "RUN", "--max-slices", "0"], "--max-slices"),
])
def test_cli_user_errors_are_one_line_exit_2(tmp_path, args, needle):
  from munet_jax.cli import run as run_cli
  from munet_jax.cli.diagnose import main
  run_dir = tmp_path / "run"
  if "RUN" in args:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers.tiny_run import make_tiny_run
    make_tiny_run(run_dir)
  argv = [str(tmp_path / a) if a in ("MISSING", "NODATA") else str(run_dir) if a == "RUN"
          else a for a in args]
  import io
  import contextlib
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    assert run_cli(main, argv) == 2
  lines = err.getvalue().strip().splitlines()
  assert len(lines) == 1 and needle in lines[0], lines


def test_cli_no_objects_is_a_user_error(tmp_path):
  from munet_jax.data import nifti
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from helpers.tiny_run import make_tiny_run
  data = tmp_path / "data"
  affine = np.diag([1.0, 1.0, 2.0, 1.0])
  for i in range(2):
    nifti.write_image(str(data / f"volume-{i}.nii.gz"), np.zeros((16, 16, 3), np.int16), affine)
    nifti.write_image(str(data / f"segmentation-{i}.nii.gz"), np.zeros((16, 16, 3), np.uint8),
                      affine)
  run_dir = tmp_path / "run"
  make_tiny_run(run_dir, str(data))
  with pytest.raises(UserError, match="no liver or tumour"):
    diagnostics.diagnose(str(run_dir), split="all", out=str(tmp_path / "o"))


def test_permeation_rate_is_exported_lazily():
  import munet_jax
  assert "permeation_rate" in munet_jax.__all__
  assert munet_jax.permeation_rate is permeation_rate


def test_object_rates_of_a_run_with_a_reference_hu_see_the_shifted_volume(munet):
  """data.reference_hu: the diagnostics feed the network what training fed it."""
  from munet_jax.diagnostics.objects import volume_object_rates
  from munet_jax.preprocessing import intensity_shift, shifted
  c, v = munet
  rng = np.random.default_rng(8)
  hu = rng.integers(-150, 200, (16, 16, 4)).astype(np.int16)
  labels = np.zeros(hu.shape, np.uint8)
  labels[2:14, 3:13, :] = 1
  labels[5:9, 5:9, 1:3] = 2
  on = c.copy_and_resolve_references()
  on.data.reference_hu = 250.0
  shift = intensity_shift(hu, on)
  assert abs(shift) > 100
  kw = dict(small_area_mm2=100.0, batch_size=4)
  got, _ = volume_object_rates(v, on, hu, labels, (1.0, 1.0, 2.0), **kw)
  want, _ = volume_object_rates(v, c, shifted(hu, shift), labels, (1.0, 1.0, 2.0), **kw)
  plain, _ = volume_object_rates(v, c, hu, labels, (1.0, 1.0, 2.0), **kw)
  assert [r["rates"] for r in got] == [r["rates"] for r in want]
  assert [r["rates"] for r in got] != [r["rates"] for r in plain]
