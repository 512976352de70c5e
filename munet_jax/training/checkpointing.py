"""Checkpoints with Orbax: asynchronous saves, the last K kept and the best by liver DSC.

A checkpoint holds the whole `TrainState` (parameters, optimiser state, batch statistics,
step, dropout key), the data iterator's state and the config, so a restart resumes
exactly. Orbax writes each step into a temporary folder and renames it when complete,
so a process killed mid-save leaves no checkpoint that looks complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from munet_jax.config import config_from_dict
from munet_jax.errors import UserError

BEST_METRIC = "liver_dsc"
DAMAGED_SUFFIX = ".damaged"   # a damaged step folder set aside by a resumed run
log = logging.getLogger(__name__)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


WHICH = ("latest", "best")


class Checkpointer:
  """The checkpoints of one training run, in `workdir/checkpoints/<step>`."""

  def __init__(self, workdir: str, keep: int = 3, *, read_only: bool = False):
    preserve = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        # Checkpoints a resumed run reads back from disk carry {} as metrics.
        policies.BestN(get_metric_fn=lambda m: m.get(BEST_METRIC, float("-inf")),
                       reverse=False, n=1, keep_checkpoints_without_metrics=False),
    ])
    # Orbax logs two WARNINGs through absl for every read-only manager ("read only ...");
    # reading a run is routine, so they are held back while it is made.
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    if read_only:
      absl_log.setLevel(logging.ERROR)
    try:
      options = ocp.CheckpointManagerOptions(
          enable_async_checkpointing=True, preservation_policy=preserve,
          create=not read_only, read_only=read_only)
      self.directory = checkpoint_dir(workdir)
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "data", "config", "metrics"))
    finally:
      absl_log.setLevel(level)

  def save(self, step: int, state: Any, data_state: dict, config: ml_collections.ConfigDict,
           metrics: dict | None = None) -> bool:
    """Starts an asynchronous save; returns at once. Metrics rank the 'best' checkpoint."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              config=ocp.args.JsonSave(config.to_dict()),
                              metrics=ocp.args.JsonSave(metrics or {}))
    return self.manager.save(step, args=args, metrics=metrics, force=True)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The step with the highest validation liver DSC among those kept; None if none has one."""
    best, best_value = None, None
    for step in self.steps():
      try:
        metrics = self.manager.restore(step, args=ocp.args.Composite(
            metrics=ocp.args.JsonRestore())).metrics or {}
      except Exception:  # damaged or without metrics
        continue
      value = metrics.get(BEST_METRIC)
      if value is not None and (best_value is None or value > best_value):
        best, best_value = step, value
    return best

  def restore(self, step: int, target_state: Any) -> tuple[Any, dict]:
    """The state (shaped and sharded like `target_state`) and data state of `step`."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def restore_latest(self, target_state: Any, config: ml_collections.ConfigDict | None = None
                     ) -> tuple[int, Any, dict] | None:
    """Newest complete checkpoint that restores; damaged newer ones are set aside.

    A checkpoint that fails to restore (a truncated or deleted file inside it) is skipped
    for the next older one. When an older one restores, each damaged newer one gets a
    one-line warning and is renamed `STEP.damaged` in the same folder: kept for a look,
    out of the way of the resumed run, which saves that step again.

    Returns None when there is no checkpoint; raises UserError naming the folder, as
    the only output, when none restores: when `config` is given and its model differs
    from the one the checkpoints were saved with, the error names the differing key.
    """
    steps = self.steps()
    with _orbax_quiet():
      step, restored, damaged = _first_that_restores(
          reversed(steps), lambda s: self.restore(s, target_state))
      if step is not None:
        for bad_step, error in damaged:
          _warn_damaged(self.directory, bad_step, error, "setting it aside as "
                        f"{bad_step}{DAMAGED_SUFFIX} and resuming from step {step}")
        self._set_aside([s for s, _ in damaged])
        return (step, *restored)
    if steps:
      if config is not None:
        self._check_same_model(steps[-1], config)
      raise UserError(_none_restores(self.directory, damaged))
    return None

  def _check_same_model(self, step: int, config: ml_collections.ConfigDict) -> None:
    """A UserError naming the first `model.*` key whose value differs from `step`'s config."""
    try:
      saved = self.manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore())).config["model"]
    except Exception:  # no readable config: the damage is reported instead
      return
    for key, value in config.model.to_dict().items():
      before = saved.get(key)
      if isinstance(value, (tuple, list)) and isinstance(before, (tuple, list)):
        value, before = list(value), list(before)
      if key in saved and before != value:
        raise UserError(
            f"{self.directory}: the checkpoints are of another model (config key "
            f"'model.{key}' is {saved[key]!r} there, {getattr(config.model, key)!r} now); "
            "resume with the run's config, or train in a new --workdir")

  def _set_aside(self, steps: list[int]) -> None:
    """Renames damaged step folders out of Orbax's sight (process 0; all wait for it)."""
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        source = os.path.join(self.directory, str(step))
        target, n = source + DAMAGED_SUFFIX, 1
        while os.path.exists(target):
          n += 1
          target = f"{source}{DAMAGED_SUFFIX}-{n}"
        os.rename(source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("damaged checkpoints set aside")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def load_variables(workdir: str, which: str = "latest"
                   ) -> tuple[ml_collections.ConfigDict, dict, int]:
  """(config, {'params', 'batch_stats'}, step) from a training run's checkpoint.

  `which` is 'latest' or 'best' (highest validation liver DSC). A damaged newest
  checkpoint falls back to an older one with a one-line warning; a missing or wholly
  damaged run is a `UserError` naming the folder, and then the error is the only line.
  """
  if which not in WHICH:
    raise UserError(f"which must be one of {WHICH}, got {which!r}")
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise UserError(f"{workdir}: no checkpoints folder (train first, or check --workdir)")
  with _orbax_quiet():
    ckpt = Checkpointer(workdir, read_only=True)
    try:
      steps = ckpt.steps()
      if not steps:
        raise UserError(f"{directory}: no complete checkpoint")
      order = list(reversed(steps))
      best = ckpt.best_step() if which == "best" else None
      if best is not None:
        order.remove(best)
        order.insert(0, best)
      elif which == "best":
        log.warning("%s: no checkpoint has a validation liver DSC to rank it; using the "
                    "newest (step %d) instead of the best", directory, order[0])
      def restore(step):
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
        return config_from_dict(restored.config), restored.state

      step, restored, damaged = _first_that_restores(order, restore)
      if step is None:
        raise UserError(_none_restores(directory, damaged))
      for bad_step, error in damaged:
        _warn_damaged(directory, bad_step, error, f"using step {step}")
      config, state = restored
      return config, {"params": state["params"], "batch_stats": state["batch_stats"]}, step
    finally:
      ckpt.close()


@contextlib.contextmanager
def _orbax_quiet():
  """Keeps orbax's reports of a damaged checkpoint off stderr while we try the next one.

  A failed restore leaves asynchronous reads behind whose exceptions asyncio logs with
  tracebacks ("Task exception was never retrieved"); the failure itself is reported
  once, by `_warn_damaged` or the `UserError`. Those reports can come at any later
  moment -- even before the failed restore has raised -- so the filters of
  `_drop_late_restore_errors` are in place before the first restore, and once one has
  failed they stay for the rest of the process.
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


_restore_failed = False
_filters_installed = False


def _first_that_restores(steps, restore: Callable[[int], Any]):
  """(step, restore(step), damaged) for the first of `steps` whose restore succeeds.

  `damaged` lists (step, error) of those tried before it that failed (a truncated or
  half-deleted checkpoint); step and result are None when none restores. A UserError
  (a config that does not validate) is not damage and propagates.
  """
  damaged = []
  for step in steps:
    try:
      return step, restore(step), damaged
    except UserError:
      raise
    except Exception as e:
      _drop_late_restore_errors()
      damaged.append((step, e))
  return None, None, damaged


def _drop_late_restore_errors() -> None:
  """After a failed restore: its late reports stay off stderr, for good.

  When one read of a damaged checkpoint fails, Orbax's event loop ends while TensorStore
  still completes the other reads. Each then reports on its own, at any moment: a
  callback into the closed loop ("RuntimeError: Event loop is closed"), an Orbax read
  coroutine dropped with its exception ("Exception ignored in"), both printed as
  unraisable exceptions, an Orbax read coroutine never started (a RuntimeWarning at
  exit), and asyncio's "Task exception was never retrieved" log records.
  """
  global _restore_failed
  _restore_failed = True
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  _filter_late_restore_errors()


def _filter_late_restore_errors() -> None:
  """Drops exactly the unraisable exceptions and warnings of `_drop_late_restore_errors`.

  Other unraisable exceptions and warnings still show. Installed once per process.
  """
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
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      return
    previous(unraisable)

  sys.unraisablehook = hook


def _reason(error: Exception, limit: int = 120) -> str:
  """One line of at most `limit` characters: TensorStore's reasons run over many lines."""
  reason = " ".join(f"{type(error).__name__}: {error}".split())
  return reason if len(reason) <= limit else reason[:limit - 3] + "..."


def _warn_damaged(directory: str, step: int, error: Exception, action: str) -> None:
  log.warning("checkpoint %s/%d is damaged (%s); %s", directory, step, _reason(error), action)


def _none_restores(directory: str, damaged: list[tuple[int, Exception]]) -> str:
  """The error when no checkpoint restores: the folder, how many, the newest one's reason."""
  step, error = damaged[0]
  return (f"{directory}: every checkpoint is damaged ({len(damaged)} tried; step {step}: "
          f"{_reason(error)})")
