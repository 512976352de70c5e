"""eval.py and predict.py end to end: outputs on the input's grid, results.json, bad input."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import REAL_CT, needs_real_ct
from munet_jax.data import nifti
from munet_jax.cli import run as run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CT = os.path.join(REAL_CT, "ct_abdomen_3mm.nii.gz")
sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))

from tiny_run import make_tiny_run, tiny_run_config  # noqa: E402


def _script(name):
  spec = importlib.util.spec_from_file_location(f"_{name}_cli", os.path.join(ROOT, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


EVAL, PREDICT = _script("eval"), _script("predict")


def _in_process(module, args, capsys):
  """Runs a CLI's main as `python NAME.py ARGS` would: (exit status, stdout, stderr)."""
  capsys.readouterr()
  status = run_cli(module.main, [str(a) for a in args])
  out, err = capsys.readouterr()
  return status, out, err


def _subprocess(name, *args, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, os.path.join(ROOT, f"{name}.py"), *map(str, args)],
                        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny training run (an untrained checkpoint) over a 4-case synthetic data root."""
  from munet_jax.data import synthetic
  base = tmp_path_factory.mktemp("run")
  data = base / "data"
  synthetic.write_dataset(str(data), 4, 32, seed=1, slices=5, progress=False)
  workdir = base / "work"
  make_tiny_run(str(workdir), str(data))
  return workdir, data


# ------------------------------------------------------------------------------ predict


def _grid(path):
  img = nib.load(str(path))
  return (img.shape, img.affine, nib.aff2axcodes(img.affine), img.header.get_qform(coded=True),
          img.header.get_sform(coded=True))


@needs_real_ct
def test_predict_on_the_real_ct_writes_labels_on_its_exact_grid(run, tmp_path):
  workdir, _ = run
  out = tmp_path / "pred" / "abdomen.nii.gz"
  proc = _subprocess("predict", "--workdir", workdir, "--input", CT, "--output", out)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == "" and str(out) in proc.stdout
  shape, affine, axcodes, (qform, qcode), (sform, scode) = _grid(out)
  ct_shape, ct_affine, ct_axcodes, (ct_qform, ct_qcode), (ct_sform, ct_scode) = _grid(CT)
  assert shape == ct_shape == (122, 101, 30)
  np.testing.assert_array_equal(affine, ct_affine)
  assert axcodes == ct_axcodes and (qcode, scode) == (ct_qcode, ct_scode)
  np.testing.assert_array_equal(sform, ct_sform)
  img = nib.load(str(out))
  assert img.get_data_dtype() == np.uint8
  assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1, 2}
  assert [f for f in os.listdir(out.parent)] == ["abdomen.nii.gz"]   # no temporary left


@pytest.mark.slow
@needs_real_ct
def test_predict_then_eval_pred_ref_chain(run, tmp_path):
  workdir, _ = run
  pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
  os.makedirs(ref_dir)
  shutil.copy(os.path.join(REAL_CT, "liver_mask_a.nii.gz"), ref_dir / "ct_abdomen_3mm.nii.gz")
  status = run_cli(PREDICT.main, ["--workdir", str(workdir), "--input", CT,
                                  "--output", str(pred_dir / "ct_abdomen_3mm.nii.gz")])
  assert status == 0
  out = tmp_path / "scores.json"
  proc = _subprocess("eval", "--pred", pred_dir, "--ref", ref_dir, "--out", out)
  assert proc.returncode == 0, proc.stderr
  assert "liver" in proc.stdout and "global Dice" in proc.stdout
  document = json.loads(out.read_text())
  assert [c["case"] for c in document["cases"]] == ["ct_abdomen_3mm"]
  from munet_jax.metrics import segmentation_metrics
  pred = nifti.read_label(str(pred_dir / "ct_abdomen_3mm.nii.gz"))
  ref = nifti.read_label(str(ref_dir / "ct_abdomen_3mm.nii.gz"))
  expected = segmentation_metrics(pred.data > 0, ref.data > 0, pred.spacing)
  got = document["cases"][0]["liver"]
  for key in ("dsc", "voe", "rvd"):
    assert got[key] == pytest.approx(expected[key], rel=1e-6)
  assert document["summary"]["liver"]["dsc"]["n"] == 1


@needs_real_ct
def test_predict_on_a_folder_handles_orientation_and_names(run, tmp_path, capsys):
  workdir, _ = run
  ct = nib.load(CT)
  data = np.asarray(ct.dataobj)
  os.makedirs(tmp_path / "in")
  shutil.copy(CT, tmp_path / "in" / "abd_0000.nii.gz")
  # The same scan stored LPS with slices running down: flipped axes, adjusted affine.
  flip = np.diag([-1, -1, -1, 1.0])
  flip[:3, 3] = np.array(data.shape) - 1
  lps = nib.Nifti1Image(data[::-1, ::-1, ::-1].copy(), ct.affine @ flip)
  nib.save(lps, str(tmp_path / "in" / "flipped.nii"))
  status, out, err = _in_process(PREDICT, ["--workdir", workdir, "--input", tmp_path / "in",
                                           "--output", tmp_path / "out"], capsys)
  assert status == 0, err
  assert sorted(os.listdir(tmp_path / "out")) == ["abd.nii.gz", "flipped.nii.gz"]
  a = nib.load(str(tmp_path / "out" / "abd.nii.gz"))
  b = nib.load(str(tmp_path / "out" / "flipped.nii.gz"))
  np.testing.assert_array_equal(b.affine, lps.affine)
  assert nib.aff2axcodes(b.affine) == ("L", "P", "I")
  # Same anatomy, same labels: the network saw both in RAS order.
  np.testing.assert_array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj)[::-1, ::-1, ::-1])


# --------------------------------------------------------------------------------- eval


@pytest.mark.slow
def test_eval_workdir_scores_the_test_split_and_writes_results(run):
  workdir, data = run
  proc = _subprocess("eval", "--workdir", workdir, "--overlays", "2")
  assert proc.returncode == 0, proc.stderr
  path = workdir / "eval" / "results.json"
  document = json.loads(path.read_text())
  from munet_jax.data.discovery import find_cases
  from munet_jax.data.splits import split_cases
  test = [c.name for c in split_cases(find_cases(str(data)), tiny_run_config(str(data)))["test"]]
  assert [c["case"] for c in document["cases"]] == test and len(test) == 2
  assert document["source"]["checkpoint_step"] == 1 and document["source"]["split"] == "test"
  assert "test split, 2 volumes" in proc.stdout and "DSC %" in proc.stdout
  assert "tumour detection" in proc.stdout
  pngs = os.listdir(workdir / "eval" / "overlays")
  assert len(pngs) == 4 and all(p.endswith(".png") for p in pngs)


def test_eval_workdir_other_data_root_and_split(run, tmp_path, capsys):
  workdir, data = run
  other = tmp_path / "other"
  shutil.copytree(data, other)
  status, out, err = _in_process(EVAL, ["--workdir", workdir, "--data", other, "--split", "all",
                                        "--out", tmp_path / "all.json",
                                        "--small-lesion-mm", "5", "--nsd-tolerance-mm", "3",
                                        "--metrics", "dsc,hd95,nsd"], capsys)
  assert status == 0, err
  document = json.loads((tmp_path / "all.json").read_text())
  assert [c["case"] for c in document["cases"]] == [f"volume-{i}" for i in range(4)]
  assert document["source"]["data"] == str(other)
  assert document["lesion_detection"]["small_area_mm2"] == 25.0
  assert "small: largest axial area < 5 x 5 mm²" in out
  assert "all split, 4 volumes" in out
  assert document["source"]["nsd_tolerance_mm"] == 3.0
  head = next(line for line in out.splitlines() if "DSC %" in line)
  assert head.split() == ["DSC", "%", "HD95", "mm", "NSD", "%", "n"]
  assert all({"hd95", "nsd"} <= set(c["liver"]) for c in document["cases"])


def test_a_damaged_newest_checkpoint_falls_back_with_a_one_line_warning(tmp_path, caplog):
  from munet_jax.checkpoints import load_variables
  workdir = tmp_path / "w"
  make_tiny_run(str(workdir), steps=(1, 2))
  _damage(workdir / "checkpoints" / "2")
  _, _, step = load_variables(str(workdir))
  assert step == 1
  warnings = [r.getMessage() for r in caplog.records
              if r.name == "munet_jax.checkpoints"]
  assert len(warnings) == 1 and "checkpoints/2 is damaged" in warnings[0]
  assert "\n" not in warnings[0] and len(warnings[0]) <= 200 + len(str(workdir))


def _damage(step_dir):
  for folder, _, files in os.walk(step_dir / "state"):
    for f in files:
      if "/d" in folder or f == "manifest.ocdbt":
        with open(os.path.join(folder, f), "r+b") as fh:
          fh.truncate(8)


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
  """A folder of broken inputs, and a damaged run."""
  t = tmp_path_factory.mktemp("bad")
  ref = np.zeros((6, 6, 4), np.uint8)
  nifti.write_image(str(t / "ref" / "a.nii.gz"), ref, np.eye(4))
  nifti.write_image(str(t / "pred" / "a.nii.gz"), ref, np.eye(4))
  nifti.write_image(str(t / "pred" / "b.nii.gz"), ref, np.eye(4))         # no reference
  nifti.write_image(str(t / "grid" / "a.nii.gz"), np.zeros((6, 6, 5), np.uint8), np.eye(4))
  nifti.write_image(str(t / "range" / "a.nii.gz"), ref + 5, np.eye(4))
  nifti.write_image(str(t / "fourd" / "a.nii.gz"), np.zeros((6, 6, 4, 2), np.uint8), np.eye(4))
  os.makedirs(t / "junk")
  (t / "junk" / "a.nii.gz").write_bytes(b"this is not a NIfTI file at all")
  nan = np.zeros((6, 6, 4), np.float32)
  nan[1, 1, 1] = np.nan
  nifti.write_image(str(t / "nan.nii.gz"), nan, np.eye(4))
  damaged = t / "damaged"
  make_tiny_run(str(damaged))
  _damage(damaged / "checkpoints" / "1")
  return t


EVAL_BAD = [
    ([], "give either"),
    (["--workdir", "{run}", "--pred", "{t}/pred"], "give either"),
    (["--workdir", "{t}/nowhere"], "nowhere: no checkpoints folder"),
    (["--workdir", "{t}/damaged"], "every checkpoint is damaged"),
    (["--workdir", "{run}", "--data", "{t}/nodata"], "nodata: data folder not found"),
    (["--workdir", "{run}", "--which", "newest"], "--which: invalid choice"),
    (["--workdir", "{run}", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--workdir", "{run}", "--ref", "{t}/ref"], "--ref goes with --pred"),
    (["--workdir", "{run}", "--overlays", "-1"], "--overlays must be >= 0"),
    (["--workdir", "{run}", "--metrics", "dsc,hd99"], "--metrics: unknown metric(s) hd99"),
    (["--workdir", "{run}", "--nsd-tolerance-mm", "-1"], "--nsd-tolerance-mm must be"),
    (["--pred", "{t}/pred", "--ref", "{t}/ref"], "needs --ref R and --out"),
    (["--pred", "{t}/pred", "--ref", "{t}/ref", "--out", "{t}/o.txt"], "o.txt: --out must be"),
    (["--pred", "{t}/pred", "--ref", "{t}/ref", "--out", "{t}/o.json", "--split", "val"],
     "--split goes with --workdir"),
    (["--pred", "{t}/pred", "--ref", "{t}/ref", "--out", "{t}/o.json"],
     "b.nii.gz: no reference file"),
    (["--pred", "{t}/grid", "--ref", "{t}/ref", "--out", "{t}/o.json"], "prediction shape"),
    (["--pred", "{t}/range", "--ref", "{t}/ref", "--out", "{t}/o.json"], "label values must be"),
    (["--pred", "{t}/fourd", "--ref", "{t}/ref", "--out", "{t}/o.json"], "expected a 3-D volume"),
    (["--pred", "{t}/junk", "--ref", "{t}/ref", "--out", "{t}/o.json"], "not a readable NIfTI"),
    (["--pred", "{t}/nope", "--ref", "{t}/ref", "--out", "{t}/o.json"], "nope: --pred not found"),
]

PREDICT_BAD = [
    (["--workdir", "{run}", "--input", "{t}/none.nii.gz", "--output", "{t}/o.nii.gz"],
     "none.nii.gz: --input not found"),
    (["--workdir", "{run}", "--input", "{t}/nan.nii.gz", "--output", "{t}/o.nii.gz"],
     "nan.nii.gz: image holds 1 NaN"),
    (["--workdir", "{run}", "--input", "{t}/fourd/a.nii.gz", "--output", "{t}/o.nii.gz"],
     "expected a 3-D volume"),
    (["--workdir", "{run}", "--input", "{t}/junk/a.nii.gz", "--output", "{t}/o.nii.gz"],
     "not a readable NIfTI"),
    (["--workdir", "{t}/damaged", "--input", "{t}/nan.nii.gz", "--output", "{t}/o.nii.gz"],
     "every checkpoint is damaged"),
    (["--workdir", "{run}", "--input", "{t}/nan.nii.gz", "--output", "{t}/nan.nii.gz"],
     "overwrite an input"),
    (["--workdir", "{run}", "--input", "{t}/nan.nii.gz"], "--output"),
    (["--workdir", "{run}", "--input", CT, "--output", "{t}/o.nii.gz", "--batch-size", "0"],
     "--batch-size must be >= 1"),
]


def _fill(args, run, t):
  return [a.format(run=run[0], t=t) for a in args]


@pytest.mark.parametrize("args, message", EVAL_BAD)
def test_eval_bad_input_is_one_line_and_status_2(run, bad_files, capsys, args, message):
  status, out, err = _in_process(EVAL, _fill(args, run, bad_files), capsys)
  assert status == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
  assert not (bad_files / "o.json").exists()


@pytest.mark.parametrize("args, message", PREDICT_BAD)
def test_predict_bad_input_is_one_line_and_status_2(run, bad_files, capsys, args, message):
  status, out, err = _in_process(PREDICT, _fill(args, run, bad_files), capsys)
  assert status == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
  assert not (bad_files / "o.nii.gz").exists()


@pytest.mark.parametrize("name, args", [
    ("eval", ["--workdir", "{t}/damaged"]),
    ("predict", ["--workdir", "{run}", "--input", "{t}/junk/a.nii.gz", "--output",
                 "{t}/o.nii.gz"]),
])
def test_bad_input_in_a_real_process_prints_no_traceback(run, bad_files, name, args):
  proc = _subprocess(name, *_fill(args, run, bad_files))
  assert proc.returncode == 2
  assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, \
      proc.stderr
