"""Shared fixtures: tiny configs so the whole suite stays fast on two CPU cores."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
REAL_CT = os.path.join(SHARED, "data", "real_ct")
# The real CT ships beside the project (../shared), not inside it: tests that read it are
# skipped, with this reason, in a checkout that has no such folder beside it.
needs_real_ct = pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_CT, "liver_mask_a.nii.gz")),
                                   reason=f"real CT not found at {REAL_CT}")

if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# XLA's CPU backend compiles at its lowest optimisation level in the tests: the tiny
# networks' programs compile in about half the time (a tiny mU-Net's training step,
# 15 s -> 8 s here) and run in milliseconds either way. Every process of the suite inherits
# the flag (the tools and helpers it starts; a test that sets XLA_FLAGS adds to it), so a
# result compared bitwise across processes is compiled alike on both sides; the tests'
# tolerances come from the arithmetic, not from the compiler's choices.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

from munet_jax.runtime import configure_jax  # noqa: E402

configure_jax()


def make_tiny_config():
  """A three-stage mU-Net of widths 4/8/16 on 32x32 slices."""
  from munet_jax.config import base_config
  c = base_config()
  c.model.features = (4, 8, 16)
  c.data.image_size = 32
  c.train.batch_size = 4
  return c


@pytest.fixture
def tiny_config():
  return make_tiny_config()


@pytest.fixture(scope="session")
def tiny_variables():
  """Variables of `make_tiny_config()`'s model, initialised once per test session."""
  import jax
  import munet_jax
  return munet_jax.init(jax.random.key(0), make_tiny_config())
