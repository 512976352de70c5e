"""The training loop: data -> sharded steps -> checkpoints -> validation -> report.

`train_and_evaluate(config, workdir)` is all `train.py` calls. Steps are pure and jitted;
everything with a side effect (files, signals, the progress bar) lives here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from munet_jax import evaluation, sharding
from munet_jax import postprocessing as pp
from munet_jax.checkpoints import Checkpointer
from munet_jax.data import discovery, splits, store, synthetic
from munet_jax.data.pipeline import make_train_iterator
from munet_jax.errors import UserError
from munet_jax.inference import VolumeSegmenter
from munet_jax.training.reporting import MetricWriter, plot_curves
from munet_jax.training.state import (create_train_state, ema_stats_steps, make_train_step,
                                      variables_of)

log = logging.getLogger(__name__)

EXIT_DIVERGED = 3


class Diverged(Exception):
  """The loss stopped being finite."""


class Interrupted(Exception):
  """SIGTERM or Ctrl-C arrived; a checkpoint was saved."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"{signal.Signals(signum).name} at step {step}")
    self.signum, self.step = signum, step


class _SignalFlag:
  """Turns SIGTERM and SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.signum = signum

  def __exit__(self, *exc):
    for s, handler in self._old.items():
      signal.signal(s, handler)
    return False


def prepare_data(config: ml_collections.ConfigDict):
  """Cases, patient splits and the slice store for `config.data`; makes synthetic data if asked."""
  root = config.data.root
  if config.data.synthetic.cases > 0 and not _has_cases(root):
    if jax.process_index() == 0:
      print(f"making {config.data.synthetic.cases} synthetic CT volumes in {root}", flush=True)
      synthetic.write_dataset_into_place(
          root, config.data.synthetic.cases, config.data.synthetic.size, seed=config.seed,
          slices=config.data.synthetic.slices, crop=config.data.synthetic.crop,
          tumour_rate=config.data.synthetic.tumour_rate,
          voxel_noise=config.data.synthetic.voxel_noise,
          low_contrast_rate=config.data.synthetic.low_contrast_rate)
    sharding.sync_processes("synthetic data")
  elif config.data.synthetic.cases > 0 and jax.process_index() == 0:
    for line in synthetic_mismatch(root, config):
      print(line, file=sys.stderr)
  split = splits.split_cases(discovery.find_cases(root), config)
  if not split["train"]:
    raise UserError(f"{root}: the split leaves no training case")
  cache_dir = config.data.cache_dir or store.default_cache_dir(root)
  wanted = split["train"] + split["val"] + split["test"]
  if jax.process_index() == 0:
    slice_store = store.prepare_store(wanted, cache_dir, skip_bad=config.data.skip_bad)
  sharding.sync_processes("slice store")
  if jax.process_index() != 0:
    slice_store = store.prepare_store(wanted, cache_dir, skip_bad=config.data.skip_bad)
  if slice_store.skipped and jax.process_index() == 0:
    for name, reason in slice_store.skipped:
      print(f"skipped {name}: {reason}", file=sys.stderr)
  bad = {name for name, _ in slice_store.skipped}
  if all(c.name in bad for c in split["train"]):
    raise UserError(f"{root}: every training case was skipped as bad")
  return split, slice_store


def synthetic_mismatch(root: str, config: ml_collections.ConfigDict) -> list[str]:
  """Warnings when `root` holds synthetic data made with other settings than the config's.

  `train.py` makes the data only where there is none, so data from an earlier version of
  a config (or from other flags) would be trained on silently. Files written before a
  setting existed are read as having its default then (`low_contrast_rate` 0.2).
  """
  try:
    with open(os.path.join(root, "synthetic.json")) as f:
      made = json.load(f)
  except (OSError, ValueError):
    return []
  made = {"low_contrast_rate": synthetic.LOW_CONTRAST_RATE, **made}
  wanted = dict(config.data.synthetic.to_dict(), seed=config.seed)
  differ = [f"{key} {made[key]!r} (the config asks for {value!r})"
            for key, value in sorted(wanted.items())
            if key in made and made[key] != (list(value) if isinstance(value, tuple) else value)]
  if not differ:
    return []
  return [f"warning: {root} holds synthetic data made with other settings: "
          f"{'; '.join(differ)}. Training uses it as it is; remove the folder (or point "
          "data.root elsewhere) to make it afresh."]


def _has_cases(root: str) -> bool:
  if not os.path.isdir(root):
    return False
  try:
    return bool(discovery.find_cases(root))
  except UserError:
    return False


def validate(variables, config, slice_store, names) -> dict:
  """Mean liver and tumour DSC and ASSD of the validation volumes (store volumes, in memory)."""
  segment = VolumeSegmenter(variables, config)
  entries, _ = evaluation.score_volumes(segment, evaluation.store_volumes(slice_store, names),
                                        config, progress=False)
  summary = evaluation.summarize(entries)
  val = {f"{t}_{m}": summary[t][m]["mean"] for t in ("liver", "tumor") for m in ("dsc", "assd")}
  return {k: (v if v is not None else float("nan")) for k, v in val.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns final results."""
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0
  split, slice_store = prepare_data(config)

  mesh = sharding.make_mesh()
  padded = sharding.padded_batch_size(config.train.batch_size, mesh.devices.size)
  state = create_train_state(config, jax.random.key(config.seed))
  state = jax.device_put(state, sharding.replicated(mesh))
  ckpt = Checkpointer(workdir, keep=config.checkpoint.keep)
  restored = ckpt.restore_latest(state, config)
  data_state = None
  if restored is not None:
    start_step, state, data_state = restored
    if lead:
      print(f"resuming from checkpoint at step {start_step}", flush=True)
  start = int(state.step)

  stored = set(slice_store.names)   # the cases not left out as bad
  train_store = store.open_store(slice_store.cache_dir,
                           names=[c.name for c in split["train"] if c.name in stored])
  iterator = make_train_iterator(train_store, config, global_batch=config.train.batch_size,
                                 padded_batch=padded, process_index=jax.process_index(),
                                 process_count=jax.process_count(), start_step=start)
  if data_state is not None:
    iterator.set_state(data_state)

  jit_step = lambda step: jax.jit(
      step, donate_argnums=0,
      out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)))
  # With a weight average the steps before each checkpoint also fit its batch norm: one
  # program takes a flag for it (one compile, not two).
  averaging = config.train.ema_decay > 0
  step_fn = jit_step(make_train_step(config, ema_stats=None) if averaging
                     else make_train_step(config))
  writer = MetricWriter(workdir, enabled=lead)
  val_names = [c.name for c in split["val"] if c.name in stored]
  validating = bool(val_names)
  total = config.train.steps
  bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not lead,
             dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 10.0)
  last_saved = start if restored is not None else None
  t_last, step_last = time.perf_counter(), start

  def save(step, metrics=None):
    nonlocal last_saved
    ckpt.save(step, state, iterator.get_state(), config, metrics=metrics)
    last_saved = step

  def settle(done, metrics, rate):
    """The host's side of a step: the divergence check, then its log row when `rate` is set."""
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
      raise Diverged(f"{what} at step {done}; the last good checkpoint is "
                     f"{'step ' + str(last_saved) if last_saved is not None else 'none'}")
    if rate is not None:
      values = {k: float(v) for k, v in metrics.items()}
      values["slices_per_second"] = rate
      writer.write(done, values)
      bar.set_postfix(loss=f"{loss:.4f}", lr=f"{values['learning_rate']:.2e}",
                      slices_s=f"{rate:.1f}", refresh=False)

  try:
    with _SignalFlag() as flag:
      # The host stays a step behind the device: step N+1 is dispatched before step N's
      # loss is read, and the next batch is read and staged while a step runs. A step's
      # loss is checked before any checkpoint holding it is written, so no NaN reaches one.
      pending = None   # (step, metrics, rate) dispatched but not yet checked
      batch = sharding.global_batch_from_local(next(iterator), mesh) if start < total else None
      for step in range(start, total):
        done = step + 1
        if averaging:
          fits_stats = np.bool_(ema_stats_steps(done, config, validating))
          state, metrics = step_fn(state, batch, fits_stats)
        else:
          state, metrics = step_fn(state, batch)
        for value in metrics.values():
          value.copy_to_host_async()
        rate = None
        if done % config.train.log_every_steps == 0 or done == total:
          now = time.perf_counter()
          rate = (done - step_last) * config.train.batch_size / max(now - t_last, 1e-9)
          t_last, step_last = now, done
        if pending is not None:
          settle(*pending)
        pending = (done, metrics, rate)
        bar.update(1)
        evaluate_now = val_names and (done % config.train.eval_every_steps == 0 or done == total)
        save_now = evaluate_now or done % config.checkpoint.every_steps == 0 or done == total
        signum = flag.signum   # read once: a signal arriving later waits for the next step
        if save_now or signum is not None:
          settle(*pending)
          pending = None
        if evaluate_now:
          val = validate(variables_of(state), config, slice_store, val_names)
          writer.write(done, val, prefix="val")
          bar.write(f"step {done}: validation liver DSC {val['liver_dsc']:.4f}, "
                    f"tumour DSC {val['tumor_dsc']:.4f}")
          liver = val["liver_dsc"]
          save(done, {"liver_dsc": liver if math.isfinite(liver) else -1.0})
        elif save_now:
          save(done)
        if signum is not None:
          if last_saved != done:
            save(done)
          ckpt.wait()
          raise Interrupted(signum, done)
        if done < total:   # after any save: a checkpoint's data state excludes this batch
          batch = sharding.global_batch_from_local(next(iterator), mesh)
      if pending is not None:
        settle(*pending)
  except BaseException:
    # Already failing (a full disk, a signal, a bug): tidy up without letting a second
    # error from the same cause (the disk is still full) replace the first.
    _best_effort(iterator.close, bar.close, ckpt.wait, ckpt.close, writer.close,
                 lambda: plot_curves(workdir) if lead else None)
    raise
  _finish(iterator.close, bar.close, ckpt.wait, ckpt.close, writer.close)
  if lead:
    plot_curves(workdir)

  choice = None
  if config.eval.choose_postprocessing and val_names and lead:
    choice = choose_postprocessing(variables_of(state), config, slice_store, val_names,
                                   workdir)
  return final_evaluation(variables_of(state), config, split, slice_store, workdir,
                          int(state.step), postprocessing=choice)


def choose_postprocessing(variables, config, slice_store, names, workdir) -> dict:
  """Chooses the post-processing on the validation volumes, writes it into the workdir."""
  segment = VolumeSegmenter(variables, config, postprocessing={})
  preds, refs = [], []
  for name in names:
    case = slice_store.case(name)
    preds.append(segment(case.hu))
    refs.append(np.asarray(case.labels))
  decision = pp.choose(preds, refs)
  pp.save_choice(workdir, decision)
  choice = decision["choice"]
  kept = [s for s in pp.STEPS if choice[s]]
  if choice[pp.LIVER_SHARE]:
    kept.append(f"{pp.LIVER_SHARE}={choice[pp.LIVER_SHARE]:g}")
  if choice[pp.MIN_SIZE]:
    kept.append(f"{pp.MIN_SIZE}={choice[pp.MIN_SIZE]}")
  print(f"post-processing chosen on {len(names)} validation volumes: "
        f"{', '.join(kept) if kept else 'none'}", flush=True)
  return decision["choice"]


def _best_effort(*steps) -> None:
  for step in steps:
    try:
      step()
    except Exception:  # the error already on its way out is the one to report
      pass


def _finish(*steps) -> None:
  """Runs every step; the first error is raised once all have run."""
  first = None
  for step in steps:
    try:
      step()
    except Exception as e:
      first = first or e
  if first is not None:
    raise first


def final_evaluation(variables, config, split, slice_store, workdir, step: int,
                     postprocessing=None) -> dict | None:
  """Scores `train.final_eval_split` as `eval.py --workdir` would, and prints the table.

  The same scorer and the same document as `eval.py --workdir W --split SPLIT` on this
  checkpoint (`evaluation.evaluate`), written to the same place (`results_path`); the
  volumes come from the slice store, which holds what the NIfTI files hold (HU as int16).
  Its "source" lists every case the run left out as bad, of any split.
  """
  name = config.train.final_eval_split
  if not name or not split[name] or jax.process_index() != 0:
    return None
  if postprocessing is None:
    postprocessing = pp.load_choice(workdir)
  # Cases left out as bad were reported when the store was prepared: scored are the others,
  # and the document's source lists them all.
  stored = set(slice_store.names)
  volumes = evaluation.store_volumes(slice_store,
                                     [c.name for c in split[name] if c.name in stored])
  document, path = evaluation.evaluate(variables, config, volumes, workdir=workdir, step=step,
                                       which="latest", split=name, progress=True,
                                       skipped=slice_store.skipped, allow_empty=True,
                                       postprocessing=postprocessing)
  print(f"\n{name} split, {len(document['cases'])} volumes (results in {path}):")
  print(evaluation.format_table(document), flush=True)
  if slice_store.skipped:
    print(f"skipped as bad ({len(slice_store.skipped)}, not trained on or scored): "
          + ", ".join(case for case, _ in slice_store.skipped), flush=True)
  return document
