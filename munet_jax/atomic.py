"""Atomic outputs: write under a temporary name in the same folder, then rename into place.

A reader (or a tool interrupted mid-write) sees the previous file or the complete new
one, never half a file: `os.replace` within one folder is atomic on POSIX.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import Iterator

from munet_jax.errors import UserError


@contextlib.contextmanager
def atomic_output(path, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path beside `path`; renames it onto `path` when the block succeeds.

  Args:
    path: the final file name; its folder is created if missing.
    suffix: kept at the end of the temporary name (writers that pick the format from the
      extension, such as nibabel with '.nii.gz', need it).

  Raises:
    UserError naming `path` when the file system refuses (permissions, full disk). On any
    failure the temporary file is removed and `path` is left as it was.
  """
  path = os.fspath(path)
  folder, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")
  try:
    os.makedirs(folder, exist_ok=True)
    yield tmp
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise UserError(f"{path}: cannot write ({e.strerror or e})") from e
    raise
