"""munet_jax.data.nifti: reading with validation, grid-exact writing, RAS reorientation."""

import os

import nibabel as nib
import numpy as np
import pytest

from conftest import REAL_CT as REAL, needs_real_ct
from munet_jax.data import nifti
from munet_jax.errors import UserError

REAL_CT = os.path.join(REAL, "ct_abdomen_3mm.nii.gz")
REAL_MASK = os.path.join(REAL, "liver_mask_a.nii.gz")
needs_real = needs_real_ct


def _save(path, data, affine=None):
  nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
  return str(path)


@needs_real
def test_real_ct_reads_with_its_geometry():
  vol = nifti.read_image(REAL_CT)
  assert vol.data.shape == (122, 101, 30)
  assert vol.data.dtype == np.int16
  assert vol.spacing == (3.0, 3.0, 3.0)
  assert vol.affine.shape == (4, 4) and vol.affine.dtype == np.float64


@needs_real
def test_real_ct_write_image_round_trip_is_exact(tmp_path):
  vol = nifti.read_image(REAL_CT)
  out = tmp_path / "ct.nii.gz"
  nifti.write_image(out, vol.data, vol.affine)
  again = nifti.read_image(out)
  np.testing.assert_array_equal(again.data, vol.data)
  assert again.data.dtype == vol.data.dtype
  np.testing.assert_array_equal(again.affine, vol.affine)


@needs_real
def test_real_label_reads_like_its_image():
  vol = nifti.read_image(REAL_CT)
  mask = nifti.read_label(REAL_MASK, like=vol)
  assert mask.data.dtype == np.uint8
  assert int(mask.data.sum()) == 38_634


@needs_real
def test_write_label_keeps_the_image_header_grid(tmp_path):
  vol = nifti.read_image(REAL_CT)
  mask = nifti.read_label(REAL_MASK, like=vol)
  out = tmp_path / "pred.nii.gz"
  nifti.write_label(out, mask.data, like=vol)
  written, original = nib.load(out).header, nib.load(REAL_CT).header
  for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
              "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim",
              "dim", "xyzt_units"):
    np.testing.assert_array_equal(written[key], original[key], err_msg=key)
  assert written.get_data_dtype() == np.uint8
  again = nifti.read_label(out, like=vol)
  np.testing.assert_array_equal(again.data, mask.data)


def test_write_label_without_header_uses_the_affine(tmp_path):
  affine = np.diag([-0.7, -0.7, 2.5, 1.0])
  like = nifti.Volume(np.zeros((4, 5, 6), np.int16), affine, "mem")
  labels = np.zeros((4, 5, 6), np.uint8)
  labels[1, 2, 3] = 2
  nifti.write_label(tmp_path / "l.nii", labels, like)
  again = nifti.read_label(tmp_path / "l.nii", like=like)
  np.testing.assert_array_equal(again.data, labels)


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
  nifti.write_image(tmp_path / "sub" / "a.nii.gz", np.ones((2, 3, 4), np.int16), np.eye(4))
  assert sorted(os.listdir(tmp_path / "sub")) == ["a.nii.gz"]


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
  path = tmp_path / "a.nii.gz"
  nifti.write_image(path, np.ones((2, 3, 4), np.int16), np.eye(4))
  before = path.read_bytes()

  def broken_save(img, filename):
    with open(filename, "wb") as f:
      f.write(b"half")
    raise KeyboardInterrupt

  monkeypatch.setattr(nib, "save", broken_save)
  with pytest.raises(KeyboardInterrupt):
    nifti.write_image(path, np.zeros((2, 3, 4), np.int16), np.eye(4))
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["a.nii.gz"]


def test_gzip_output_is_byte_identical_for_identical_input(tmp_path):
  data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
  nifti.write_image(tmp_path / "a.nii.gz", data, np.eye(4))
  nifti.write_image(tmp_path / "b.nii.gz", data, np.eye(4))
  assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()


def test_trailing_singleton_dimension_is_squeezed(tmp_path):
  path = _save(tmp_path / "x.nii.gz", np.ones((3, 4, 5, 1), np.int16))
  assert nifti.read_image(path).data.shape == (3, 4, 5)


def test_integer_scaled_image_stays_int16(tmp_path):
  img = nib.Nifti1Image(np.array([[[0, 1000], [2000, 3000]]], np.uint16), np.eye(4))
  img.header.set_slope_inter(1, -1024)
  img.header.set_data_dtype(np.uint16)
  path = tmp_path / "u16.nii"
  nib.save(img, path)
  vol = nifti.read_image(path)
  assert vol.data.dtype == np.int16
  np.testing.assert_array_equal(vol.data, [[[-1024, -24], [976, 1976]]])


def test_float_labels_with_integral_values_are_accepted(tmp_path):
  path = _save(tmp_path / "l.nii.gz", np.array([[[0.0, 1.0], [2.0, 1.0]]], np.float32))
  assert nifti.read_label(path).data.dtype == np.uint8


@pytest.mark.parametrize("make, message", [
    (lambda p: _save(p, np.full((2, 2, 2), 3, np.uint8)), "found 3"),
    (lambda p: _save(p, np.full((2, 2, 2), 0.5, np.float32)), "found 0.5"),
    (lambda p: _save(p, np.full((2, 2, 2), -1, np.int16)), "found -1"),
])
def test_label_values_outside_0_1_2_are_rejected(tmp_path, make, message):
  path = make(tmp_path / "l.nii.gz")
  with pytest.raises(UserError, match=message):
    nifti.read_label(path)


def test_label_of_other_shape_is_rejected(tmp_path):
  image = nifti.read_image(_save(tmp_path / "i.nii.gz", np.zeros((4, 4, 4), np.int16)))
  label = _save(tmp_path / "l.nii.gz", np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(UserError, match="shape"):
    nifti.read_label(label, like=image)


def test_label_of_other_affine_is_rejected_but_float32_rounding_is_not(tmp_path):
  affine = np.diag([0.7, 0.7, 2.5, 1.0])
  affine[:3, 3] = (-180.123456, -170.5, 1234.5678)
  image = nifti.read_image(_save(tmp_path / "i.nii.gz", np.zeros((4, 4, 4), np.int16), affine))
  rounded = affine.astype(np.float32).astype(np.float64)
  ok = _save(tmp_path / "ok.nii.gz", np.zeros((4, 4, 4), np.uint8), rounded)
  nifti.read_label(ok, like=image)
  shifted = affine.copy()
  shifted[2, 3] += 2.5
  bad = _save(tmp_path / "bad.nii.gz", np.zeros((4, 4, 4), np.uint8), shifted)
  with pytest.raises(UserError, match="affine"):
    nifti.read_label(bad, like=image)


def test_nan_in_image_is_rejected(tmp_path):
  data = np.zeros((3, 3, 3), np.float32)
  data[1, 1, 1] = np.nan
  with pytest.raises(UserError, match="1 NaN"):
    nifti.read_image(_save(tmp_path / "n.nii.gz", data))


@pytest.mark.parametrize("shape, message", [((3, 4, 5, 2), "4-D"), ((3, 4), "2-D")])
def test_non_3d_volumes_are_rejected(tmp_path, shape, message):
  with pytest.raises(UserError, match=message):
    nifti.read_image(_save(tmp_path / "v.nii.gz", np.zeros(shape, np.int16)))


def test_errors_start_with_the_file_path(tmp_path):
  path = tmp_path / "missing.nii.gz"
  with pytest.raises(UserError, match="^" + str(path) + ": file not found"):
    nifti.read_image(path)


def _random_orientation_affine(rng):
  perm = rng.permutation(3)
  signs = rng.choice([-1.0, 1.0], size=3)
  rot = np.zeros((3, 3))
  rot[perm, np.arange(3)] = signs * rng.uniform(0.5, 3.0, size=3)
  # A small oblique tilt: io_orientation must still pick the closest axes.
  tilt = np.eye(3) + rng.normal(0, 0.05, (3, 3))
  affine = np.eye(4)
  affine[:3, :3] = tilt @ rot
  affine[:3, 3] = rng.normal(0, 100, 3)
  return affine


def test_to_ras_and_from_ras_are_inverse_for_random_orientations():
  rng = np.random.default_rng(0)
  data = rng.normal(size=(3, 4, 5))
  for _ in range(50):
    affine = _random_orientation_affine(rng)
    np.testing.assert_array_equal(nifti.from_ras(nifti.to_ras(data, affine), affine), data)


def test_to_ras_puts_superior_last_and_ras_spacing_follows():
  # File order: axis 0 = superior->inferior (2.5 mm), 1 = R->L (0.7 mm), 2 = P->A (0.8 mm).
  affine = np.array([[0, -0.7, 0, 0], [0, 0, 0.8, 0], [-2.5, 0, 0, 0], [0, 0, 0, 1.0]])
  data = np.arange(3 * 4 * 5).reshape(3, 4, 5)
  ras = nifti.to_ras(data, affine)
  assert ras.shape == (4, 5, 3)
  assert ras[0, 0, 0] == data[2, 3, 0]  # most left, posterior, inferior voxel
  assert nifti.ras_spacing(affine) == (0.7, 0.8, 2.5)


@needs_real
def test_real_ct_is_already_ras():
  vol = nifti.read_image(REAL_CT)
  np.testing.assert_array_equal(nifti.to_ras(vol.data, vol.affine), vol.data)


def test_unreadable_file_is_reported_as_permission_denied(tmp_path, monkeypatch):
  # As root, chmod 0 does not stop reading, so the permission check is faked here;
  # tests/test_check.py tries the real thing when not running as root.
  path = _save(tmp_path / "v.nii.gz", np.zeros((2, 2, 2), np.int16))
  monkeypatch.setattr(os, "access", lambda p, mode: False)
  with pytest.raises(UserError, match="v.nii.gz: permission denied"):
    nifti.read_image(path)


def test_big_endian_file_reads_in_native_byte_order(tmp_path):
  data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
  img = nib.Nifti1Image(data, np.eye(4), header=nib.Nifti1Header(endianness=">"))
  img.set_data_dtype(np.int16)
  nib.save(img, tmp_path / "be.nii")
  vol = nifti.read_image(tmp_path / "be.nii")
  assert vol.data.dtype == np.int16 and vol.data.dtype.isnative
  np.testing.assert_array_equal(vol.data, data)


def test_truncated_uncompressed_file_is_rejected(tmp_path):
  path = _save(tmp_path / "t.nii", np.zeros((16, 16, 16), np.int16))
  content = open(path, "rb").read()
  open(path, "wb").write(content[: len(content) // 2])
  with pytest.raises(UserError, match="t.nii: cannot read voxel data"):
    nifti.read_image(path)
