"""Fixtures of the fault suite: one synthetic data root and one uninterrupted run per session.

Every interrupted run is compared with `reference_run`, the same config trained without
interruption, so that run is made once and shared -- by every test of the session, and
under pytest-xdist by every worker too: the first worker to need it makes it (with the
data root, the config file and the JAX compilation cache) in the session's shared
temporary folder while the others wait on a file lock.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


def _cache_folder(tmp_path_factory):
  return str(harness.shared(tmp_path_factory, "jax-cache", lambda folder: None))


@pytest.fixture(autouse=True)
def _tools_use_the_cache(request):
  """Every test that starts tools (all marked slow) gets the cache; quick ones do not wait."""
  if request.node.get_closest_marker("slow"):
    request.getfixturevalue("jax_cache")


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory, reference_run):
  """A JAX compilation cache for the tools started by this session (see harness.py).

  Only `reference_run` writes it, and every other tool starts after it is done: a
  reader never meets a half-written entry.
  """
  harness.JAX_CACHE = _cache_folder(tmp_path_factory)
  yield harness.JAX_CACHE
  harness.JAX_CACHE = None


def _make_data(folder):
  from munet_jax.data import synthetic
  synthetic.write_dataset(str(folder / "data"), 3, 32, seed=0, slices=6, progress=False)
  harness.write_config(folder, folder / "data")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
  """Three synthetic 32x32 CT volumes of 6 slices (LiTS layout), as train.py would make them."""
  return str(harness.shared(tmp_path_factory, "data", _make_data) / "data")


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory, data_root):
  """The tiny run's config file (see harness.TINY_CONFIG), on `data_root`."""
  return os.path.join(os.path.dirname(data_root), "config.py")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_config):
  """`tiny_config` trained to the end without interruption: (workdir, stdout, stderr)."""
  def make(folder):
    harness.JAX_CACHE = _cache_folder(tmp_path_factory)
    workdir = folder / "run"
    result = harness.run("train", "--config", tiny_config, "--workdir", workdir,
                         write_cache=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert harness.complete_steps(workdir)[-1] == harness.STEPS
    (folder / "stdout").write_text(result.stdout)
    (folder / "stderr").write_text(result.stderr)

  folder = harness.shared(tmp_path_factory, "reference", make)
  return (str(folder / "run"), (folder / "stdout").read_text(),
          (folder / "stderr").read_text())
