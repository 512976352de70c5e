"""Checkpoints of a training run, with Orbax: written by the trainer, read by every tool.

A checkpoint holds the whole `TrainState` (parameters, optimiser state, batch statistics,
step, dropout key), the data iterator's state and the config, so a restart resumes
exactly. Orbax writes each step into a temporary folder and renames it when complete,
so a process killed mid-save leaves no checkpoint that looks complete.

Checkpoints belong to the run, not to the hardware: arrays are read back by their shapes
and dtypes (from the checkpoint's own metadata) into whatever placement the reading
process asks for -- the trainer's mesh when it resumes, this process's devices when a
tool loads the model -- so a run saved on 8 GPUs or several hosts is read on one CPU, and
the other way round.

This module sits below training, inference and evaluation; it imports none of them.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import shutil
import time
import warnings
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from munet_jax import _orbax_quiet, sharding
from munet_jax.config import config_from_dict
from munet_jax.errors import UserError

BEST_METRIC = "liver_dsc"
DAMAGED_SUFFIX = ".damaged"   # a damaged step folder set aside by a resumed run
WHICH = ("latest", "best")
ORBAX_TMP = ".orbax-checkpoint-tmp"
log = logging.getLogger(__name__)

# Errors of the file system that are the user's to fix (free space, a quota, a mount).
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
_DISK_TEXT = re.compile(r"No space left on device|Disk quota exceeded|Read-only file system"
                        r"|Permission denied|os_error_code='(28|122|30|13|1)'")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _handlers() -> dict:
  return dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
              config=ocp.JsonCheckpointHandler(), metrics=ocp.JsonCheckpointHandler())


class Checkpointer:
  """The checkpoints of one training run, in `workdir/checkpoints/<step>`."""

  def __init__(self, workdir: str, keep: int = 3, *, read_only: bool = False):
    preserve = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        # Checkpoints a resumed run reads back from disk carry {} as metrics.
        policies.BestN(get_metric_fn=lambda m: m.get(BEST_METRIC, float("-inf")),
                       reverse=False, n=1, keep_checkpoints_without_metrics=False),
    ])
    self.directory = checkpoint_dir(workdir)
    self._pending: int | None = None   # the step of the save in flight
    self._disk_failed = False           # a save the file system refused (tidied up at close)
    # Orbax logs two WARNINGs through absl for every read-only manager ("read only ...");
    # reading a run is routine, so they are held back while it is made.
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    if read_only:
      absl_log.setLevel(logging.ERROR)
    else:
      _orbax_quiet.quiet_saves()
    try:
      options = ocp.CheckpointManagerOptions(
          enable_async_checkpointing=True, preservation_policy=preserve,
          create=not read_only, read_only=read_only)
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_handlers=_handlers())
    except OSError as e:
      raise UserError(f"{self.directory}: cannot create the checkpoints folder "
                      f"({e.strerror or e})") from e
    finally:
      absl_log.setLevel(level)
    if not read_only and jax.process_index() == 0:
      self._remove_unfinished()

  def save(self, step: int, state: Any, data_state: dict, config: ml_collections.ConfigDict,
           metrics: dict | None = None) -> bool:
    """Starts an asynchronous save; returns at once. Metrics rank the 'best' checkpoint.

    Raises:
      UserError when this or the previous save could not be written (a full or read-only
      disk): one line naming the folder; complete checkpoints are untouched and the
      unfinished one is removed.
    """
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              config=ocp.args.JsonSave(config.to_dict()),
                              metrics=ocp.args.JsonSave(metrics or {}))
    with _DiskErrors(self, saving=step):   # the previous save finishes inside this call
      started = self.manager.save(step, args=args, metrics=metrics, force=True)
    self._pending = step
    return started

  def wait(self) -> None:
    """Waits for the save in flight; a failed one raises as `save` does."""
    with _DiskErrors(self):
      self.manager.wait_until_finished()

  def close(self) -> None:
    with _DiskErrors(self):
      self.manager.close()
    if self._disk_failed and jax.process_index() == 0:
      self._remove_unfinished()   # whatever Orbax's threads wrote after the failure

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

  def saved_config(self, step: int) -> dict | None:
    """The config saved with `step`, as a plain dict; None when it cannot be read."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore())).config
    except Exception:
      return None

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """The state and data state of `step`, placed like `target`.

    `target` is a pytree of arrays or `jax.ShapeDtypeStruct`s with shardings; what the
    checkpoint was saved on (device count, hosts, backend) does not matter.

    Raises:
      UserError when the checkpoint's arrays are not those of `target` (another model or
      optimiser): that is no damage, so no older checkpoint is tried.
    """
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    self._check_arrays(step, abstract)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def restore_for_inference(self, step: int, devices=None) -> tuple[dict, dict]:
    """(config dict, state) of `step`, every array replicated on `devices`.

    The shapes and dtypes come from the checkpoint itself, so no model needs to be built
    first, and the devices are this process's (default) whatever the run was saved on.
    """
    metadata = self.manager.item_metadata(step)["state"]
    if metadata is None:
      raise ValueError("the checkpoint's array metadata cannot be read")
    placement = sharding.replicated(sharding.make_mesh(
        list(devices) if devices is not None else jax.local_devices()))
    abstract = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=placement), metadata)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), config=ocp.args.JsonRestore()))
    return restored.config, restored.state

  def restore_latest(self, target: Any, config: ml_collections.ConfigDict | None = None
                     ) -> tuple[int, Any, dict] | None:
    """Newest complete checkpoint that restores; damaged newer ones are set aside.

    A checkpoint that fails to read (a truncated or deleted file inside it) is skipped
    for the next older one. When an older one restores, each damaged newer one gets a
    one-line warning and is renamed `STEP.damaged` in the same folder: kept for a look,
    out of the way of the resumed run, which saves that step again.

    Returns None when there is no checkpoint. Raises UserError as the only output when
    the checkpoints are of another model (`config` given: the error names the differing
    key), of other arrays, or when none reads.
    """
    steps = self.steps()
    if not steps:
      return None
    if config is not None:
      self._check_same_model(steps[-1], config)
    with _orbax_quiet.quiet_restores():
      step, restored, damaged = _first_that_restores(
          reversed(steps), lambda s: self.restore(s, target))
      if step is not None:
        for bad_step, error in damaged:
          _warn_damaged(self.directory, bad_step, error, "setting it aside as "
                        f"{bad_step}{DAMAGED_SUFFIX} and resuming from step {step}")
        self._set_aside([s for s, _ in damaged])
        return (step, *restored)
    raise UserError(_none_restores(self.directory, damaged))

  def _check_same_model(self, step: int, config: ml_collections.ConfigDict) -> None:
    """A UserError naming the first `model.*` key whose value differs from `step`'s config."""
    saved = self.saved_config(step)
    if saved is None or "model" not in saved:   # no readable config: damage shows later
      return
    saved = saved["model"]
    for key, value in config.model.to_dict().items():
      before = saved.get(key)
      if isinstance(value, (tuple, list)) and isinstance(before, (tuple, list)):
        value, before = list(value), list(before)
      if key in saved and before != value:
        raise UserError(
            f"{self.directory}: the checkpoints are of another model (config key "
            f"'model.{key}' is {saved[key]!r} there, {getattr(config.model, key)!r} now); "
            "resume with the run's config, or train in a new --workdir")

  def _check_arrays(self, step: int, abstract: Any) -> None:
    """A UserError naming the first array whose path, shape or dtype differs from `step`'s.

    Unreadable metadata is left to the restore, which then fails as damage.
    """
    try:
      metadata = self.manager.item_metadata(step)["state"]
    except Exception:
      return
    if metadata is None:
      return
    saved = {_path(p): (tuple(m.shape), np.dtype(m.dtype))
             for p, m in jax.tree_util.tree_flatten_with_path(metadata)[0]}
    # A Python number in the target (a fresh state's step) takes the saved dtype.
    wanted = {_path(p): (tuple(np.shape(a)), np.dtype(a.dtype) if hasattr(a, "dtype") else None)
              for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    wanted = {p: (shape, dtype if dtype is not None else saved.get(p, (None, None))[1])
              for p, (shape, dtype) in wanted.items()}
    if saved == wanted:
      return
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    if missing or extra:
      what = (f"{missing[0]} is not in checkpoint {step}" if missing
              else f"checkpoint {step} holds {extra[0]}, which this run does not have")
    else:
      path = next(p for p in sorted(wanted) if wanted[p] != saved[p])
      what = (f"{path} is {_describe(saved[path])} in checkpoint {step} and "
              f"{_describe(wanted[path])} in this run")
    raise UserError(f"{self.directory}: the checkpoints do not fit this run's model and "
                    f"optimiser ({what}); resume with the run's config, or train in a new "
                    "--workdir")

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
    sharding.sync_processes("damaged checkpoints set aside")
    self.manager.reload()

  def _remove_unfinished(self) -> None:
    """Removes the temporary folders of saves that never finished (a full disk, a kill)."""
    pattern = os.path.join(glob.escape(self.directory), f"*{ORBAX_TMP}*")
    for _ in range(20):   # a failed save's writer threads may still be ending: until it stays gone
      paths = glob.glob(pattern)
      if not paths:
        return
      for path in paths:
        shutil.rmtree(path, ignore_errors=True)
      time.sleep(0.05)


class _DiskErrors:
  """Turns a save that the file system refused into one UserError, and tidies up after it."""

  def __init__(self, ckpt: Checkpointer, saving: int | None = None):
    self.ckpt, self.saving = ckpt, saving

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    ckpt = self.ckpt
    if error is None or not isinstance(error, Exception) or not is_disk_error(error):
      return False
    _orbax_quiet.drop_late_restore_errors()   # a failed save's late callbacks, likewise
    failed, ckpt._pending = ckpt._pending, None
    ckpt._disk_failed = True
    # The refused save's writer coroutines are dropped unfinished; Python would print a
    # warning for each at exit, after the one line that says what happened.
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)
    complete = _listed_steps(ckpt.directory)
    if failed is None or failed in complete:   # the previous save is whole: this one failed
      failed = self.saving
    complete = [s for s in complete if s != failed]
    # Orbax's background threads may still be writing the failed save; once they have
    # stopped, nothing recreates the temporary folder removed here.
    try:
      ckpt.manager.wait_until_finished()
    except Exception:   # noqa: BLE001 - the same failure, reported once below
      pass
    if jax.process_index() == 0:
      ckpt._remove_unfinished()
    kept = (f"checkpoint {complete[-1]} is intact; free space and rerun the same command to "
            "resume from it" if complete else "no complete checkpoint is there yet; free "
            "space and rerun the same command")
    step = f" of step {failed}" if failed is not None else ""
    raise UserError(f"{ckpt.directory}: cannot write the checkpoint{step} "
                    f"({disk_reason(error)}); {kept}") from error


def is_disk_error(error: BaseException) -> bool:
  """Whether `error` is the file system refusing a write (full, quota, read-only, denied)."""
  if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
    return True
  return bool(_DISK_TEXT.search(str(error)))


def disk_reason(error: BaseException) -> str:
  """The file system's words for `error`, e.g. 'No space left on device'."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  m = _DISK_TEXT.search(str(error))
  if m is None:
    return type(error).__name__
  if m.group(1):
    return os.strerror(int(m.group(1)))
  return m.group(0)


def _listed_steps(directory: str) -> list[int]:
  try:
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())
  except OSError:
    return []


def load_variables(workdir: str, which: str = "latest", devices=None
                   ) -> tuple[ml_collections.ConfigDict, dict, int]:
  """(config, {'params', 'batch_stats'}, step) from a training run's checkpoint.

  Args:
    workdir: the run's folder (the one given to `train.py --workdir`).
    which: 'latest' or 'best' (highest validation liver DSC).
    devices: where to place the variables, replicated; this process's devices when None.
      The device count the run was trained on does not matter.

  A damaged newest checkpoint falls back to an older one with a one-line warning; a
  missing or wholly damaged run is a `UserError` naming the folder, and then the error
  is the only line.
  """
  if which not in WHICH:
    raise UserError(f"which must be one of {WHICH}, got {which!r}")
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise UserError(f"{workdir}: no checkpoints folder (train first, or check --workdir)")
  with _orbax_quiet.quiet_restores():
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
        config, state = ckpt.restore_for_inference(step, devices)
        return config_from_dict(config), state

      step, restored, damaged = _first_that_restores(order, restore)
      if step is None:
        raise UserError(_none_restores(directory, damaged))
      for bad_step, error in damaged:
        _warn_damaged(directory, bad_step, error, f"using step {step}")
      config, state = restored
      if state.get("ema_params"):   # the averaged network, when the run kept one
        return config, {"params": state["ema_params"],
                        "batch_stats": state["ema_batch_stats"]}, step
      return config, {"params": state["params"], "batch_stats": state["batch_stats"]}, step
    finally:
      ckpt.close()


def _first_that_restores(steps, restore: Callable[[int], Any]):
  """(step, restore(step), damaged) for the first of `steps` whose restore succeeds.

  `damaged` lists (step, error) of those tried before it that failed (a truncated or
  half-deleted checkpoint); step and result are None when none restores. A UserError
  (another model, a config that does not validate) is not damage and propagates.
  """
  damaged = []
  for step in steps:
    try:
      return step, restore(step), damaged
    except UserError:
      raise
    except Exception as e:
      _orbax_quiet.drop_late_restore_errors()
      damaged.append((step, e))
  return None, None, damaged


def _reason(error: Exception, limit: int = 120) -> str:
  """One line of at most `limit` characters: TensorStore's reasons run over many lines."""
  reason = " ".join(f"{type(error).__name__}: {error}".split())
  return reason if len(reason) <= limit else reason[:limit - 3] + "..."


def _path(keys) -> str:
  """'params/encoder_0/kernel' for a key path, whether the tree is a dict or a dataclass."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def _describe(shape_dtype) -> str:
  shape, dtype = shape_dtype
  return f"{dtype}{list(shape)}"


def _warn_damaged(directory: str, step: int, error: Exception, action: str) -> None:
  log.warning("checkpoint %s/%d is damaged (%s); %s", directory, step, _reason(error), action)


def _none_restores(directory: str, damaged: list[tuple[int, Exception]]) -> str:
  """The error when no checkpoint restores: the folder, how many, the newest one's reason."""
  step, error = damaged[0]
  return (f"{directory}: every checkpoint is damaged ({len(damaged)} tried; step {step}: "
          f"{_reason(error)})")
