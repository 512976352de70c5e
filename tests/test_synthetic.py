"""munet_jax.data.synthetic: deterministic, CT-like, labels that make sense."""

import json
import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from munet_jax.data import discovery, nifti, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_cases():
  """Twelve small (64 x 64 x 24) cases."""
  return [synthetic.make_case(np.random.default_rng([0, i]), 64, 24) for i in range(12)]


def test_case_shapes_dtypes_and_label_values(demo_cases):
  for hu, labels, affine in demo_cases:
    assert hu.shape == labels.shape == (64, 64, 24)
    assert hu.dtype == np.int16 and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert affine.shape == (4, 4)


def test_intensities_are_ct_like(demo_cases):
  for hu, labels, affine in demo_cases:
    ras = nifti.to_ras(hu, affine)
    assert np.median(ras[:3, :3]) < -900          # air in the corners
    liver = hu[labels == 1]
    assert 40 < np.median(liver) < 120            # liver 50-105 HU plus noise
    assert hu.max() > 300                         # bone


def test_every_tumour_lies_in_a_liver(demo_cases):
  for _, labels, _ in demo_cases:
    regions, n = ndimage.label(labels > 0)
    for i in range(1, n + 1):
      values = set(np.unique(labels[regions == i]))
      assert values != {2}, "a tumour with no liver around it"
    assert np.count_nonzero(labels == 2) < np.count_nonzero(labels > 0) / 2


def test_small_and_large_tumours_are_present(demo_cases):
  volumes_ml = []
  for _, labels, affine in demo_cases:
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    regions, n = ndimage.label(labels == 2)
    volumes_ml += list(np.bincount(regions.ravel())[1:] * voxel_ml)
  assert len(volumes_ml) >= 12
  assert min(volumes_ml) < 1.0        # a lesion about 1 cm across or less
  assert max(volumes_ml) > 30.0       # and one of several cm


def test_orientations_vary(demo_cases):
  codes = {nib.aff2axcodes(affine) for _, _, affine in demo_cases}
  assert ("L", "P", "S") in codes and ("R", "A", "S") in codes


def test_the_liver_is_on_the_patients_right(demo_cases):
  for hu, labels, affine in demo_cases:
    ras = nifti.to_ras(labels, affine)
    x_centre = np.argwhere(ras == 1)[:, 0].mean()
    assert x_centre > ras.shape[0] / 2  # RAS: larger x is further right


def test_same_seed_same_files_and_other_seed_other_files(tmp_path):
  a = synthetic.write_dataset(tmp_path / "a", cases=2, size=32, seed=5, slices=8,
                              progress=False)
  b = synthetic.write_dataset(tmp_path / "b", cases=2, size=32, seed=5, slices=8,
                              progress=False)
  c = synthetic.write_dataset(tmp_path / "c", cases=2, size=32, seed=6, slices=8,
                              progress=False)
  for (ia, la), (ib, lb), (ic, _) in zip(a, b, c):
    assert open(ia, "rb").read() == open(ib, "rb").read()
    assert open(la, "rb").read() == open(lb, "rb").read()
    assert open(ia, "rb").read() != open(ic, "rb").read()


def test_written_data_set_is_lits_layout_on_one_grid(tmp_path):
  synthetic.write_dataset(tmp_path, cases=3, size=32, seed=0, slices=8, progress=False)
  cases = discovery.find_cases(tmp_path)
  assert [c.name for c in cases] == ["volume-0", "volume-1", "volume-2"]
  for case in cases:
    image = nifti.read_image(case.image)
    nifti.read_label(case.label, like=image)


def test_default_slices_follow_a_1_to_5_mm_thickness():
  hu, _, affine = synthetic.make_case(np.random.default_rng(1), 32)
  thickness = abs(affine[2, 2])
  assert 1.0 <= thickness <= 5.0
  assert 150 <= thickness * hu.shape[2] <= 240


def test_demo_size_data_set_is_fast(tmp_path):
  start = time.perf_counter()
  synthetic.write_dataset(tmp_path, cases=12, size=64, seed=0, slices=24, progress=False)
  assert time.perf_counter() - start < 10.0


def _command_line(out, *args):
  """`python -m munet_jax.data.synthetic --out OUT ARGS...` in a fresh process."""
  return subprocess.run(
      [sys.executable, "-m", "munet_jax.data.synthetic", "--out", str(out), *args],
      capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})


def test_command_line(tmp_path):
  run = _command_line(tmp_path, "--cases", "2", "--size", "24", "--slices", "6", "--seed", "3")
  assert run.returncode == 0, run.stderr
  assert sorted(os.listdir(tmp_path)) == ["segmentation-0.nii.gz", "segmentation-1.nii.gz",
                                          "synthetic.json", "volume-0.nii.gz",
                                          "volume-1.nii.gz"]


def test_command_line_rejects_a_tiny_size(tmp_path):
  run = _command_line(tmp_path, "--size", "4")
  assert run.returncode == 2
  assert run.stderr.strip() == "error: --size must be >= 16, got 4"


def test_a_liver_region_crop_is_the_same_case_cut_out_on_the_same_world_grid():
  for i in range(4):
    full_hu, full_lab, full_aff = synthetic.make_case(np.random.default_rng([0, i]), 64, 8)
    hu, lab, aff = synthetic.make_case(np.random.default_rng([0, i]), 64, 8, crop=40)
    assert hu.shape == lab.shape == (40, 40, 8)
    # Every voxel of the crop, taken through its affine to the world and back through the
    # full case's, lands on a voxel of the full case holding the same HU and label.
    index = np.indices(hu.shape).reshape(3, -1)
    world = aff[:3, :3] @ index + aff[:3, 3:]
    back = np.linalg.solve(full_aff[:3, :3], world - full_aff[:3, 3:])
    assert np.allclose(back, np.round(back), atol=1e-6)
    i0, j0, k0 = np.round(back).astype(int)
    assert (full_hu[i0, j0, k0] == hu.reshape(-1)).all()
    assert (full_lab[i0, j0, k0] == lab.reshape(-1)).all()
    assert np.unique(k0).size == 8                       # slices are not cut
    # The window is centred on the liver: it holds most of the liver's voxels.
    assert (lab > 0).sum() >= 0.9 * (full_lab > 0).sum()


def test_the_tumour_rate_sets_the_lesion_count():
  def lesions(rate):
    n = 0
    for i in range(10):
      _, lab, _ = synthetic.make_case(np.random.default_rng([0, i]), 32, 8, tumour_rate=rate)
      n += ndimage.label(lab == 2)[1]
    return n
  # Same cases, same draws but the Poisson count: far more lesions at rate 10 than 1.
  few, many = lesions(1.0), lesions(10.0)
  assert many > 3 * few > 0


def test_voxel_noise_scales_the_noise_with_the_voxel_volume():
  # The scanner table is painted as one constant, -300 HU, over whole rows (every x and z)
  # before the noise is added, so its voxels hold -300 + sigma z, rounded. Both cases come
  # from one seed and draw the same z, so the table's standard deviation must scale by
  # exactly k = sqrt(0.75 x 0.75 x 5 mm^3 / voxel volume), up to the rounding: each voxel
  # moves by at most 0.5 HU, so (Minkowski) each standard deviation by at most 0.5.
  checked = 0
  for i in range(6):
    plain, _, affine = synthetic.make_case(np.random.default_rng([3, i]), 192, 16)
    scaled, _, affine2 = synthetic.make_case(np.random.default_rng([3, i]), 192, 16,
                                             voxel_noise=True)
    assert (affine == affine2).all()
    rows = [j for j in range(plain.shape[1])
            if ((plain[:, j] > -450) & (plain[:, j] < -150)).all()]
    if not rows:
      continue                        # the table lies outside this case's field of view
    voxel = np.prod(np.linalg.norm(affine[:3, :3], axis=0))
    k = np.sqrt(0.75 * 0.75 * 5.0 / voxel)
    s_plain = plain[:, rows].astype(np.float64).std()
    s_scaled = scaled[:, rows].astype(np.float64).std()
    assert s_plain > 9.0              # noise of 10-25 HU, not a flat table
    assert k * (s_plain - 0.5) - 0.5 <= s_scaled <= k * (s_plain + 0.5) + 0.5, (i, k)
    checked += 1
  assert checked >= 3


def test_the_low_contrast_rate_changes_only_the_low_contrast_flag():
  # Every case draws its flag and its noise level whatever the rate, so the same case at
  # rates 0 and 1 has the same labels and geometry, and the default rate gives, case by
  # case, one of the two byte for byte.
  checked = 0
  for i in range(6):
    cases = {rate: synthetic.make_case(np.random.default_rng([4, i]), 192, 16,
                                       low_contrast_rate=rate) for rate in (0.0, 0.2, 1.0)}
    (hu0, lab0, aff0), (hu1, lab1, aff1) = cases[0.0], cases[1.0]
    assert (lab0 == lab1).all() and (aff0 == aff1).all()
    default = cases[0.2][0]
    assert (default == hu0).all() or (default == hu1).all()
    # The noise: sigma = 10 + 10 u, or 15 + 10 u for a low-contrast case, from the same u
    # and the same normal draws z. On the scanner table (-300 HU + sigma z, rounded: each
    # voxel moves by at most 0.5 HU, so each standard deviation by at most 0.5) the two
    # standard deviations differ by 5 std(z); std(z) of N >= 3,000 draws lies within
    # 1 +- 6 / sqrt(2 N) (six of its standard errors).
    rows = [j for j in range(hu0.shape[1]) if ((hu0[:, j] > -450) & (hu0[:, j] < -150)).all()]
    if not rows:
      continue
    n = hu0[:, rows].size
    assert n >= 3000
    gap = hu1[:, rows].astype(np.float64).std() - hu0[:, rows].astype(np.float64).std()
    slack = 6 / np.sqrt(2 * n)
    assert 5 * (1 - slack) - 1 <= gap <= 5 * (1 + slack) + 1, (i, gap)
    checked += 1
  assert checked >= 3
  with pytest.raises(ValueError, match="low_contrast_rate"):
    synthetic.make_case(np.random.default_rng(0), 32, 4, low_contrast_rate=1.5)


def test_the_command_line_records_the_low_contrast_rate(tmp_path):
  run = _command_line(tmp_path, "--cases", "1", "--size", "24", "--slices", "4",
                      "--low-contrast-rate", "0")
  assert run.returncode == 0, run.stderr
  with open(tmp_path / "synthetic.json") as f:
    assert json.load(f)["low_contrast_rate"] == 0.0


def test_training_warns_of_synthetic_data_made_with_other_settings(tmp_path):
  from munet_jax.config import base_config
  from munet_jax.training.loop import synthetic_mismatch
  synthetic.write_dataset(tmp_path, cases=1, size=24, seed=0, slices=4, progress=False)
  config = base_config()
  config.seed = 0
  s = config.data.synthetic
  s.cases, s.size, s.slices = 1, 24, 4
  assert synthetic_mismatch(str(tmp_path), config) == []
  s.low_contrast_rate = 0.0
  [warning] = synthetic_mismatch(str(tmp_path), config)
  assert "low_contrast_rate 0.2 (the config asks for 0.0)" in warning
  # A data set written before the setting existed was made at its default, 0.2.
  path = tmp_path / "synthetic.json"
  settings = json.loads(path.read_text())
  del settings["low_contrast_rate"]
  path.write_text(json.dumps(settings))
  assert len(synthetic_mismatch(str(tmp_path), config)) == 1
  s.low_contrast_rate = 0.2
  assert synthetic_mismatch(str(tmp_path), config) == []
  config.seed = 1
  assert "seed 0 (the config asks for 1)" in synthetic_mismatch(str(tmp_path), config)[0]
