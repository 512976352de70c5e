"""The XLA CPU option munet_jax sets on import: convolutions on XLA's threaded path."""

import os
import subprocess
import sys
from importlib import metadata

import pytest

from munet_jax import _xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTION = f"{_xla_cpu.FLAG}={_xla_cpu.VALUE}"


def test_added_on_a_verified_release_and_kept_with_other_flags():
  env = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
  assert _xla_cpu.prefer_threaded_convolutions(env, "0.10.2")
  assert env["XLA_FLAGS"] == f"--xla_backend_optimization_level=0 {OPTION}"
  env = {}
  assert _xla_cpu.prefer_threaded_convolutions(env, "0.10.0")
  assert env["XLA_FLAGS"] == OPTION


@pytest.mark.parametrize("version", ["0.9.2", "0.11.0", "1.0.0", "dev"])
def test_left_alone_on_a_release_not_measured(version):
  # XLA aborts on a flag it does not know, so an untested jaxlib gets nothing.
  env = {"XLA_FLAGS": "--a=1"}
  assert not _xla_cpu.prefer_threaded_convolutions(env, version)
  assert env == {"XLA_FLAGS": "--a=1"}


def test_the_users_choice_wins():
  env = {"XLA_FLAGS": f"{_xla_cpu.FLAG}=+individual_dot"}
  assert not _xla_cpu.prefer_threaded_convolutions(env, "0.10.2")
  assert env["XLA_FLAGS"] == f"{_xla_cpu.FLAG}=+individual_dot"
  env = {_xla_cpu.OPT_OUT: "1"}
  assert not _xla_cpu.prefer_threaded_convolutions(env, "0.10.2")
  assert "XLA_FLAGS" not in env


PROBE = """
import jax, jax.numpy as jnp
import munet_jax
# Compiled, not run; XLA gives YNNPACK only convolutions above some size, as this one.
x, w = jnp.ones((8, 128, 128, 32)), jnp.ones((3, 3, 32, 16))
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
print("ynn" if "ynn_fusion" in conv.lower(x, w).compile().as_text() else "threaded")
"""


def _probe(**extra):
  # A user's process: none of the suite's XLA flags (at the suite's lowest optimisation
  # level XLA makes no YNNPACK fusions at all).
  env = {k: v for k, v in os.environ.items() if k not in (_xla_cpu.OPT_OUT, "XLA_FLAGS")}
  env.update(extra)
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, check=True,
                       capture_output=True, text=True)
  return out.stdout.split()[-1]


@pytest.mark.skipif(_xla_cpu._release(metadata.version("jaxlib")) not in _xla_cpu.VERIFIED,
                    reason="the option is set on the jaxlib releases it was measured on")
def test_importing_munet_jax_takes_convolutions_off_ynnpack():
  # Imported after jax, before the first computation: the CPU backend starts with it.
  assert _probe() == "threaded"
  # And the library's own default, which the option exists to change, is what it says.
  assert _probe(**{_xla_cpu.OPT_OUT: "1"}) == "ynn"
