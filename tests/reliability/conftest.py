"""Fixtures of the fault suite: one synthetic data root and one uninterrupted run per session.

Every interrupted run is compared with `reference_run`, the same config trained without
interruption, so that run is made once and shared.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def jax_cache(tmp_path_factory):
  """A JAX compilation cache for the tools started by this session (see harness.py)."""
  harness.JAX_CACHE = str(tmp_path_factory.mktemp("jax_cache"))
  yield harness.JAX_CACHE
  harness.JAX_CACHE = None


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
  """Three synthetic 32x32 CT volumes of 6 slices (LiTS layout), as train.py would make them."""
  from munet_jax.data import synthetic
  root = tmp_path_factory.mktemp("data")
  synthetic.write_dataset(str(root), 3, 32, seed=0, slices=6, progress=False)
  return str(root)


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory, data_root):
  return harness.write_config(tmp_path_factory.mktemp("config"), data_root)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_config):
  """`tiny_config` trained to the end without interruption: (workdir, stdout, stderr)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  result = harness.run("train", "--config", tiny_config, "--workdir", workdir,
                       write_cache=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert harness.complete_steps(workdir)[-1] == harness.STEPS
  return str(workdir), result.stdout, result.stderr
