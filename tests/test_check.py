"""Bad data as a new user would bring it, through `python -m munet_jax.data.check ROOT`.

Each case builds a data root holding one good case and one bad thing; the real command
must exit 2 with one stderr line naming the file and no traceback. The table in
bench/RESULTS.md ("Bad data inputs") lists these cases and their messages.
"""

import concurrent.futures
import gzip
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from munet_jax.data import check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def _nii(path, data, affine=AFFINE):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(nib.Nifti1Image(data, affine), path)
  return path


def _image(shape=(8, 8, 4)):
  return np.full(shape, -100, np.int16)


def _label(shape=(8, 8, 4), value=1):
  data = np.zeros(shape, np.uint8)
  data[2:5, 2:5, 1:3] = value
  return data


def _good(root, n=0):
  _nii(os.path.join(root, f"volume-{n}.nii.gz"), _image())
  _nii(os.path.join(root, f"segmentation-{n}.nii.gz"), _label())


def _text(path, content=b"this is not a NIfTI file\n"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(content)
  return path


# Each builder makes a bad data root and returns (root, the name the message must hold).
def truncated_gz(root):
  _good(root)
  data = np.arange(4096, dtype=np.int16).reshape(16, 16, 16)
  path = _nii(os.path.join(root, "volume-1.nii.gz"), data)
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label((16, 16, 16)))
  data = open(path, "rb").read()
  _text(path, data[: len(data) // 2])
  return root, "volume-1.nii.gz"


def text_named_nii(root):
  _good(root)
  _text(os.path.join(root, "volume-1.nii"))
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label())
  return root, "volume-1.nii"


def gzip_of_text(root):
  _good(root)
  _text(os.path.join(root, "volume-1.nii.gz"), gzip.compress(b"hello, I am text\n" * 50))
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label())
  return root, "volume-1.nii.gz"


def empty_file(root):
  _good(root)
  _text(os.path.join(root, "volume-1.nii.gz"), b"")
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label())
  return root, "volume-1.nii.gz"


def shape_mismatch(root):
  _good(root)
  _nii(os.path.join(root, "volume-1.nii.gz"), _image())
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label((8, 8, 5)))
  return root, "segmentation-1.nii.gz"


def affine_mismatch(root):
  _good(root)
  _nii(os.path.join(root, "volume-1.nii.gz"), _image())
  shifted = AFFINE.copy()
  shifted[2, 3] = 10.0
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label(), shifted)
  return root, "segmentation-1.nii.gz"


def label_value_3(root):
  _good(root)
  _nii(os.path.join(root, "volume-1.nii.gz"), _image())
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label(value=3))
  return root, "segmentation-1.nii.gz"


def label_fractional(root):
  _good(root)
  _nii(os.path.join(root, "volume-1.nii.gz"), _image())
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label().astype(np.float32) * 0.5)
  return root, "segmentation-1.nii.gz"


def nan_in_image(root):
  _good(root)
  data = _image().astype(np.float32)
  data[3, 3, 2] = np.nan
  _nii(os.path.join(root, "volume-1.nii.gz"), data)
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label())
  return root, "volume-1.nii.gz"


def inf_in_image(root):
  _good(root)
  data = _image().astype(np.float32)
  data[0, 0, 0] = np.inf
  _nii(os.path.join(root, "volume-1.nii.gz"), data)
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label())
  return root, "volume-1.nii.gz"


def true_4d(root):
  _good(root)
  _nii(os.path.join(root, "volume-1.nii.gz"), np.zeros((8, 8, 4, 2), np.int16))
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label())
  return root, "volume-1.nii.gz"


def two_d(root):
  _good(root)
  _nii(os.path.join(root, "volume-1.nii.gz"), np.zeros((8, 8), np.int16))
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label())
  return root, "volume-1.nii.gz"


def complex_image(root):
  _good(root)
  _nii(os.path.join(root, "volume-1.nii.gz"), _image().astype(np.complex64))
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label())
  return root, "volume-1.nii.gz"


def zero_voxel_size(root):
  _good(root)
  img = nib.Nifti1Image(_image(), None)
  img.header.set_zooms((0.0, 0.0, 0.0))
  os.makedirs(root, exist_ok=True)
  nib.save(img, os.path.join(root, "volume-1.nii.gz"))
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label())
  return root, "volume-1.nii.gz"


def unreadable_file(root):
  _good(root)
  path = _nii(os.path.join(root, "volume-1.nii.gz"), _image())
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label())
  os.chmod(path, 0)
  return root, "volume-1.nii.gz"


def empty_folder(root):
  os.makedirs(root)
  return root, os.path.basename(root)


def missing_folder(root):
  return os.path.join(root, "no-such-data"), "no-such-data"


def root_is_a_file(root):
  return _text(os.path.join(root, "data.nii.gz"), b"x"), "data.nii.gz"


def image_without_label(root):
  _good(root)
  _nii(os.path.join(root, "volume-1.nii.gz"), _image())
  return root, "volume-1.nii.gz"


def label_without_image(root):
  _good(root)
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label())
  return root, "segmentation-1.nii.gz"


def duplicate_case(root):
  _good(root)
  _nii(os.path.join(root, "batch1", "volume-1.nii.gz"), _image())
  _nii(os.path.join(root, "batch2", "volume-1.nii.gz"), _image())
  _nii(os.path.join(root, "batch1", "segmentation-1.nii.gz"), _label())
  return root, "volume-1.nii.gz"


def decathlon_second_channel(root):
  _nii(os.path.join(root, "imagesTr", "liver_0_0000.nii.gz"), _image())
  _nii(os.path.join(root, "imagesTr", "liver_0_0001.nii.gz"), _image())
  _nii(os.path.join(root, "labelsTr", "liver_0.nii.gz"), _label())
  return root, "liver_0_0001.nii.gz"


def decathlon_label_mismatch(root):
  _nii(os.path.join(root, "imagesTr", "liver_0.nii.gz"), _image())
  _nii(os.path.join(root, "labelsTr", "liver_0.nii.gz"), _label((8, 9, 4)))
  return root, "liver_0.nii.gz"


BAD_INPUTS = [
    ("truncated .nii.gz (half the bytes)", truncated_gz),
    ("text file named .nii", text_named_nii),
    (".nii.gz that is gzip of plain text", gzip_of_text),
    ("empty (0-byte) .nii.gz", empty_file),
    ("label shape differs from image", shape_mismatch),
    ("label affine differs from image (10 mm shift)", affine_mismatch),
    ("label value 3", label_value_3),
    ("label with fractional values (0.5)", label_fractional),
    ("NaN in the image", nan_in_image),
    ("+inf in the image", inf_in_image),
    ("true 4-D image (8x8x4x2)", true_4d),
    ("2-D image", two_d),
    ("complex-valued image", complex_image),
    ("header with zero voxel size", zero_voxel_size),
    ("image without read permission", unreadable_file),
    ("empty data folder", empty_folder),
    ("missing data folder", missing_folder),
    ("data root is a file", root_is_a_file),
    ("image without label", image_without_label),
    ("label without image", label_without_image),
    ("same case name in two sub-folders", duplicate_case),
    ("Decathlon image with a second channel (_0001)", decathlon_second_channel),
    ("Decathlon label of other shape", decathlon_label_mismatch),
]


def _run_check(root, *extra):
  return subprocess.run([sys.executable, "-m", "munet_jax.data.check", root, *extra],
                        capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, "PYTHONPATH": REPO})


def _is_root():
  return hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  """Runs the real command on every bad input, two at a time (each start imports jax)."""
  jobs = {}
  for i, (what, build) in enumerate(BAD_INPUTS):
    if build is unreadable_file and _is_root():
      continue
    root, needle = build(str(tmp_path_factory.mktemp("bad") / f"case{i}"))
    jobs[what] = (root, needle)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    runs = dict(zip(jobs, pool.map(lambda job: _run_check(job[0]), jobs.values())))
  return {what: (jobs[what][1], runs[what]) for what in jobs}


@pytest.mark.parametrize("what", [what for what, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_naming_the_file(outcomes, what):
  if what not in outcomes:
    pytest.skip("running as root: file permissions do not stop reading")
  needle, run = outcomes[what]
  assert run.returncode == 2, run.stdout + run.stderr
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1, run.stderr
  assert lines[0].startswith("error: ")
  assert needle in lines[0]
  assert "Traceback" not in run.stderr and run.stdout == ""


def test_good_data_passes_with_a_summary_line(tmp_path):
  _good(str(tmp_path), 0)
  _good(str(tmp_path), 1)
  run = _run_check(str(tmp_path))
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip().startswith(f"{tmp_path}: 2 cases OK (2 labelled")
  assert run.stderr == ""


def test_debug_shows_the_traceback(tmp_path):
  root, _ = label_value_3(str(tmp_path))
  run = _run_check(root, "--debug")
  assert run.returncode != 0 and "Traceback" in run.stderr and "UserError" in run.stderr


def test_no_labels_mode_accepts_images_alone(tmp_path):
  _nii(os.path.join(str(tmp_path), "imagesTr", "a.nii.gz"), _image())
  summary = check.check_root(str(tmp_path), require_labels=False)
  assert (summary.cases, summary.labelled) == (1, 0)
