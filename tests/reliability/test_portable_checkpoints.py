"""A run trained on any number of devices or processes is used on any other number.

Each case trains the tiny run with train.py on forced host devices (or in two processes),
then reads its checkpoint on another device count with predict.py, eval.py and
`munet_jax.load`: the variables are the checkpoint's, bitwise; the labels are those of
the same variables segmented on one device; and eval.py's table is the trainer's own
final evaluation of the same checkpoint, number for number.
"""

import json
import os
import socket

import numpy as np
import pytest

import harness

pytestmark = pytest.mark.slow

STEPS = 2   # the run's last checkpoint is what the trainer evaluates at the end

# (how the run trains, the device count that reads it): one device read on many, many
# read on one, two processes (a cluster run) read on one device. The trajectory on other
# device counts, resumes included, is tests/test_training.py's.
CASES = [("1", 8), ("4", 1), ("2 processes", 1)]


def _devices(n) -> dict:
  return {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("trained_on, read_on", CASES)
def test_a_checkpoint_is_read_on_another_device_count(tmp_path, tiny_config, data_root,
                                                      trained_on, read_on):
  workdir = tmp_path / "run"
  args = ("--config", tiny_config, "--workdir", workdir, f"--config.train.steps={STEPS}")
  if trained_on == "2 processes":
    coordinator = f"localhost:{_free_port()}"
    procs = [harness.start("train", *args, "--coordinator", coordinator, "--num-processes",
                           "2", "--process-id", str(i)) for i in range(2)]
    for proc in procs:
      done = harness.finish(proc)
      assert done.returncode == 0, done.stderr[-3000:]
  else:
    done = harness.run("train", *args, **_devices(trained_on))
    assert done.returncode == 0, done.stderr[-3000:]
  assert harness.complete_steps(workdir) == [STEPS]

  # munet_jax.load in this process (one device): the checkpoint's arrays, bitwise.
  import jax
  import munet_jax
  from munet_jax.data import nifti
  from munet_jax.inference import VolumeSegmenter
  config, variables = munet_jax.load(str(workdir))
  _, saved, _ = harness.saved_state(workdir)
  saved = dict(saved)
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    key = "/".join(str(getattr(k, "key", k)) for k in path)
    assert np.asarray(leaf).tobytes() == saved[key].tobytes(), key

  # predict.py on another device count: the labels of one-device inference.
  image = os.path.join(data_root, "volume-1.nii.gz")
  out = tmp_path / "labels.nii.gz"
  predicted = harness.run("predict", "--workdir", workdir, "--input", image, "--output", out,
                          **_devices(read_on))
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  ct = nifti.read_image(image)
  expected = nifti.from_ras(VolumeSegmenter(variables, config)(
      nifti.to_ras(ct.data, ct.affine)), ct.affine)
  np.testing.assert_array_equal(nifti.read_label(str(out), like=ct).data, expected)

  # eval.py on another device count: the trainer's final table of the same checkpoint,
  # written where eval.py writes it.
  trainer = json.load(open(workdir / "eval" / "results-val.json"))
  evaluated = harness.run("eval", "--workdir", workdir, "--split", "val", **_devices(read_on))
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  tool = json.load(open(workdir / "eval" / "results-val.json"))
  assert trainer["source"]["checkpoint_step"] == tool["source"]["checkpoint_step"] == STEPS
  for document in (trainer, tool):
    document.pop("source")
  assert tool == trainer
