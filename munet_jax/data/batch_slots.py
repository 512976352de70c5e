"""Reusable shared-memory slots that carry batches from worker processes to the trainer.

Grain's own route puts every batch into a fresh shared-memory block. At 512x512 a batch of
15 is 24 MB (int16 images, int32 labels), and touching that many fresh pages costs more
than building the batch (about 28 ms against 3 ms on the 2-core benchmark machine, see
bench/RESULTS.md, "Why batches cross in reused shared-memory slots"). So the main process allocates, once, a few slots per worker; a
worker fills a free slot and sends only its number through Grain, and the main process
copies the batch out and frees the slot. Pages are touched once, then reused.

Each worker's segment starts with an int32 header: [stop, state of slot 0, 1, ...]
(state 0 free, 1 filled). A worker waits for its next slot to be free; `stop` set by the
main process ends that wait when the pipeline closes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import time
from multiprocessing import shared_memory
from typing import Sequence

import numpy as np

from munet_jax.errors import UserError

_ALIGN = 4096
_POLL_S = 0.0002


@dataclasses.dataclass(frozen=True)
class Field:
  """One array of a batch: its key, shape and dtype."""
  key: str
  shape: tuple[int, ...]
  dtype: str

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def _round_up(n: int) -> int:
  return -(-n // _ALIGN) * _ALIGN


@dataclasses.dataclass(frozen=True)
class SlotLayout:
  """Where everything lies in one worker's segment; picklable, sent to the workers."""
  names: tuple[str, ...]      # one segment per worker
  slots: int
  fields: tuple[Field, ...]

  @property
  def header_bytes(self) -> int:
    return _round_up(4 * (1 + self.slots))

  @property
  def slot_bytes(self) -> int:
    return sum(_round_up(f.nbytes) for f in self.fields)

  @property
  def segment_bytes(self) -> int:
    return self.header_bytes + self.slots * self.slot_bytes


class Segment:
  """One worker's slots, as numpy views of its shared memory."""

  def __init__(self, layout: SlotLayout, shm: shared_memory.SharedMemory):
    self.shm = shm
    self.header = np.ndarray((1 + layout.slots,), np.int32, buffer=shm.buf)
    self.views = []
    offset = layout.header_bytes
    for _ in range(layout.slots):
      views = {}
      for f in layout.fields:
        views[f.key] = np.ndarray(f.shape, f.dtype, buffer=shm.buf, offset=offset)
        offset += _round_up(f.nbytes)
      self.views.append(views)

  def acquire(self, slot: int) -> dict[str, np.ndarray]:
    """Waits until `slot` is free (worker side) and returns its arrays to fill."""
    while self.header[1 + slot] != 0:
      if self.header[0]:
        raise RuntimeError("data pipeline closed")
      time.sleep(_POLL_S)
    return self.views[slot]

  def publish(self, slot: int) -> None:
    self.header[1 + slot] = 1

  def take(self, slot: int) -> dict[str, np.ndarray]:
    """Copies a filled slot out and frees it (main side)."""
    out = {k: np.array(v) for k, v in self.views[slot].items()}
    self.header[1 + slot] = 0
    return out

  def close(self) -> None:
    self.header = None
    self.views = []
    try:
      self.shm.close()
    except BufferError:   # a view still held somewhere: the mapping goes with it
      pass


class SlotPool:
  """The segments of all workers, created and finally unlinked by the main process."""

  def __init__(self, workers: int, slots: int, fields: Sequence[Field]):
    token = secrets.token_hex(4)
    self.layout = SlotLayout(names=tuple(f"munet-{os.getpid()}-{token}-{i}"
                                         for i in range(workers)),
                             slots=slots, fields=tuple(fields))
    self.segments: list[Segment] = []
    try:
      for name in self.layout.names:
        shm = shared_memory.SharedMemory(name=name, create=True,
                                         size=self.layout.segment_bytes)
        self.segments.append(Segment(self.layout, shm))
        try:
          # Reserve the memory now: a too small /dev/shm is then a clear error here,
          # not a SIGBUS in a worker.
          os.posix_fallocate(shm._fd, 0, self.layout.segment_bytes)
        except (AttributeError, OSError) as e:
          if isinstance(e, OSError) and e.errno == 28:   # ENOSPC
            raise UserError(
                f"/dev/shm: not enough shared memory for the data workers "
                f"({workers} x {self.layout.segment_bytes / 2**20:.0f} MiB); give the "
                "container more (docker --shm-size) or lower data.num_workers / "
                "data.prefetch (0 workers: no shared memory)") from e
    except BaseException:
      self.destroy()
      raise

  def segment(self, worker: int) -> Segment:
    return self.segments[worker]

  def stop(self) -> None:
    """Tells waiting workers to give up (before the workers are stopped)."""
    for s in self.segments:
      if s.header is not None:
        s.header[0] = 1

  def destroy(self) -> None:
    self.stop()
    for s in self.segments:
      shm = s.shm
      s.close()
      try:
        shm.unlink()
      except FileNotFoundError:
        pass
    self.segments = []


def attach(layout: SlotLayout, worker: int) -> Segment:
  """A worker's view of its segment."""
  return Segment(layout, shared_memory.SharedMemory(name=layout.names[worker]))
