"""Training batches of axial slices from the slice store, with Grain.

The whole sequence of batches is a pure function of the config and the store:

  slice stream   position k -> a slice of the store. 'all': every slice once per epoch,
                 reshuffled each epoch (grain `shuffle` + `repeat`); 'liver': the same over
                 the slices holding liver; 'tumour_oversample': the 'all' stream mixed with
                 an equally reshuffled stream of tumour slices (grain `mix`), so a share
                 `data.tumour_oversample` of all positions draws a tumour slice.
  global batch   step t -> positions [t * B, (t + 1) * B) of the stream (grain `batch`), B
                 the global batch. Epochs run on across batch boundaries: no slice is
                 dropped and none is drawn twice in one epoch.
  local rows     process p of P builds rows [p * R, (p + 1) * R) of the batch padded to
                 `padded_batch` rows, R = padded_batch / P; rows >= B are padding.

So batch t holds the same slices in the same order for any number of devices or hosts,
and a run restarts at step t by indexing, not replay: the iterator's whole state is the
next step. Grain runs the batch builder in `data.num_workers` processes (each builds whole
batches: worker i makes batches t + i, t + i + W, ...; Grain hands them back in order) and
prefetches `data.prefetch` batches per worker. Batches cross from the workers in reused
shared-memory slots (`batch_slots`). Images are int16 HU (or float32 after
`munet_jax.preprocess`, see `make_train_iterator`).

Slices larger than `data.image_size` are cropped to it: in the centre (`data.train_crop`
'centre'), or, with 'foreground', at a place drawn from (seed, step, global row) so that the
window holds a voxel drawn from the slice's tumour (if it has any; else from its liver; else
anywhere), as nnU-Net's foreground sampling does: the network sees lesions at the full
resolution of slices larger than its training input.

Optional augmentation (`data.augment.enabled`, off as in the paper) draws from
`np.random.default_rng` seeded by (seed, step, global row): a flip per in-plane axis,
a rotation of up to `rotate_degrees`, a zoom of up to `scale`, as one bilinear resampling
of the image and the same nearest-neighbour resampling of the labels, then a contrast and
brightness jitter of up to `intensity` (relative, and times the HU window width).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import threading
import time
import weakref
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags
from scipy import ndimage

from munet_jax.data import batch_slots
from munet_jax.data.store import LIVER, TUMOUR, SliceStore
from munet_jax.errors import UserError
from munet_jax.preprocessing import intensity_shift, shifted

log = logging.getLogger(__name__)

PAD_HU = -1024          # air: what slices are padded with
LIVER_LABEL, TUMOUR_LABEL = 1, 2
STATE_VERSION = 1
_worker_index = None    # this Grain worker's index; None in the main process


def _mark_worker(index: int, count: int) -> None:
  """Grain worker start-up: remembers the worker's index, leaves Ctrl-C to the trainer
  and ends the worker when the trainer is gone.

  Ctrl-C reaches the whole process group; the training loop answers it by saving a
  checkpoint and closing the iterator, which stops the workers. Left to the default,
  each worker would die at once with a KeyboardInterrupt traceback of its own.
  """
  global _worker_index
  _worker_index = index
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  _exit_with_parent()


def _exit_with_parent(interval: float = 0.5) -> None:
  """Ends this process soon after its parent dies.

  A trainer killed with SIGKILL (the OOM killer, a scheduler's hard limit) cannot stop
  its Grain workers; they would live on as orphans, each holding its share of memory
  and the trainer's stdout and stderr. A daemon thread watches the parent's pid: when
  it changes, the parent is gone, and the worker goes too.
  """
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(interval)
    os._exit(1)

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _absl_flags_default() -> None:
  """Lets Grain read its absl flags (at their defaults) when no absl app parsed them."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def derive_seed(seed: int, *tags: Any) -> int:
  """A 32-bit seed from `seed` and tags; unrelated streams get unrelated seeds."""
  text = "/".join(str(t) for t in (seed, *tags))
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _epochs(pool: np.ndarray, seed: int) -> grain.MapDataset:
  """pool's elements, reshuffled every epoch, forever: element k is in epoch k // len(pool)."""
  return grain.MapDataset.source(pool).shuffle(seed=seed).repeat()


def slice_stream(flags: np.ndarray, sampling: str, tumour_oversample: float,
                 seed: int) -> grain.MapDataset:
  """The infinite stream of slice indices (into the store's `slice_table`) to train on.

  Args:
    flags: (N,) uint8 per-slice flags of the store (bits LIVER, TUMOUR).
    sampling: 'all', 'liver' or 'tumour_oversample' (`data.sampling`).
    tumour_oversample: the share of positions drawn from the tumour slices, in [0, 1).
    seed: `config.seed`.

  Raises:
    UserError naming `data.sampling` when it leaves nothing to draw from.
  """
  n = len(flags)
  if n == 0:
    raise UserError("the training volumes hold no slices")
  if sampling == "liver":
    pool = np.flatnonzero(flags & LIVER).astype(np.int32)
    if pool.size == 0:
      raise UserError("config key 'data.sampling' is 'liver' but no training slice holds "
                      "liver (label 1 or 2)")
  elif sampling in ("all", "tumour_oversample"):
    pool = np.arange(n, dtype=np.int32)
  else:
    raise UserError(f"config key 'data.sampling' must be 'all', 'liver' or "
                    f"'tumour_oversample', got {sampling!r}")
  stream = _epochs(pool, derive_seed(seed, "slices", sampling))
  if sampling == "tumour_oversample" and tumour_oversample > 0:
    tumour = np.flatnonzero(flags & TUMOUR).astype(np.int32)
    if tumour.size == 0:
      log.warning("data.sampling is 'tumour_oversample' but no training slice holds tumour; "
                  "sampling all slices")
      return stream
    stream = grain.MapDataset.mix(
        [stream, _epochs(tumour, derive_seed(seed, "tumour slices"))],
        [1.0 - tumour_oversample, tumour_oversample])
  return stream


def _place(n: int, size: int) -> tuple[slice, slice]:
  """(source, destination) index ranges that centre-crop or centre-pad n to size."""
  if n >= size:
    start = (n - size) // 2
    return slice(start, start + size), slice(0, size)
  start = (size - n) // 2
  return slice(0, n), slice(start, start + n)


def foreground_place(label: np.ndarray, size: int, rng: np.random.Generator,
                     tumour_share: float = 1.0):
  """Per-axis (source, destination) ranges of a size x size window of a 2-D `label` slice.

  Along an axis no longer than `size` the slice is centre-padded (as `_place`). Along a
  longer one the window starts where it holds a voxel drawn uniformly from the slice's
  tumour voxels, else its liver voxels, else anywhere, at a uniform place among those
  that hold it. With `tumour_share` < 1, a slice holding tumour has its window placed
  around a tumour voxel only with that probability, else around a liver voxel (the
  draw that decides is made only then, so a share of 1 leaves every window as it was).
  """
  voxel = None
  values = (TUMOUR_LABEL, LIVER_LABEL)
  if tumour_share < 1.0 and rng.random() >= tumour_share:
    values = (LIVER_LABEL, TUMOUR_LABEL)
  for value in values:
    where = np.flatnonzero(label.ravel() == value)
    if where.size:
      voxel = np.unravel_index(int(where[rng.integers(where.size)]), label.shape)
      break
  places = []
  for axis, n in enumerate(label.shape):
    if n <= size:
      places.append(_place(n, size))
      continue
    lo, hi = 0, n - size
    if voxel is not None:
      lo, hi = max(lo, int(voxel[axis]) - size + 1), min(hi, int(voxel[axis]))
    start = int(rng.integers(lo, hi + 1))
    places.append((slice(start, start + size), slice(0, size)))
  return tuple(places)


class BatchBuilder:
  """Grain `map_with_index` transform: (step, global slice ids) -> this process's rows.

  Picklable: it is sent to the worker processes, which open the memory maps themselves.
  In a worker with a slot layout set, it fills a shared-memory slot and returns only
  {'worker', 'slot', 'step'}; the main process copies the arrays out (`batch_slots`).
  """

  def __init__(self, store: SliceStore, config: ml_collections.ConfigDict, *,
               global_batch: int, rows: int, first_row: int, preprocessed: bool):
    self.store = store
    self.volume, self.z, _ = store.slice_table()
    self.names = store.names
    self.size = int(config.data.image_size)
    self.global_batch, self.rows, self.first_row = global_batch, rows, first_row
    self.real = min(max(global_batch - first_row, 0), rows)
    self.preprocessed = preprocessed
    self.hu_window = tuple(float(v) for v in config.data.hu_window)
    self.scaled_range = tuple(float(v) for v in config.data.scaled_range)
    aug = config.data.augment
    self.augment = bool(aug.enabled)
    self.flip, self.degrees = bool(aug.flip), float(aug.rotate_degrees)
    self.zoom, self.intensity = float(aug.scale), float(aug.intensity)
    self.seed = int(config.seed)
    self.places = [(_place(v.shape[1], self.size), _place(v.shape[2], self.size))
                   for v in store.volumes]
    # Each volume's HU shift (`data.reference_hu`), as inference computes it.
    self.shifts = ([intensity_shift(store.case(name).hu, config) for name in store.names]
                   if config.data.reference_hu is not None else [0] * len(store.names))
    self.foreground = config.data.train_crop == "foreground"
    self.tumour_share = float(config.data.foreground_tumour_share)
    self.slots: batch_slots.SlotLayout | None = None   # set by TrainIterator for workers
    self._segment = None
    self._count = 0
    self._scratch = None

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_segment"], state["_scratch"], state["_count"] = None, None, 0
    return state

  @property
  def fields(self) -> tuple[batch_slots.Field, ...]:
    s, rows = self.size, self.rows
    return (batch_slots.Field("image", (rows, s, s, 1),
                              "float32" if self.preprocessed else "int16"),
            batch_slots.Field("label", (rows, s, s), "int32"))

  def mask(self) -> np.ndarray:
    return np.arange(self.rows) < self.real

  def __call__(self, step: int, ids: np.ndarray) -> dict[str, Any]:
    if self.slots is not None and _worker_index is not None:
      if self._segment is None:
        self._segment = batch_slots.attach(self.slots, _worker_index)
      slot = self._count % self.slots.slots
      self._count += 1
      out = self._segment.acquire(slot)
      self.fill(step, ids, out["image"], out["label"])
      self._segment.publish(slot)
      return {"worker": _worker_index, "slot": slot, "step": step}
    image, label = (np.empty(f.shape, f.dtype) for f in self.fields)
    self.fill(step, ids, image, label)
    return {"image": image, "label": label, "mask": self.mask()}

  def fill(self, step: int, ids: np.ndarray, image: np.ndarray, label: np.ndarray) -> None:
    """Writes the rows of batch `step` (slice ids `ids`) into image (R, S, S, 1), label."""
    s, real = self.size, self.real
    if self.preprocessed:
      if self._scratch is None:
        self._scratch = np.empty((self.rows, s, s), np.int16)
      hu = self._scratch
    else:
      hu = image[..., 0]
    for r in range(real):
      slot = int(ids[self.first_row + r])
      v, z = int(self.volume[slot]), int(self.z[slot])
      volume_hu, volume_label = self.store.volume(self.names[v])
      if self.foreground:
        rng = np.random.default_rng([derive_seed(self.seed, "crop"), step, self.first_row + r])
        (sx, dx), (sy, dy) = foreground_place(volume_label[z], s, rng, self.tumour_share)
      else:
        (sx, dx), (sy, dy) = self.places[v]
      if dx.stop - dx.start < s or dy.stop - dy.start < s:
        hu[r].fill(PAD_HU)
        label[r].fill(0)
      hu[r, dx, dy] = shifted(volume_hu[z, sx, sy], self.shifts[v])
      label[r, dx, dy] = volume_label[z, sx, sy]
      if self.augment:
        hu[r], label[r] = self._augmented(step, self.first_row + r, hu[r], label[r])
    hu[real:] = PAD_HU
    label[real:] = 0
    if self.preprocessed:
      self._preprocess(hu, image[..., 0])

  def _preprocess(self, hu: np.ndarray, out: np.ndarray) -> None:
    """`munet_jax.preprocess` in place: the same float32 operations in the same order."""
    lo, hi = self.hu_window
    out_lo, out_hi = self.scaled_range
    out[...] = hu
    np.clip(out, lo, hi, out=out)
    out -= lo
    out *= (out_hi - out_lo) / (hi - lo)
    out += out_lo

  def _augmented(self, step: int, row: int, hu: np.ndarray, label: np.ndarray):
    """One slice's augmentation, drawn from (seed, step, global row) alone."""
    rng = np.random.default_rng([derive_seed(self.seed, "augment"), step, row])
    flips = rng.random(2) < 0.5
    angle = math.radians(rng.uniform(-self.degrees, self.degrees))
    zoom = 1.0 + rng.uniform(-self.zoom, self.zoom)
    contrast = 1.0 + rng.uniform(-self.intensity, self.intensity)
    brightness = rng.uniform(-self.intensity, self.intensity)
    signs = np.where(flips & self.flip, -1.0, 1.0)
    # Output pixel o reads input pixel c + m (o - c): rotate, zoom and flip about the centre.
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    m = rot @ np.diag(signs) / zoom
    centre = (np.array(hu.shape) - 1) / 2.0
    offset = centre - m @ centre
    if not np.allclose(m, np.eye(2)):
      hu = ndimage.affine_transform(hu.astype(np.float32), m, offset, order=1,
                                    mode="constant", cval=PAD_HU)
      label = ndimage.affine_transform(label, m, offset, order=0, mode="constant", cval=0)
    lo, hi = self.hu_window
    mid = (lo + hi) / 2.0
    hu = mid + (hu.astype(np.float32) - mid) * contrast + brightness * (hi - lo)
    info = np.iinfo(np.int16)
    return np.clip(np.rint(hu), info.min, info.max).astype(np.int16), label


class TrainIterator:
  """This process's rows of the global training batches, step after step.

  `next(it)` returns {'image': (R, S, S, 1) int16 HU or float32, 'label': (R, S, S) int32,
  'mask': (R,) bool}, arrays the caller owns. The state is the next step (plus what checks
  that a restored state fits), so it is the same for any number of workers, devices or
  hosts.
  """

  def __init__(self, batches: grain.MapDataset, builder: BatchBuilder, *, num_workers: int,
               prefetch: int, start_step: int, identity: dict):
    self._batches = batches
    self._builder = builder
    self._num_workers, self._prefetch = num_workers, prefetch
    self._step = start_step
    self._identity = identity
    self._iterator = None       # started at the first `next`: a `set_state` first is free
    self._pool = None
    self._finalizer = None

  def __iter__(self):
    return self

  def _start(self):
    ds = self._batches[self._step:]
    if self._num_workers > 0:
      _absl_flags_default()
      # A worker holds at most `prefetch` batches in Grain's queue and one in the making.
      self._pool = batch_slots.SlotPool(self._num_workers, max(1, self._prefetch) + 2,
                                        self._builder.fields)
      self._finalizer = weakref.finalize(self, self._pool.destroy)
      self._builder.slots = self._pool.layout   # pickled into the workers by Grain
      # Each worker builds whole batches synchronously; its queue is the prefetch.
      ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._num_workers, per_worker_buffer_size=max(1, self._prefetch)),
          worker_init_fn=_mark_worker)
    else:
      self._builder.slots = None
      threads = 1 if self._prefetch > 0 else 0
      ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                prefetch_buffer_size=self._prefetch))
    return iter(ds)

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._start()
    element = next(self._iterator)
    if "slot" in element:
      if element["step"] != self._step:   # Grain hands batches back in order; check it
        raise RuntimeError(f"data pipeline returned step {element['step']}, expected "
                           f"{self._step}")
      batch = self._pool.segment(element["worker"]).take(element["slot"])
      batch["mask"] = self._builder.mask()
    else:
      batch = element
    self._step += 1
    return batch

  def get_state(self) -> dict:
    """JSON-serialisable state: the next step and what the batches depend on."""
    return {"version": STATE_VERSION, "step": self._step, **self._identity}

  def set_state(self, state: dict) -> None:
    """Continues from `state` (from `get_state`): the next batch is that step's batch.

    A state from a run with another seed, batch size, sampling or training set still
    sets the step; the batches then differ from that run's, which is logged.
    """
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) \
        or state["step"] < 0:
      raise UserError(f"data iterator state {state!r} has no valid 'step'; the checkpoint "
                      "is damaged")
    changed = [k for k, v in self._identity.items() if k in state and state[k] != v]
    if changed:
      log.warning("data iterator state was saved with other %s; continuing from step %d "
                  "with this run's data", ", ".join(changed), state["step"])
    self.close()
    self._step = state["step"]

  def close(self) -> None:
    """Stops the worker processes and frees their memory (a later `next` restarts them)."""
    if self._pool is not None:
      self._pool.stop()
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None
    if self._finalizer is not None:
      self._finalizer()        # destroys the pool, once
      self._finalizer = None
    self._pool = None


def make_train_iterator(store: SliceStore, config: ml_collections.ConfigDict, *,
                        global_batch: int, padded_batch: int, process_index: int = 0,
                        process_count: int = 1, start_step: int = 0,
                        preprocessed: bool = False) -> TrainIterator:
  """The training batches of `store` (the training volumes) for one process.

  Args:
    store: from `store.open_store(cache_dir, names=training cases)`.
    config: reads `seed` and `data.image_size`, `train_crop`, `hu_window`, `scaled_range`,
      `reference_*` (each volume's HU shift), `sampling`, `tumour_oversample`,
      `num_workers`, `prefetch`, `augment.*`.
    global_batch: real slices per step, B (`train.batch_size`).
    padded_batch: B rounded up to a multiple of the device count; rows B.. are padding.
    process_index, process_count: this JAX process and how many there are.
    start_step: the step of the first batch (a restart without a saved state).
    preprocessed: False: `image` is int16 HU, to be put through `munet_jax.preprocess`
      on the device; True: float32 already through it.

  Returns:
    A `TrainIterator` whose batches have R = padded_batch / process_count rows:
    'image' (R, S, S, 1) int16 (or float32), 'label' (R, S, S) int32 and 'mask' (R,)
    bool, S = `data.image_size`; slices cropped (`data.train_crop`) or centre-padded with
    air (-1024 HU, label 0). Process p gets global rows [p R, (p + 1) R); rows >= B have mask False.
  """
  if global_batch < 1 or padded_batch < global_batch:
    raise ValueError(f"need 1 <= global_batch <= padded_batch, got {global_batch}, "
                     f"{padded_batch}")
  if process_count < 1 or not 0 <= process_index < process_count \
      or padded_batch % process_count:
    raise ValueError(f"padded batch {padded_batch} cannot be split over process "
                     f"{process_index} of {process_count}")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  if not store.volumes:
    raise UserError(f"{store.cache_dir}: no training volumes (every training case was "
                    "skipped as bad, or the split has none)")
  data = config.data
  _, _, flags = store.slice_table()
  stream = slice_stream(flags, data.sampling, float(data.tumour_oversample), int(config.seed))
  rows = padded_batch // process_count
  builder = BatchBuilder(store, config, global_batch=global_batch, rows=rows,
                         first_row=process_index * rows, preprocessed=preprocessed)
  batches = stream.batch(global_batch, drop_remainder=True).map_with_index(builder)
  identity = {"seed": int(config.seed), "global_batch": global_batch,
              "sampling": data.sampling, "tumour_oversample": float(data.tumour_oversample),
              "train_crop": data.train_crop,
              "volumes": store.names, "slices": int(len(flags))}
  return TrainIterator(batches, builder, num_workers=int(data.num_workers),
                       prefetch=int(data.prefetch), start_step=start_step, identity=identity)
