"""DICOM CT series in, DICOM-SEG out: the grid of ITK's series reader, bad series refused."""

import os
import sys

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk   # test-only reference converter
from nibabel import orientations

from conftest import REAL_CT, needs_real_ct
from munet_jax import dicom, dicom_seg
from munet_jax.cli import predict as predict_cli
from munet_jax.cli import run as run_cli
from munet_jax.data import nifti

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))
from dicom_series import write_series  # noqa: E402
from varied_run import kfold_runs  # noqa: E402

CT = os.path.join(REAL_CT, "ct_abdomen_3mm.nii.gz")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny run whose labels vary from voxel to voxel (untrained; shared with the
  ensemble tests of this process)."""
  return kfold_runs(str(tmp_path_factory.getbasetemp() / "kfold-runs"))[0][0]


def _predict(capsys, *args):
  capsys.readouterr()
  status = run_cli(predict_cli.main, [str(a) for a in args])
  out, err = capsys.readouterr()
  return status, out, err


def _hu(shape, seed=0):
  return np.random.default_rng(seed).integers(-1000, 1000, shape).astype(np.int16)


def _sitk_nifti(folder, out):
  """The series converted by SimpleITK's series reader, written as NIfTI; nibabel image."""
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
  sitk.WriteImage(reader.Execute(), str(out))
  return nib.load(str(out))


def _ras_grid(img):
  """(RAS-ordered array, its affine): the same for two files on one grid, whatever order."""
  ornt = orientations.io_orientation(img.affine)
  return (orientations.apply_orientation(np.asanyarray(img.dataobj), ornt),
          img.as_reoriented(ornt).affine)


# ---------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("layout", [
    dict(),                                                  # axial, LPS: rows along x
    dict(file_order=[3, 0, 5, 1, 4, 2]),                     # files not in slice order
    dict(row=(-1.0, 0.0, 0.0), col=(0.0, -1.0, 0.0)),        # axial, rows towards right
    dict(row=(0.0, 1.0, 0.0), col=(0.0, 0.0, -1.0)),         # sagittal slices
], ids=["lps", "random-file-order", "flipped-in-plane", "sagittal"])
def test_series_reads_on_the_grid_of_simpleitks_series_reader(tmp_path, layout):
  hu = _hu((7, 5, 6))
  write_series(tmp_path / "s", hu, spacing=(0.7, 0.9, 2.5), **layout)
  series, = dicom.find_series(str(tmp_path / "s"))
  volume = dicom.read_series(series)
  reference = _sitk_nifti(tmp_path / "s", tmp_path / "sitk.nii.gz")
  assert volume.data.shape == reference.shape == (7, 5, 6)
  # NIfTI stores the affine in float32: the two agree to its rounding of ~100 mm values.
  np.testing.assert_allclose(volume.affine, reference.affine, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(volume.data, np.asanyarray(reference.dataobj))
  np.testing.assert_array_equal(volume.data, hu)   # slice k is the k-th along the normal


def test_predicted_labels_of_a_series_land_on_the_converted_grid(run, tmp_path, capsys):
  write_series(tmp_path / "s", _hu((40, 36, 6)), file_order=[5, 2, 0, 4, 1, 3])
  reference = _sitk_nifti(tmp_path / "s", tmp_path / "ct.nii.gz")
  status, _, err = _predict(capsys, "--workdir", run, "--input", tmp_path / "s", "--output",
                            tmp_path / "labels.nii.gz")
  assert status == 0, err
  labels = nib.load(str(tmp_path / "labels.nii.gz"))
  assert labels.shape == reference.shape
  np.testing.assert_allclose(labels.affine, reference.affine, rtol=0, atol=1e-4)
  status, _, err = _predict(capsys, "--workdir", run, "--input", tmp_path / "ct.nii.gz",
                            "--output", tmp_path / "from_nifti.nii.gz")
  assert status == 0, err
  np.testing.assert_array_equal(np.asanyarray(labels.dataobj),
                                np.asanyarray(nib.load(str(tmp_path / "from_nifti.nii.gz")).dataobj))
  assert len(np.unique(np.asanyarray(labels.dataobj))) == 3


def test_rescale_slope_and_intercept_give_hounsfield_units(tmp_path):
  stored = np.random.default_rng(1).integers(0, 4000, (6, 5, 3))
  write_series(tmp_path / "half", stored * 0.5 - 1024, slope=0.5, intercept=-1024)
  volume = dicom.read_series(dicom.find_series(str(tmp_path / "half"))[0])
  assert volume.data.dtype == np.float32
  np.testing.assert_array_equal(volume.data, stored * 0.5 - 1024)   # exact in float32
  write_series(tmp_path / "int", stored - 1024, slope=1, intercept=-1024)
  volume = dicom.read_series(dicom.find_series(str(tmp_path / "int"))[0])
  assert volume.data.dtype == np.int16
  np.testing.assert_array_equal(volume.data, stored - 1024)


def test_each_series_of_a_folder_gets_its_own_output(run, tmp_path, capsys):
  write_series(tmp_path / "in" / "a", _hu((40, 36, 3)), series_uid="1.2.3.4.1")
  write_series(tmp_path / "in" / "b", _hu((40, 36, 4), seed=2), series_uid="1.2.3.4.2",
               spacing=(1.0, 1.0, 3.0))
  status, _, err = _predict(capsys, "--workdir", run, "--input", tmp_path / "in",
                            "--output", tmp_path / "out")
  assert status == 0, err
  assert sorted(os.listdir(tmp_path / "out")) == ["1.2.3.4.1.nii.gz", "1.2.3.4.2.nii.gz"]
  assert nib.load(str(tmp_path / "out" / "1.2.3.4.2.nii.gz")).shape == (40, 36, 4)


# ------------------------------------------------------------------------ the real CT


@pytest.fixture(scope="module")
def real_ct_series(tmp_path_factory):
  """The real CT written out as an axial LPS DICOM series (3 mm, HU with intercept -1024)."""
  image = nib.load(CT)
  assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
  hu = np.asanyarray(image.dataobj)
  folder = tmp_path_factory.mktemp("real-ct-dicom") / "series"
  lps_hu = hu[::-1, ::-1, :]   # columns towards patient left, rows towards posterior
  corner = image.affine @ np.array([hu.shape[0] - 1, hu.shape[1] - 1, 0, 1.0])
  spacing = [float(s) for s in nifti.ras_spacing(image.affine)]
  files = write_series(folder, lps_hu, spacing=spacing, origin=(-corner[0], -corner[1], corner[2]),
                       file_order=np.random.default_rng(0).permutation(hu.shape[2]))
  return folder, files


@pytest.fixture(scope="module")
def real_ct_predictions(run, real_ct_series, tmp_path_factory):
  """predict.py on the real CT three ways: NIfTI in; DICOM in, NIfTI out; DICOM-SEG out."""
  folder, _ = real_ct_series
  out = tmp_path_factory.mktemp("real-ct-predictions")
  for source, name, extra in ((CT, "nifti.nii.gz", ()), (folder, "dicom.nii.gz", ()),
                              (folder, "seg.dcm", ("--output-format", "dicom-seg"))):
    status = run_cli(predict_cli.main, ["--workdir", run, "--input", str(source),
                                        "--output", str(out / name), *extra])
    assert status == 0
  return out


@needs_real_ct
def test_the_real_ct_gives_the_same_labels_from_nifti_and_from_dicom(real_ct_predictions):
  from_nifti, nifti_affine = _ras_grid(nib.load(str(real_ct_predictions / "nifti.nii.gz")))
  from_dicom, dicom_affine = _ras_grid(nib.load(str(real_ct_predictions / "dicom.nii.gz")))
  np.testing.assert_allclose(dicom_affine, nifti_affine, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(from_dicom, from_nifti)
  assert np.bincount(from_nifti.ravel(), minlength=3).min() > 1000   # labels vary


@needs_real_ct
def test_dicom_seg_reads_back_to_the_labels_and_references_each_slice(real_ct_series,
                                                                     real_ct_predictions):
  folder, files = real_ct_series
  path = str(real_ct_predictions / "seg.dcm")
  series, = dicom.find_series(str(folder))
  expected = np.asanyarray(nib.load(str(real_ct_predictions / "dicom.nii.gz")).dataobj)
  np.testing.assert_array_equal(dicom_seg.read_labels(path, series), expected)
  seg = hd.seg.segread(path)
  ct = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
  assert seg.StudyInstanceUID == ct[0].StudyInstanceUID
  assert seg.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
  assert seg.SeriesInstanceUID != ct[0].SeriesInstanceUID
  referenced = {uid for _, _, uid in seg.get_source_image_uids()}
  assert referenced == {ds.SOPInstanceUID for ds in ct}
  # Each CT slice's own frames hold that slice's labels (not a neighbour's).
  for k in (0, 11, len(files) - 1):
    uid = series.sop_instance_uids[k]
    pixels = seg.get_pixels_by_source_instance([uid], combine_segments=True,
                                               ignore_spatial_locations=True)[0]
    np.testing.assert_array_equal(pixels.T, expected[:, :, k])
  codes = {(d.segment_number, d.segment_label, d.segmented_property_type.value)
           for d in (seg.get_segment_description(n) for n in (1, 2))}
  assert codes == {(1, "Liver", "10200004"), (2, "Liver tumour", "108369006")}


# ------------------------------------------------------------------------- bad series


def _shift(k, ds, by):
  ds.ImagePositionPatient = [float(v) for v in np.add(ds.ImagePositionPatient, by)]


BAD = {
    "no DICOM": (lambda t: os.makedirs(t / "in") or (t / "in" / "notes.txt").write_text("x"),
                 "{t}/in: no NIfTI files (*.nii, *.nii.gz) and no DICOM files"),
    "missing slice": (lambda t: [os.remove(p) for p in write_series(t / "in", _hu((6, 6, 6)))[3:4]],
                      "{t}/in/slice-004.dcm: 1 slice(s) missing"),
    "MR": (lambda t: write_series(t / "in", _hu((6, 6, 3)), modality="MR"),
           "{t}/in/slice-000.dcm: Modality is MR, expected CT"),
    "gantry tilt tag": (lambda t: write_series(t / "in", _hu((6, 6, 3)), edit=lambda k, ds:
                                               setattr(ds, "GantryDetectorTilt", 12.0)),
                        "{t}/in/slice-000.dcm: gantry tilt of 12 degrees"),
    "sheared positions": (lambda t: write_series(t / "in", _hu((6, 6, 4)), edit=lambda k, ds:
                                                 _shift(k, ds, (0.0, 0.5 * k, 0.0))),
                          "{t}/in/slice-003.dcm: slice positions shear"),
    "uneven spacing": (lambda t: write_series(t / "in", _hu((6, 6, 4)), edit=lambda k, ds:
                                              _shift(k, ds, (0, 0, 0.4 * (k == 3)))),
                       "{t}/in/slice-003.dcm: uneven slice spacing"),
    "two orientations": (lambda t: write_series(t / "in", _hu((6, 6, 3)), edit=lambda k, ds:
                                                setattr(ds, "ImageOrientationPatient",
                                                        [1, 0, 0, 0, 0.8, 0.6]) if k == 2 else None),
                         "ImageOrientationPatient differs"),
    "two slices at one place": (lambda t: write_series(t / "in", _hu((6, 6, 3)), edit=lambda k, ds:
                                                       _shift(k, ds, (0, 0, -2.5 * (k == 2)))),
                                "two slices at the same position"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_series_is_one_line_naming_the_file_and_status_2(run, tmp_path, capsys, name):
  make, message = BAD[name]
  make(tmp_path)
  status, out, err = _predict(capsys, "--workdir", run, "--input", tmp_path / "in",
                              "--output", tmp_path / "out")
  assert status == 2 and out == ""
  assert err.count("\n") == 1 and err.startswith("error: "), err
  assert message.format(t=tmp_path) in err, err
  assert not os.path.exists(tmp_path / "out")


def test_dicom_seg_output_for_nifti_input_is_refused(run, tmp_path, capsys):
  nifti.write_image(str(tmp_path / "ct.nii.gz"), _hu((8, 8, 3)), np.eye(4))
  status, _, err = _predict(capsys, "--workdir", run, "--input", tmp_path / "ct.nii.gz",
                            "--output", tmp_path / "seg.dcm", "--output-format", "dicom-seg")
  assert status == 2 and err.count("\n") == 1
  assert f"{tmp_path}/ct.nii.gz: --output-format dicom-seg needs a DICOM series" in err


def test_localizer_series_are_left_out_with_a_note(tmp_path, capsys):
  write_series(tmp_path / "in" / "ct", _hu((6, 6, 3)), series_uid="1.2.9.1")
  write_series(tmp_path / "in" / "scout", _hu((6, 6, 2)), series_uid="1.2.9.2",
               edit=lambda k, ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))
  assert [s.uid for s in dicom.find_series(str(tmp_path / "in"))] == ["1.2.9.1"]
  assert "localizer series 1.2.9.2 is left out" in capsys.readouterr().err
