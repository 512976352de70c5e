"""A full or read-only disk under every tool that writes: one line, exit 2, nothing lost.

Each test mounts a small tmpfs (a real file system that fills up) where the tool writes:
checkpoints, the trainer's lock and metrics, synthetic data, the slice store,
predictions, results. The tool must end with exit status 2 and one stderr line naming
the path and what it was writing, leave what was already there whole and no temporary
debris, and a rerun once space is free must go on from what is intact.
"""

import os

import pytest

import harness

pytestmark = pytest.mark.slow

# One checkpoint of the tiny run is about 340 KiB on tmpfs: 500 KiB hold the first
# (step 2), not the second.
ONE_CHECKPOINT = "500k"


@pytest.fixture
def small_fs(tmp_path):
  mounted = []

  def make(size):
    fs = harness.SmallFileSystem(tmp_path / f"fs{len(mounted)}", size).mount()
    mounted.append(fs)
    return fs

  yield make
  for fs in mounted:
    fs.unmount()


def _debris(folder) -> list[str]:
  """Temporary names any of the tools use, anywhere below `folder`."""
  found = []
  for parent, dirs, files in os.walk(folder):
    for name in dirs + files:
      if (harness.ORBAX_TMP in name or name.endswith(".tmp") or ".tmp." in name
          or "synthetic-tmp" in name or name.startswith(".tmp-")):
        found.append(os.path.relpath(os.path.join(parent, name), folder))
  return found


def test_a_checkpoint_that_does_not_fit_ends_in_one_line_and_the_rerun_resumes(
    small_fs, tiny_config, reference_run):
  fs = small_fs(ONE_CHECKPOINT)
  workdir = os.path.join(fs.folder, "run")
  result = harness.run("train", "--config", tiny_config, "--workdir", workdir)
  harness.assert_one_message(
      result, f"{workdir}/checkpoints: cannot write the checkpoint of step 4 (No space left "
      "on device); checkpoint 2 is intact")
  assert harness.complete_steps(workdir) == [2]
  assert harness.temporary_saves(workdir) == [] and _debris(workdir) == []
  fs.remount("size=16m")   # space freed
  rerun = harness.run("train", "--config", tiny_config, "--workdir", workdir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert harness.resumed_from(rerun.stdout) == 2
  harness.assert_same_state(workdir, reference_run[0])


def test_a_read_only_workdir_ends_in_one_line_naming_it(small_fs, tiny_config, reference_run):
  fs = small_fs("16m")
  workdir = os.path.join(fs.folder, "run")
  os.makedirs(workdir)
  fs.remount("ro")
  result = harness.run("train", "--config", tiny_config, "--workdir", workdir)
  harness.assert_one_error_line(result, f"{workdir}: --workdir is not writable")


def test_a_full_disk_under_the_metrics_ends_in_one_line(small_fs, tiny_config):
  fs = small_fs("16m")
  workdir = os.path.join(fs.folder, "run")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write('{"step": 0}\n')                     # an earlier row, to be kept
  fs.fill()
  result = harness.run("train", "--config", tiny_config, "--workdir", workdir)
  line = harness.assert_one_message(result, "No space left on device")
  assert fs.folder in line and "cannot write" in line
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert f.read().startswith('{"step": 0}\n')
  assert _debris(workdir) == []


def test_synthetic_data_that_does_not_fit_leaves_no_half_data_set(small_fs, tmp_path):
  fs = small_fs("16k")   # four pages: fewer than the data set's seven files
  root = os.path.join(fs.folder, "data")
  config = harness.write_config(tmp_path, root)
  result = harness.run("train", "--config", config, "--workdir", tmp_path / "run")
  harness.assert_one_message(result, f"{root}: cannot write the synthetic data set "
                             "(No space left on device)")
  assert os.listdir(fs.folder) == [] or not os.path.exists(root) or os.listdir(root) == []
  assert _debris(fs.folder) == []


def test_a_slice_store_that_does_not_fit_ends_in_one_line(small_fs, tmp_path, data_root):
  fs = small_fs("64k")
  cache = os.path.join(fs.folder, "cache")
  config = harness.write_config(tmp_path, data_root)
  result = harness.run("train", "--config", config, "--workdir", tmp_path / "run",
                       f"--config.data.cache_dir={cache}")
  harness.assert_one_message(result, f"{cache}: cannot write the slice store of volume-",
                             "No space left on device")
  assert _debris(fs.folder) == []


def test_predictions_and_results_on_a_full_disk_end_in_one_line(small_fs, reference_run,
                                                                 data_root):
  fs = small_fs("64k")
  fs.fill()
  image = os.path.join(data_root, "volume-1.nii.gz")
  out = os.path.join(fs.folder, "labels.nii.gz")
  predicted = harness.run("predict", "--workdir", reference_run[0], "--input", image,
                          "--output", out)
  harness.assert_one_message(predicted, out, "No space left on device")
  results = os.path.join(fs.folder, "results.json")
  scored = harness.run("eval", "--workdir", reference_run[0], "--split", "val", "--out", results)
  harness.assert_one_message(scored, results, "No space left on device")
  assert sorted(os.listdir(fs.folder)) == ["filler"]
