"""What a user watches: `metrics.jsonl`, TensorBoard event files, a PNG of the curves."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import numpy as np
from matplotlib.figure import Figure
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.summary import scalar

from munet_jax.atomic import write_png
from munet_jax.errors import UserError


class MetricWriter:
  """Appends {'step', name: value...} rows to `workdir/metrics.jsonl` and TensorBoard.

  Both are written in the calling thread, so a full disk is reported here, as one
  `UserError` naming the file, rather than by a background thread. Event files are
  synced at most every `flush_seconds` and on `close`.
  """

  def __init__(self, workdir: str, enabled: bool = True, flush_seconds: float = 10.0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._events = None
    self._events_dir = os.path.join(workdir, "tensorboard")
    self._flush_seconds, self._flushed = flush_seconds, time.monotonic()
    self._line_start = False   # whether the file is known to end with a whole row
    if enabled:
      with _reporting(self._events_dir, "the TensorBoard event file"):
        os.makedirs(self._events_dir, exist_ok=True)
        self._events = EventsWriter(os.path.join(self._events_dir, "events"))

  def write(self, step: int, values: dict, prefix: str = "train") -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    summaries = []
    for name, value in values.items():
      value = float(value)
      finite = math.isfinite(value)   # an empty reference gives inf distances
      row[f"{prefix}/{name}"] = value if finite else None
      if finite:
        summaries.append(scalar(f"{prefix}/{name}", value))
    with _reporting(self.path, "the training metrics"), open(self.path, "a") as f:
      if not self._line_start:
        # A run killed mid-append leaves a row without its newline; end it, or the
        # resumed run's first row would be glued to it and lost.
        if f.tell() > 0 and _last_byte(self.path) != b"\n":
          f.write("\n")
        self._line_start = True
      f.write(json.dumps(row) + "\n")
    with _reporting(self._events_dir, "the TensorBoard event file"):
      for summary in summaries:
        self._events.write_event(Event(wall_time=time.time(), step=int(step), summary=summary))
      if time.monotonic() - self._flushed > self._flush_seconds:
        self._events.flush()
        self._flushed = time.monotonic()

  def close(self) -> None:
    if self._events is not None:
      events, self._events = self._events, None
      with _reporting(self._events_dir, "the TensorBoard event file"):
        events.close()


@contextlib.contextmanager
def _reporting(path: str, what: str):
  """An OSError while writing `what` becomes one UserError naming `path`."""
  try:
    yield
  except OSError as e:
    raise UserError(f"{path}: cannot write {what} ({e.strerror or e})") from e


def _last_byte(path: str) -> bytes:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1)


def read_metrics(path: str) -> list[dict]:
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        line = line.strip()
        if line:
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError:  # a line cut short by a kill
            continue
  return rows


def plot_curves(workdir: str) -> str | None:
  """Writes `workdir/training_curves.png` (loss, learning rate, validation DSC); its path."""
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  if not rows:
    return None
  def series(name):
    pts = sorted({r["step"]: r[name] for r in rows if r.get(name) is not None}.items())
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])

  panels = [("train/loss", "training loss", True), ("train/learning_rate", "learning rate", False),
            ("val/liver_dsc", "validation DSC", False)]
  panels = [p for p in panels if len(series(p[0])[0])]
  fig = Figure(figsize=(4.5 * len(panels), 3.5), dpi=100)
  axes = fig.subplots(1, len(panels), squeeze=False)
  for ax, (name, title, log_scale) in zip(axes[0], panels):
    x, y = series(name)
    ax.plot(x, y, marker="." if len(x) < 30 else None)
    if name == "val/liver_dsc":
      xt, yt = series("val/tumor_dsc")
      if len(xt):
        ax.plot(xt, yt, marker="." if len(xt) < 30 else None)
        ax.legend(["liver", "tumour"])
    if log_scale and np.all(y > 0):
      ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, "training_curves.png")
  write_png(fig, path)
  return path
