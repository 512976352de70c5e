"""train.py end to end, as a real process: a whole run's outputs, bad flags, a diverging loss.

Each run trains a two-stage mU-Net of widths 4/8 on three 32x32 synthetic volumes; the
compile dominates, so a run takes about ten seconds.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from reliability.harness import write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  """Synthetic data and its slice store, made once for every run of this module."""
  root = tmp_path_factory.mktemp("data")
  from munet_jax.data import synthetic
  synthetic.write_dataset(str(root), 3, 32, seed=0, slices=6, progress=False)
  return str(root)


def _config(tmp_path, data_root, steps=8):
  """The reliability suite's tiny config (mU-Net widths 4/8, 32x32 slices, batch 3)."""
  return write_config(tmp_path, data_root, steps=steps, name=f"config_{steps}.py")


def _train(config, workdir, *extra, **popen):
  cmd = [sys.executable, TRAIN, "--config", config, "--workdir", str(workdir), *extra]
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT, **popen)


def _finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root):
  tmp = tmp_path_factory.mktemp("reference")
  workdir = tmp / "run"
  code, out, err = _finish(_train(_config(tmp, data_root), workdir,
                                  "--config.eval.choose_postprocessing=True"))
  assert code == 0, err[-3000:]
  return workdir, out, err


def test_a_run_checkpoints_logs_plots_and_prints_the_table(uninterrupted):
  workdir, out, _ = uninterrupted
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())[-1] == 8
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6, 8]
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
  assert (workdir / "training_curves.png").stat().st_size > 1000
  assert os.listdir(workdir / "tensorboard")
  results = json.loads((workdir / "eval" / "results-val.json").read_text())   # final: val
  assert [c["case"] for c in results["cases"]] and "liver" in results["summary"]
  assert "DSC %" in out and "liver" in out
  # Post-processing chosen on the validation volume, recorded, applied to the final scores.
  chosen = json.loads((workdir / "postprocessing.json").read_text())
  assert chosen["volumes"] == 1 and [t["step"] for t in chosen["trials"]] == [
      "largest_liver_component", "tumour_inside_liver"]
  assert results["source"]["postprocessing"] == chosen["choice"]
  assert "post-processing chosen on 1 validation volumes" in out


# Kills, signals, damaged checkpoints and interrupted writes: tests/reliability/.


def test_bad_flag_is_one_line_and_exit_2(tmp_path, data_root):
  code, _, err = _finish(_train(_config(tmp_path, data_root), tmp_path / "w",
                                "--config.train.stepz=3"))
  assert code == 2
  assert err.strip().splitlines() == ["error: config key 'train.stepz' is unknown"]


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, data_root, monkeypatch):
  import jax.numpy as jnp
  from munet_jax.config import load_config_file
  from munet_jax.training import loop
  from munet_jax.checkpoints import Checkpointer
  real = loop.make_train_step

  def poisoned(config):
    step = real(config)

    def run(state, batch):
      new_state, metrics = step(state, batch)
      return new_state, dict(metrics, loss=jnp.where(state.step == 4, jnp.nan, metrics["loss"]))
    return run

  monkeypatch.setattr(loop, "make_train_step", poisoned)
  config = load_config_file(_config(tmp_path, data_root))
  with pytest.raises(loop.Diverged, match="loss is nan at step 5; the last good checkpoint is step 4"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  ckpt = Checkpointer(str(tmp_path / "run"), read_only=True)
  assert ckpt.steps() == [2, 4]
  ckpt.close()
