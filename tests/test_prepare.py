"""`python -m munet_jax.data.prepare ROOT` on bad inputs, as a real subprocess.

Each bad root holds one good case (volume-0) and one bad one (volume-1). The command must
exit 2 with one stderr line naming the file and no traceback, and leave no entry for the
bad case that looks complete.
"""

import concurrent.futures
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def _nii(path, data, affine=AFFINE):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(nib.Nifti1Image(data, affine), path)
  return path


def _label(shape=(8, 8, 4), value=1):
  data = np.zeros(shape, np.uint8)
  data[2:5, 2:5, 1:3] = value
  return data


def _good(root, n=0):
  _nii(os.path.join(root, f"volume-{n}.nii.gz"), np.full((8, 8, 4), -100, np.int16))
  _nii(os.path.join(root, f"segmentation-{n}.nii.gz"), _label())


def truncated_gz(root):
  _good(root)
  path = _nii(os.path.join(root, "volume-1.nii.gz"),
              np.arange(4096, dtype=np.int16).reshape(16, 16, 16))
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label((16, 16, 16)))
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  return "volume-1.nii.gz"


def label_value_3(root):
  _good(root)
  _nii(os.path.join(root, "volume-1.nii.gz"), np.zeros((8, 8, 4), np.int16))
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label(value=3))
  return "segmentation-1.nii.gz"


def nan_in_image(root):
  _good(root)
  data = np.zeros((8, 8, 4), np.float32)
  data[3, 3, 2] = np.nan
  _nii(os.path.join(root, "volume-1.nii.gz"), data)
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label())
  return "volume-1.nii.gz"


def shape_mismatch(root):
  _good(root)
  _nii(os.path.join(root, "volume-1.nii.gz"), np.zeros((8, 8, 4), np.int16))
  _nii(os.path.join(root, "segmentation-1.nii.gz"), _label((8, 8, 5)))
  return "segmentation-1.nii.gz"


def empty_folder(root):
  os.makedirs(root)
  return os.path.basename(root)


BAD = {"truncated .nii.gz": truncated_gz, "label value 3": label_value_3,
       "NaN in the image": nan_in_image, "label shape differs": shape_mismatch,
       "empty data folder": empty_folder}


def _prepare(root, *extra):
  return subprocess.run([sys.executable, "-m", "munet_jax.data.prepare", root, *extra],
                        capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, "PYTHONPATH": REPO})


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  jobs = {}
  for i, (what, build) in enumerate(BAD.items()):
    root = str(tmp_path_factory.mktemp("bad") / f"root{i}")
    jobs[what] = (root, build(root))
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    runs = dict(zip(jobs, pool.map(lambda job: _prepare(job[0]), jobs.values())))
  return {what: (jobs[what][0], jobs[what][1], runs[what]) for what in jobs}


def _complete_looking_entries(cache, name):
  """Entries of `name` a reader could take for prepared: in the index or a final folder."""
  found = []
  index = os.path.join(cache, "index.json")
  if os.path.exists(index):
    with open(index) as f:
      if name in json.load(f)["volumes"]:
        found.append(index)
  volumes = os.path.join(cache, "volumes")
  if os.path.isdir(volumes):
    found += [f for f in os.listdir(volumes) if f.startswith(name + "-") or f.startswith(".")]
  return found


@pytest.mark.parametrize("what", list(BAD))
def test_bad_input_exits_2_naming_the_file_and_stores_nothing_of_it(outcomes, what):
  root, needle, run = outcomes[what]
  assert run.returncode == 2, run.stdout + run.stderr
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], run.stderr
  assert "Traceback" not in run.stderr and run.stdout == ""
  assert _complete_looking_entries(os.path.join(root, ".munet_cache"), "volume-1") == []


def test_good_root_is_prepared_and_skip_bad_lists_the_bad_case(tmp_path):
  root = str(tmp_path / "data")
  _good(root, 0)
  _good(root, 2)
  label_value_3(root)
  run = _prepare(root, "--skip-bad", "--cache-dir", str(tmp_path / "cache"))
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip() == (f"{tmp_path / 'cache'}: 2 volumes, 8 slices (4 with liver, "
                                "0 with tumour), 1 skipped")
  [line] = run.stderr.strip().splitlines()
  assert line.startswith("skipped volume-1: ") and "segmentation-1.nii.gz" in line
  assert _complete_looking_entries(str(tmp_path / "cache"), "volume-1") == []
