"""Keeps Orbax's and TensorStore's late reports of a failed read or write off stderr.

Private to `munet_jax.checkpoints`, which reports each failure itself, in one line. What
is silenced here is only the libraries' own echo of a failure already raised to us:

* a failed restore leaves asynchronous reads behind that report on their own, at any
  later moment (asyncio's "Task exception was never retrieved", callbacks into a closed
  event loop, dropped read coroutines);
* a failed asynchronous save is logged by Orbax's background threads, with tracebacks,
  before the error reaches the thread that waits for the save.

Tied to Orbax 0.12 / TensorStore internals: a later version may report otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

_restore_failed = False
_filters_installed = False
_ORBAX_PATH = f"{os.sep}orbax{os.sep}"


@contextlib.contextmanager
def quiet_restores():
  """Orbax's reports of a damaged checkpoint stay off stderr while we try the next one.

  The filters are in place before the first restore (late reports can come even before
  the failed restore has raised), and once one restore has failed they stay for the rest
  of the process.
  """
  logger = logging.getLogger("asyncio")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  _filter_late_restore_errors()
  try:
    yield
  finally:
    if not _restore_failed:
      logger.setLevel(level)


def drop_late_restore_errors() -> None:
  """After a failed restore or save: its late reports stay off stderr, for good."""
  global _restore_failed
  _restore_failed = True
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  _filter_late_restore_errors()


def _filter_late_restore_errors() -> None:
  """Drops exactly the unraisable exceptions and warnings of a failed restore, once."""
  global _filters_installed
  if _filters_installed:
    return
  _filters_installed = True
  warnings.filterwarnings("ignore", r"coroutine '_read_\w+' was never awaited", RuntimeWarning)
  previous = sys.unraisablehook

  def hook(unraisable):
    error, source = unraisable.exc_value, unraisable.object
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    code = getattr(source, "cr_code", None)
    if code is not None and _ORBAX_PATH in code.co_filename:
      return
    previous(unraisable)

  sys.unraisablehook = hook


class _DropOrbaxErrors(logging.Filter):
  """Drops ERROR records logged from Orbax's own code (its background save threads).

  The save's exception still reaches `Checkpointer.save` / `wait`, which reports it: as
  one line when it is a full or read-only disk, with its traceback when it is anything
  else.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    if _ORBAX_PATH in record.pathname:
      return False
    # asyncio's "Task exception was never retrieved" for Orbax's write tasks.
    return not (record.name == "asyncio" and _ORBAX_PATH in record.getMessage())


_SAVE_FILTER = _DropOrbaxErrors()


def quiet_saves() -> None:
  """Installs the save-error filters (idempotent).

  Before the first save, as for restores: the late callbacks of a failed write can
  report before the failure reaches the waiting thread.
  """
  _filter_late_restore_errors()
  for name in ("absl", "orbax", "asyncio"):
    logger = logging.getLogger(name)
    if _SAVE_FILTER not in logger.filters:
      logger.addFilter(_SAVE_FILTER)
