"""Atomic outputs: write under a temporary name in the same folder, then rename into place.

A reader (or a tool interrupted mid-write) sees the previous file or the complete new
one, never half a file: `os.replace` within one folder is atomic on POSIX. A process
killed mid-write leaves its hidden temporary file behind (`.NAME.HOST-PID-XXXX.tmp`, which
no tool reads); the next successful write of the same file removes those of dead
processes of this host.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
from typing import Iterator

from munet_jax.errors import WriteError


@contextlib.contextmanager
def atomic_output(path, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path beside `path`; renames it onto `path` when the block succeeds.

  Args:
    path: the final file name; its folder is created if missing.
    suffix: kept at the end of the temporary name (writers that pick the format from the
      extension, such as nibabel with '.nii.gz', need it).

  Raises:
    WriteError (a UserError) naming `path` when the file system refuses (permissions,
    full disk). On any
    failure the temporary file is removed and `path` is left as it was.
  """
  path = os.fspath(path)
  folder, name = os.path.split(os.path.abspath(path))
  tag = f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
  tmp = os.path.join(folder, f".{name}.{tag}.tmp{suffix}")
  try:
    os.makedirs(folder, exist_ok=True)
    yield tmp
    os.replace(tmp, path)
    _remove_stale(folder, name, suffix)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise WriteError(f"{path}: cannot write ({e.strerror or e})") from e
    raise


_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def write_json(path, value, durable: bool = False) -> None:
  """Writes `value` as JSON at `path`, atomically; `durable`: fsync before the rename.

  Non-finite floats are refused (JSON has none): convert them to None first.
  """
  with atomic_output(path, ".json") as tmp, open(tmp, "w") as f:
    json.dump(value, f, indent=1, allow_nan=False)
    if durable:
      f.flush()
      os.fsync(f.fileno())


def write_png(fig, path) -> None:
  """Saves a matplotlib figure as a PNG at `path`, atomically (`atomic_output`)."""
  with atomic_output(path, ".png") as tmp:
    fig.savefig(tmp, format="png")


def _remove_stale(folder: str, name: str, suffix: str) -> None:
  """Removes temporaries of `name` left by killed processes of this host."""
  pattern = re.compile(re.escape(f".{name}.{_HOST}-") + r"(\d+)-[0-9a-f]+"
                       + re.escape(f".tmp{suffix}") + "$")
  try:
    entries = os.listdir(folder)
  except OSError:
    return
  for entry in entries:
    m = pattern.match(entry)
    if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
      with contextlib.suppress(OSError):
        os.remove(os.path.join(folder, entry))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:   # exists, owned by another user
    return True
  return True
