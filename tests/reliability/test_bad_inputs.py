"""Bad inputs to train.py (config and flags), eval.py, predict.py and the data preparer.

Every case runs the tool's `main` in a process of its own and must end with exit status
2, exactly one stderr line `error: ...` naming the file or the config key, and no
traceback. The processes are forked, two at a time, from one that imported the tools
once (forked_tools.py: the imports are most of a bad-input run's seconds); the other
fault tests start `train.py` and the rest from the command line. Cases fail before any
model work where the tool can tell (flags, config, paths); the rest load the tiny
reference run's checkpoint. One module fixture runs them all; each test reads its
outcome.

Not repeated here: the 23 bad data roots of `tests/test_check.py` (through
`munet_jax.data.check`), and the in-process eval.py / predict.py cases of
`tests/test_cli_eval_predict.py`; the damaged checkpoints are in
`test_damaged_checkpoint.py`, a broken volume in training data in `test_skip_bad.py`.
"""

import gzip
import json
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

import harness

pytestmark = pytest.mark.slow

# (id, tool, arguments, what the one stderr line must hold). In arguments and needles
# {t} is the folder of bad files, {run} the reference run, {data} its data root,
# {config} its config file and {w} a workdir of the case's own (two cases run at once, and
# a trainer that gets as far as locking its workdir would refuse the other).
CASES = [
    # ---- train.py: the config file
    ("config file missing", "train", ["--config", "{t}/nope.py", "--workdir", "{w}"],
     ["{t}/nope.py", "config file not found"]),
    ("config file with a syntax error", "train",
     ["--config", "{t}/syntax.py", "--workdir", "{w}"], ["{t}/syntax.py", "SyntaxError"]),
    ("config file without get_config", "train",
     ["--config", "{t}/noget.py", "--workdir", "{w}"], ["{t}/noget.py", "get_config"]),
    ("get_config returns None", "train", ["--config", "{t}/none.py", "--workdir", "{w}"],
     ["{t}/none.py", "ConfigDict", "NoneType"]),
    ("config file imports a missing module", "train",
     ["--config", "{t}/imports.py", "--workdir", "{w}"],
     ["{t}/imports.py", "no_such_module"]),
    ("unknown key in the config file", "train",
     ["--config", "{t}/unknown.py", "--workdir", "{w}"],
     ["config key 'train.stepz' is unknown"]),
    ("wrong type in the config file", "train",
     ["--config", "{t}/wrongtype.py", "--workdir", "{w}"], ["{t}/wrongtype.py", "steps"]),
    ("bad value in the config file", "train",
     ["--config", "{t}/badvalue.py", "--workdir", "{w}"],
     ["config key 'model.dropout_rate'", "[0, 1)"]),
    # ---- train.py: overrides and flags
    ("override of an unknown key", "train",
     ["--config", "{config}", "--workdir", "{w}", "--config.model.widths=3"],
     ["config key 'model.widths' is unknown"]),
    ("override of an unknown section", "train",
     ["--config", "{config}", "--workdir", "{w}", "--config.optim.lr=0.1"],
     ["config key 'optim.lr' is unknown"]),
    ("override of the wrong type", "train",
     ["--config", "{config}", "--workdir", "{w}", "--config.train.batch_size=abc"],
     ["config key 'train.batch_size' must be int"]),
    ("override of a bool with a word", "train",
     ["--config", "{config}", "--workdir", "{w}", "--config.data.skip_bad=maybe"],
     ["config key 'data.skip_bad' must be bool"]),
    ("negative learning rate", "train",
     ["--config", "{config}", "--workdir", "{w}", "--config.train.learning_rate=-1"],
     ["config key 'train.learning_rate' must be positive"]),
    ("unknown loss", "train",
     ["--config", "{config}", "--workdir", "{w}", "--config.train.loss=hinge"],
     ["config key 'train.loss' must be one of"]),
    ("HU window upside down", "train",
     ["--config", "{config}", "--workdir", "{w}", "--config.data.hu_window=(250,-250)"],
     ["config key 'data.hu_window'"]),
    ("override without a value", "train",
     ["--config", "{config}", "--workdir", "{w}", "--config.train.steps"],
     ["'train.steps'", "KEY=VALUE"]),
    ("unknown flag", "train", ["--config", "{config}", "--workdir", "{w}", "--frobnicate"],
     ["train.py", "--frobnicate"]),
    ("no --workdir", "train", ["--config", "{config}"], ["train.py", "--workdir"]),
    ("multi-host flags incomplete", "train",
     ["--config", "{config}", "--workdir", "{w}", "--num-processes", "2"],
     ["--coordinator, --num-processes and --process-id"]),
    ("--workdir is a file", "train", ["--config", "{config}", "--workdir", "{t}/afile"],
     ["{t}/afile", "must be a folder"]),
    ("--workdir below a file", "train",
     ["--config", "{config}", "--workdir", "{t}/afile/run"], ["{t}/afile/run", "cannot create"]),
    # ---- train.py: the data the config points at
    ("data folder missing", "train",
     ["--config", "{config}", "--workdir", "{w}", "--config.data.root={t}/nodata",
      "--config.data.synthetic.cases=0"], ["{t}/nodata", "data folder not found"]),
    ("data folder empty", "train",
     ["--config", "{config}", "--workdir", "{w}", "--config.data.root={t}/empty",
      "--config.data.synthetic.cases=0"], ["{t}/empty", "no CT volumes found"]),
    ("split asks for more cases than there are", "train",
     ["--config", "{config}", "--workdir", "{w}", "--config.data.num_train=10"],
     ["data.num_train/num_val/num_test", "{data}"]),
    ("split names a case not in the data", "train",
     ["--config", "{config}", "--workdir", "{w}", "--config.data.train_cases=('volume-9',)"],
     ["config key 'data.train_cases'", "volume-9"]),
    ("split leaves no training case", "train",
     ["--config", "{config}", "--workdir", "{w}", "--config.data.num_train=0"],
     ["{data}", "no training case"]),
    ("label value 3 in the training data", "train",
     ["--config", "{config}", "--workdir", "{w}", "--config.data.root={t}/badlabels"],
     ["{t}/badlabels/segmentation-2.nii.gz", "label values must be 0, 1 or 2"]),
    ("resume with another model's config", "train",
     ["--config", "{config}", "--workdir", "{t}/resume", "--config.model.features=(8,16)"],
     ["{t}/resume/checkpoints", "config key 'model.features'", "another model"]),
    # ---- eval.py
    ("eval: the split has no case", "eval", ["--workdir", "{run}", "--split", "test"],
     ["{data}", "'test' split", "has no case"]),
    ("eval: a bad label file in --data", "eval",
     ["--workdir", "{run}", "--data", "{t}/badlabels", "--split", "all"],
     ["{t}/badlabels/segmentation-2.nii.gz", "label values"]),
    ("eval: no complete checkpoint", "eval", ["--workdir", "{t}/unsaved"],
     ["{t}/unsaved/checkpoints", "no complete checkpoint"]),
    ("eval: --batch-size 0", "eval", ["--workdir", "{run}", "--batch-size", "0"],
     ["--batch-size must be >= 1"]),
    ("eval: --pred a file, --ref a folder", "eval",
     ["--pred", "{t}/pred/volume-0.nii.gz", "--ref", "{t}/ref", "--out", "{t}/o.json"],
     ["{t}/pred/volume-0.nii.gz", "two files or two folders"]),
    ("eval: two reference files for one case", "eval",
     ["--pred", "{t}/pred", "--ref", "{t}/refdup", "--out", "{t}/o.json"],
     ["{t}/refdup/volume-0.nii", "two reference files"]),
    ("eval: prediction on another grid", "eval",
     ["--pred", "{t}/shifted", "--ref", "{t}/ref", "--out", "{t}/o.json"],
     ["{t}/shifted/volume-0.nii.gz", "affine differs"]),
    ("eval: empty --pred folder", "eval",
     ["--pred", "{t}/empty", "--ref", "{t}/ref", "--out", "{t}/o.json"],
     ["{t}/empty", "no NIfTI files"]),
    ("eval: --out below a file", "eval",
     ["--pred", "{t}/pred", "--ref", "{t}/ref", "--out", "{t}/afile/o.json"],
     ["{t}/afile/o.json", "cannot write"]),
    ("eval: negative --small-lesion-mm", "eval",
     ["--pred", "{t}/pred", "--ref", "{t}/ref", "--out", "{t}/o.json",
      "--small-lesion-mm", "-1"], ["--small-lesion-mm must be positive"]),
    ("eval: --images folder missing", "eval",
     ["--pred", "{t}/pred", "--ref", "{t}/ref", "--out", "{t}/o.json", "--overlays", "1",
      "--images", "{t}/noimages"], ["{t}/noimages", "--images folder not found"]),
    # ---- predict.py
    ("predict: input not NIfTI", "predict",
     ["--workdir", "{run}", "--input", "{t}/notes.txt", "--output", "{t}/o.nii.gz"],
     ["{t}/notes.txt", "must be a .nii or .nii.gz"]),
    ("predict: input folder without NIfTI", "predict",
     ["--workdir", "{run}", "--input", "{t}/empty", "--output", "{t}/out"],
     ["{t}/empty", "no NIfTI files"]),
    ("predict: folder in, a file out", "predict",
     ["--workdir", "{run}", "--input", "{t}/pred", "--output", "{t}/afile"],
     ["{t}/afile", "must be a folder"]),
    ("predict: output name not NIfTI", "predict",
     ["--workdir", "{run}", "--input", "{data}/volume-0.nii.gz", "--output", "{t}/o.png"],
     ["{t}/o.png", "must end in .nii or .nii.gz"]),
    ("predict: a second CT channel", "predict",
     ["--workdir", "{run}", "--input", "{t}/channels", "--output", "{t}/out"],
     ["{t}/channels/ct_0001.nii.gz", "single-channel"]),
    ("predict: 2-D input", "predict",
     ["--workdir", "{run}", "--input", "{t}/flat.nii.gz", "--output", "{t}/o.nii.gz"],
     ["{t}/flat.nii.gz", "is 2-D"]),
    ("predict: complex-valued input", "predict",
     ["--workdir", "{run}", "--input", "{t}/complex.nii.gz", "--output", "{t}/o.nii.gz"],
     ["{t}/complex.nii.gz", "complex64"]),
    ("predict: truncated input", "predict",
     ["--workdir", "{run}", "--input", "{t}/cut.nii.gz", "--output", "{t}/o.nii.gz"],
     ["{t}/cut.nii.gz", "truncated"]),
    ("predict: zero voxel size", "predict",
     ["--workdir", "{run}", "--input", "{t}/pixdim0.nii", "--output", "{t}/o.nii.gz"],
     ["{t}/pixdim0.nii", "pixdim"]),
    ("predict: output below a file", "predict",
     ["--workdir", "{run}", "--input", "{data}/volume-0.nii.gz", "--output",
      "{t}/afile/o.nii.gz"], ["{t}/afile/o.nii.gz", "cannot write"]),
    ("predict: --workdir with no run", "predict",
     ["--workdir", "{t}/nowhere", "--input", "{data}/volume-0.nii.gz", "--output",
      "{t}/o.nii.gz"], ["{t}/nowhere", "no checkpoints folder"]),
    ("predict: --which newest", "predict",
     ["--workdir", "{run}", "--input", "{data}/volume-0.nii.gz", "--output", "{t}/o.nii.gz",
      "--which", "newest"], ["--which", "invalid choice"]),
    # ---- the data preparer
    ("prepare: data folder missing", "prepare", ["{t}/nodata"],
     ["{t}/nodata", "data folder not found"]),
    ("prepare: store folder below a file", "prepare",
     ["{data}", "--cache-dir", "{t}/afile/cache"], ["{t}/afile/cache", "cannot create"]),
    ("prepare: every case bad, --skip-bad", "prepare",
     ["{t}/allbad", "--skip-bad", "--cache-dir", "{t}/allbad-cache"],
     ["{t}/allbad", "every case is bad"]),
]

CONFIG_FILES = {
    "syntax.py": "def get_config(:\n  pass\n",
    "noget.py": "seed = 1\n",
    "none.py": "def get_config():\n  return None\n",
    "imports.py": "import no_such_module\n\ndef get_config():\n  return None\n",
    "unknown.py": ("from munet_jax.config import base_config\n\ndef get_config():\n"
                   "  c = base_config()\n  c.train.stepz = 3\n  return c\n"),
    "wrongtype.py": ("from munet_jax.config import base_config\n\ndef get_config():\n"
                     "  c = base_config()\n  c.train.steps = 'ten'\n  return c\n"),
    "badvalue.py": ("from munet_jax.config import base_config\n\ndef get_config():\n"
                    "  c = base_config()\n  c.model.dropout_rate = 1.5\n  return c\n"),
}


def _bad_files(t, data_root, reference_workdir):
  """Writes every bad input of CASES into `t`."""
  for name, text in CONFIG_FILES.items():
    (t / name).write_text(text)
  (t / "afile").write_text("a file, not a folder\n")
  (t / "notes.txt").write_text("not a CT\n")
  os.makedirs(t / "empty")
  # Three good cases; the third's label holds a 3.
  os.makedirs(t / "badlabels")
  for n in range(3):
    shutil.copy(os.path.join(data_root, f"volume-{n}.nii.gz"), t / "badlabels")
    shutil.copy(os.path.join(data_root, f"segmentation-{n}.nii.gz"), t / "badlabels")
  img = nib.load(str(t / "badlabels" / "segmentation-2.nii.gz"))
  data = np.asarray(img.dataobj).copy()
  data[0, 0, 0] = 3
  os.remove(t / "badlabels" / "segmentation-2.nii.gz")
  nib.save(nib.Nifti1Image(data, img.affine, img.header), str(t / "badlabels" / "segmentation-2.nii.gz"))
  # Every case bad: a label without its image's shape.
  os.makedirs(t / "allbad")
  shutil.copy(os.path.join(data_root, "volume-0.nii.gz"), t / "allbad")
  nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), img.affine),
           str(t / "allbad" / "segmentation-0.nii.gz"))
  # Label folders for eval.py --pred / --ref.
  for folder in ("pred", "ref", "refdup", "shifted"):
    os.makedirs(t / folder)
  label = os.path.join(data_root, "segmentation-0.nii.gz")
  for folder in ("pred", "ref", "refdup"):
    shutil.copy(label, t / folder / "volume-0.nii.gz")
  nib.save(nib.load(label), str(t / "refdup" / "volume-0.nii"))
  shifted = img.affine.copy()
  shifted[2, 3] += 5.0
  nib.save(nib.Nifti1Image(np.asarray(nib.load(label).dataobj), shifted),
           str(t / "shifted" / "volume-0.nii.gz"))
  # CT inputs for predict.py.
  os.makedirs(t / "channels")
  for channel in ("0000", "0001"):
    shutil.copy(os.path.join(data_root, "volume-0.nii.gz"), t / "channels" / f"ct_{channel}.nii.gz")
  nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), str(t / "flat.nii.gz"))
  nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.complex64), np.eye(4)),
           str(t / "complex.nii.gz"))
  with gzip.open(os.path.join(data_root, "volume-0.nii.gz")) as f:
    raw = f.read()
  with gzip.open(t / "cut.nii.gz", "wb") as f:
    f.write(raw[: len(raw) // 2])
  zero = nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), None)
  zero.header.set_zooms((0.0, 0.0, 0.0))
  nib.save(zero, str(t / "pixdim0.nii"))
  # A run killed during its first save: a checkpoints folder with no complete checkpoint.
  os.makedirs(t / "unsaved" / "checkpoints" / f"2{harness.ORBAX_TMP}")
  # A run to resume with another model's config.
  os.makedirs(t / "resume")
  shutil.copytree(harness.checkpoint_dir(reference_workdir), t / "resume" / "checkpoints")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, data_root, tiny_config, reference_run):
  """{case: (exit status, stderr, needles)}, made once per session (all xdist workers)."""
  def make(t):
    _bad_files(t, data_root, reference_run[0])
    fill = dict(t=str(t), run=reference_run[0], data=data_root, config=tiny_config)

    fills = [dict(fill, w=str(t / "w" / str(i))) for i in range(len(CASES))]
    runs = harness.run_forked([(tool, [a.format(**f) for a in args])
                               for (_, tool, args, _), f in zip(CASES, fills)], str(t))
    done = {what: [r.returncode, r.stderr, [n.format(**f) for n in needles]]
            for (what, _, _, needles), r, f in zip(CASES, runs, fills)}
    (t / "outcomes.json").write_text(json.dumps(done))

  t = harness.shared(tmp_path_factory, "bad-inputs", make)
  return t, json.loads((t / "outcomes.json").read_text())


def test_at_least_30_distinct_bad_inputs():
  assert len({c[0] for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("what", [c[0] for c in CASES])
def test_bad_input_is_exit_2_one_line_naming_it_no_traceback(outcomes, what):
  t, done = outcomes
  returncode, stderr, needles = done[what]
  harness.assert_one_error_line(subprocess.CompletedProcess([], returncode, "", stderr),
                                *needles)
  assert not (t / "o.json").exists() and not (t / "o.nii.gz").exists()
  assert not (t / "out").exists() and not list(t.glob("w/*/checkpoints"))
