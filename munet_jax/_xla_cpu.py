"""An XLA CPU option set before JAX starts its CPU backend: multi-threaded convolutions.

jaxlib 0.10 hands every convolution on the CPU to YNNPACK, which runs each one on a
single thread, while XLA's Eigen convolutions use all of the process's threads. On a
2-core machine the Eigen path makes the demo's training step about 1.3x faster and the
larger steps up to 2x (bench/RESULTS.md, issue 14). The option is XLA's own
`--xla_cpu_experimental_ynn_fusion_type`, with `-individual_convolution` taking
convolutions out of YNNPACK's default list. It is added to `XLA_FLAGS` when munet_jax is
imported, only

- for the jaxlib releases it was measured on (`VERIFIED`): XLA refuses to start on a
  flag it does not know, so an untested release is left as it is;
- when `XLA_FLAGS` says nothing about YNN fusions already (a user's setting wins);
- unless `MUNET_JAX_YNN_CONVOLUTIONS=1` asks for the library's default.

It takes effect for every backend JAX creates afterwards, in this process and in the
processes it starts; once JAX has created its CPU backend the process keeps what it had.
GPU and TPU backends ignore CPU options.
"""

from __future__ import annotations

import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type"
VALUE = "-individual_convolution"
VERIFIED = ((0, 10),)          # jaxlib (major, minor) releases measured with the flag
OPT_OUT = "MUNET_JAX_YNN_CONVOLUTIONS"


def _release(version: str) -> tuple[int, ...] | None:
  try:
    return tuple(int(part) for part in version.split(".")[:2])
  except ValueError:
    return None


def prefer_threaded_convolutions(environ=None, jaxlib_version: str | None = None) -> bool:
  """Adds the option to `environ["XLA_FLAGS"]` where it applies; True when it did."""
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if FLAG.lstrip("-") in flags or environ.get(OPT_OUT) == "1":
    return False
  if jaxlib_version is None:
    try:   # jaxlib's own version module: ~10 ms, where importlib.metadata costs ~45 ms
      from jaxlib.version import __version__ as jaxlib_version
    except ImportError:
      return False
  if _release(jaxlib_version) not in VERIFIED:
    return False
  environ["XLA_FLAGS"] = f"{flags} {FLAG}={VALUE}".strip()
  return True
