"""The diagnostics' pictures: permeation rate per stage (Fig. 2) and skip features (Fig. 3).

Matplotlib's Agg canvas directly (no pyplot): nothing needs a display.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from munet_jax.atomic import write_png
from munet_jax.diagnostics.permeation import (SENTINEL, channel_mean_map, downsample_mask,
                                              model_padding, skip_features)
from munet_jax.overlays import display
from munet_jax.preprocessing import preprocess, shifted
from munet_jax.labels import liver_mask, tumour_mask


GROUP_STYLE = {"small": ("#1f77b4", "small objects"), "large": ("#d62728", "large objects")}


def plot_permeation(path: str, series: dict, stages: int, title: str,
                    records: dict | None = None) -> None:
  """The Fig. 2 picture: permeation rate per stage, mean ± std of the defined rates.

  Args:
    path: the .png file (written atomically).
    series: {label: summary entry of `summarize_rates` (keys 'mean', 'std', 'vanished',
      'objects')}; a label starting with 'small'/'large' takes that group's colour unless
      it is a (label, colour) tuple key; a label ending in '(compare)' is drawn dashed.
    stages: S-1.
    title: the figure's title.
    records: optional {label: (K, S-1) array of per-object rates}, drawn as faint dots
      (SENTINEL values at -0.5, as the paper draws them).
  """
  fig = Figure(figsize=(6.4, 4.2), dpi=100)
  ax = fig.subplots()
  x = np.arange(1, stages + 1)
  rng = np.random.default_rng(0)
  n = len(series)
  for k, (label, entry) in enumerate(series.items()):
    colour = None
    if isinstance(label, tuple):
      label, colour = label
    else:
      for prefix, (c, _) in GROUP_STYLE.items():
        if label.startswith(prefix):
          colour = c
    offset = (k - (n - 1) / 2) * 0.08
    if records is not None and label in records and len(records[label]):
      pts = np.asarray(records[label], float)
      jitter = rng.uniform(-0.03, 0.03, pts.shape)
      ax.scatter((x[None, :] + offset + jitter).ravel(), pts.ravel(), s=4, alpha=0.15,
                 color=colour, linewidths=0)
    mean = np.array([np.nan if v is None else v for v in entry["mean"]])
    std = np.array([np.nan if v is None else v for v in entry["std"]])
    vanished = entry.get("vanished") or [None] * stages
    second = label.endswith("(compare)")   # the --compare-workdir run: dashed, squares
    ax.errorbar(x + offset, mean, yerr=std, marker="s" if second else "o", capsize=3,
                color=colour, ls="--" if second else "-", mfc="white" if second else colour,
                label=f"{label} (n={entry['objects']})")
    for xs, v, m in zip(x + offset, vanished, mean):
      if v is not None and v > 0:
        ax.annotate(f"{100 * v:.0f}%", (xs, SENTINEL), textcoords="offset points",
                    xytext=(0, 4 + 8 * (k % 2)), ha="center", fontsize=7, color=colour)
  ax.axhline(1.0, color="grey", lw=0.8, ls=":")
  ax.axhline(SENTINEL, color="grey", lw=0.8, ls="--")
  ax.set_xticks(x)
  ax.set_xlabel("stage (skip connection; resolution 1/2^(s-1))")
  ax.set_ylabel("permeation rate (mean ± std of defined)")
  tops = [m + sd for e in series.values() for m, sd in zip(e["mean"], e["std"]) if m is not None]
  ax.set_ylim(SENTINEL - 0.15, max([1.2] + tops) + 0.1)
  ax.set_title(title, fontsize=10)
  ax.text(0.01, 0.02, "at -0.5: share of objects without a rate", transform=ax.transAxes,
          fontsize=7, color="grey")
  ax.legend(fontsize=8, loc="upper right")
  fig.tight_layout()
  write_png(fig, path)


def _upsampled_crop(map_hw: np.ndarray, factor: int, pad, shape) -> np.ndarray:
  """A stage map back on the input grid: nearest up-sampling, the model's padding cut off."""
  (top, _), (left, _) = pad
  big = np.repeat(np.repeat(map_hw, factor, axis=0), factor, axis=1)
  return big[top:top + shape[0], left:left + shape[1]]


def plot_skip_features(path: str, hu_slice: np.ndarray, label_slice: np.ndarray,
                       runs: Sequence[tuple[str, object, object]], title: str,
                       rates: Sequence[tuple[str, list]] = (), pooling: str = "area",
                       shifts: Sequence[int] | None = None) -> None:
  """The Fig. 3 picture for one slice: skip features per stage (rows), per run (columns).

  Each run ("name", variables, config) gives two columns when it has the ODU residual
  path -- x_s (before) and r_s = x_s - u_s (what the skip carries before its extra
  convolution) -- and one column (the copied x_s) when it has not. Each panel is the
  channel mean of the per-channel min-max normalised maps (the quantity the permeation
  rate averages), on the input grid, with the reference contours (liver green, tumour
  red). The first column shows the CT (stage 1) and then the reference as it reaches
  each stage (`pooling`), the masks the rates are measured on.

  Args:
    path: the .png file.
    hu_slice, label_slice: (X, Y) HU and labels 0/1/2 of a RAS axial slice.
    runs: a few (name, variables, config), all with the same number of stages.
    title: the figure's title.
    rates: optional (text, [S-1 rates]) printed under the first run's r_s panels.
    pooling: how the reference is shown at each stage ('area' or 'max').
    shifts: each run's HU shift of the slice's volume (`intensity_shift`); 0 when None.
  """
  columns = []
  for k, (name, variables, config) in enumerate(runs):
    shift = shifts[k] if shifts is not None else 0
    image = preprocess(shifted(hu_slice[None, :, :, None].astype(np.float32), shift), config)
    feats = skip_features(variables, image, config)
    pad = model_padding(config, *hu_slice.shape)
    on_grid = lambda key: [_upsampled_crop(np.asarray(channel_mean_map(f[key]))[0], 2 ** s, pad,
                                           hu_slice.shape) for s, f in enumerate(feats)]
    if config.model.odu_residual:
      columns.append((f"{name}: x_s (before residual)", on_grid("before"), False))
      columns.append((f"{name}: r_s = x_s - u_s", on_grid("after"), k == 0))
    else:
      columns.append((f"{name}: x_s (copied, no ODU)", on_grid("before"), False))
  stages = min(len(c[1]) for c in columns)
  config = runs[0][2]
  pad = model_padding(config, *hu_slice.shape)
  padded_label = np.pad(label_slice, pad)
  window = tuple(config.data.hu_window)
  fig = Figure(figsize=(2.1 * (len(columns) + 1), 2.1 * stages + 0.7), dpi=80)
  axes = fig.subplots(stages, len(columns) + 1, squeeze=False)
  liver, tumour = display(liver_mask(label_slice)), display(tumour_mask(label_slice))

  def contours(ax):
    for mask, colour in ((liver, "#33dd33"), (tumour, "#ff3333")):
      if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.6)

  for s in range(stages):
    ax = axes[s, 0]
    ax.set_axis_off()
    if s == 0:
      ax.imshow(display(np.clip(hu_slice.astype(np.float32), *window)), cmap="gray",
                vmin=window[0], vmax=window[1], interpolation="nearest")
      contours(ax)
      ax.set_title("CT, reference", fontsize=7)
    else:
      shape = tuple(n // 2 ** s for n in padded_label.shape)
      reached = np.zeros(hu_slice.shape + (3,), np.float32)
      for value, colour in ((1, (0.2, 0.85, 0.2)), (2, (1.0, 0.2, 0.2))):
        m = np.asarray(downsample_mask((padded_label >= value)[None], shape, pooling))[0]
        reached[_upsampled_crop(m, 2 ** s, pad, hu_slice.shape)] = colour
      ax.imshow(np.stack([display(reached[..., i]) for i in range(3)], axis=-1),
                interpolation="nearest")
      ax.set_title(f"reference at stage {s + 1}", fontsize=7)
    ax.text(-0.06, 0.5, f"stage {s + 1} (1/{2 ** s})", transform=ax.transAxes, rotation=90,
            ha="right", va="center", fontsize=8)
    for c, (column_title, maps, with_rates) in enumerate(columns):
      ax = axes[s, c + 1]
      ax.set_axis_off()
      ax.imshow(display(maps[s]), cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
      contours(ax)
      if s == 0:
        ax.set_title(column_title, fontsize=7)
      if with_rates and rates:
        ax.text(0.5, -0.02, "rate " + ", ".join(f"{t} {r[s]:.2f}" for t, r in rates),
                transform=ax.transAxes, ha="center", va="top", fontsize=6)
  fig.suptitle(title, fontsize=8)
  fig.tight_layout(rect=(0.03, 0, 1, 0.97))
  write_png(fig, path)
