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
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from munet_jax.config import config_from_dict
from munet_jax.errors import UserError

BEST_METRIC = "liver_dsc"
log = logging.getLogger(__name__)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """The checkpoints of one training run, in `workdir/checkpoints/<step>`."""

  def __init__(self, workdir: str, keep: int = 3, *, read_only: bool = False):
    preserve = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        # Checkpoints a resumed run reads back from disk carry {} as metrics.
        policies.BestN(get_metric_fn=lambda m: m.get(BEST_METRIC, float("-inf")),
                       reverse=False, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True, preservation_policy=preserve,
        create=not read_only, read_only=read_only)
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "config", "metrics"))

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

  def restore_latest(self, target_state: Any) -> tuple[int, Any, dict] | None:
    """Newest complete checkpoint that restores; a damaged one is skipped with a warning.

    Returns None when there is no checkpoint; raises UserError when every one is damaged.
    """
    steps = self.steps()
    for step in reversed(steps):
      try:
        state, data = self.restore(step, target_state)
        return step, state, data
      except Exception as e:  # a truncated or half-deleted checkpoint
        _warn_damaged(self.directory, step, e)
    if steps:
      raise UserError(f"{self.directory}: every checkpoint is damaged ({len(steps)} tried)")
    return None

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
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise UserError(f"{workdir}: no checkpoints folder (train first, or check --workdir)")
  damaged = []
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
      for step in order:
        try:
          restored = ckpt.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
          config = config_from_dict(restored.config)
        except UserError:
          raise
        except Exception as e:
          damaged.append((step, e))
          continue
        for bad_step, error in damaged:
          _warn_damaged(directory, bad_step, error)
        state = restored.state
        return config, {"params": state["params"], "batch_stats": state["batch_stats"]}, step
      raise UserError(f"{directory}: every checkpoint is damaged ({len(steps)} tried)")
    finally:
      ckpt.close()


@contextlib.contextmanager
def _orbax_quiet():
  """Keeps orbax's reports of a damaged checkpoint off stderr while we try the next one.

  A failed restore leaves asynchronous reads behind whose exceptions asyncio logs with
  tracebacks ("Task exception was never retrieved"); the failure itself is reported
  once, by `_warn_damaged` or the `UserError`.
  """
  logger = logging.getLogger("asyncio")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def _warn_damaged(directory: str, step: int, error: Exception) -> None:
  """One warning line: TensorStore's reasons run over many lines and kilobytes."""
  reason = " ".join(f"{type(error).__name__}: {error}".split())
  if len(reason) > 120:
    reason = reason[:117] + "..."
  log.warning("checkpoint %s/%d is damaged (%s); trying an older one", directory, step, reason)
