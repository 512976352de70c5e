"""A data folder with one broken volume among good ones, through train.py.

By default the run stops before any training with one line naming the broken file; with
`--skip-bad` it trains without that case and says so: a stderr line when it starts, a
line under the final table, and the case and reason in results.json's "source".
"""

import gzip
import os
import shutil

import pytest

import harness

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def broken_root(tmp_path_factory, data_root):
  """The three good synthetic cases and volume-3, whose CT file is cut short."""
  root = tmp_path_factory.mktemp("broken") / "data"
  os.makedirs(root)
  for n in range(3):
    for kind in ("volume", "segmentation"):
      shutil.copy(os.path.join(data_root, f"{kind}-{n}.nii.gz"), root)
  shutil.copy(os.path.join(data_root, "segmentation-0.nii.gz"), root / "segmentation-3.nii.gz")
  with gzip.open(os.path.join(data_root, "volume-0.nii.gz")) as f:
    raw = f.read()
  with gzip.open(root / "volume-3.nii.gz", "wb") as f:
    f.write(raw[: len(raw) // 2])           # a download cut off half-way
  return root


def _args(tmp_path, root, *extra):
  config = harness.write_config(tmp_path, root, steps=2)
  # All four cases are in the split: three to train on, one to validate.
  return ("--config", config, "--workdir", tmp_path / "run", "--config.data.num_train=3",
          *extra)


def test_a_broken_volume_stops_the_run_before_training_naming_it(tmp_path, broken_root):
  result = harness.run("train", *_args(tmp_path, broken_root))
  line = harness.assert_one_error_line(result, str(broken_root / "volume-3.nii.gz"))
  assert "truncated" in line, line
  assert harness.complete_steps(tmp_path / "run") == []
  assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_skip_bad_trains_without_it_and_the_report_lists_it(tmp_path, broken_root):
  result = harness.run("train", *_args(tmp_path, broken_root, "--skip-bad"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  [line] = [l for l in harness.stderr_lines(result.stderr) if l.startswith("skipped")]
  assert line.startswith("skipped volume-3: ") and "volume-3.nii.gz" in line, line
  assert "skipped as bad (1, not trained on or scored): volume-3" in result.stdout
  assert harness.complete_steps(tmp_path / "run")[-1] == 2
  document = harness.read_json(tmp_path / "run" / "eval" / "results-val.json")
  [skipped] = document["source"]["skipped"]
  assert skipped["case"] == "volume-3" and "volume-3.nii.gz" in skipped["reason"]
  assert "volume-3" not in [c["case"] for c in document["cases"]]
  assert document["source"]["checkpoint_step"] == 2
