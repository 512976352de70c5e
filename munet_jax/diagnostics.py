"""Does the object-dependent up-sampling do what the paper says? Permeation rates and skip features.

The paper's diagnostic (Eq. 7, Fig. 2) is the permeation rate: per skip stage, how much of
an object's feature survives the ODU residual subtraction r_s = x_s - u_s. It should be
high for small objects at early stages (u_s ~ 0, "annihilation": the object passes) and
low for large ones (u_s ~ the low-frequency part of x_s: only edges pass). Fig. 3 shows
the skip features themselves. This module computes both for a trained network.

Definition (our reading of Eq. 7, whose typesetting the PDF lost; PAPER.md):
  Stage s = 1 .. S-1 is a skip connection (modules skip_1 .. skip_{S-1}); it works at
  1 / 2**(s-1) of the (padded) input's resolution. For one image, x_s is the encoder
  feature entering the skip ("before_residual") and r_s = x_s - u_s the feature leaving
  the ODU residual path ("after_residual", right before the skip's extra convolution);
  in a network without the residual path (model.odu_residual=False) r_s is x_s.
  1. Normalisation: every feature map -- one channel of one image -- is min-max
     normalised to [0, 1] over its whole extent, x_s and r_s each on their own. A
     constant map carries nothing and normalises to 0.
  2. The object mask (input resolution) is brought to stage s by area: a stage pixel is
     in the object when at least half of the 2**(s-1) x 2**(s-1) input pixels it covers
     are ("area", the default). An object smaller than half a stage pixel therefore
     vanishes at that stage, as small objects do in the paper's Fig. 2. `pooling="max"`
     counts any overlap instead (max-pooling the mask): every object keeps a pixel at
     every stage, measured on pixels that are mostly background.
  3. Masked mean: the mean of the normalised feature over its channels and the object's
     stage pixels (the mean over channels of per-channel masked means; every channel
     has the same pixels, so the two orders agree).
  4. rate_s = masked mean of normalised r_s / masked mean of normalised x_s. It is
     the sentinel -0.5 (the paper's "no meaningful features") when the masked mean of
     x_s is <= 0.01, and when the object has no pixel at stage s.
  For a network without the residual path the rate is therefore exactly 1 wherever it
  is defined. The rate is not bounded by 1, and values above 1 are common in trained
  networks: r_s is a signed residual, so min-max normalisation puts its zero (full
  cancellation) near mid-range, while x_s inside an organ often sits near the bottom of
  its own range. Compare objects (small against large) rather than reading the value
  against 1 (bench/RESULTS.md, the ablation).

Slices whose sides are not a multiple of 2**(S-1) are edge-padded, as the model does
itself; the mask is padded with background, and normalisation covers the padded map.

Objects (command line): per axial slice, every 2-D tumour component (face connectivity)
and the liver (labels 1 and 2); small when its area in that slice, with the volume's
spacing, is below `eval.small_lesion_mm` squared (28 x 28 mm², the paper's bound; its
"65 pixels at stage 4" depends on the pixel size, so the physical area is used).

Command line (PNG plots with matplotlib's Agg canvas, a JSON of the numbers):
  python -m munet_jax.diagnostics --workdir W [--data DIR] [--split val] [--out DIR]
      [--compare-workdir W2] [--which latest|best] [--max-slices N] [--pooling area|max]
      [--small-lesion-mm MM] [--batch-size B]
writes OUT/permeation.json (every object's rates and the summary per group), OUT/
permeation.png (Fig. 2: rate per stage, small against large objects, mean ± std of the
defined rates, each object a dot, the share at -0.5 annotated) and OUT/skip_features.png
(Fig. 3: for the held-out slice with a small and a large tumour, x_s and r_s per stage;
with --compare-workdir, the second run's skip features beside them). OUT defaults to
WORKDIR/diagnostics.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from munet_jax.atomic import atomic_output
from munet_jax.errors import UserError, run_cli

SENTINEL = -0.5        # the paper's value for "no meaningful feature"
MIN_BEFORE = 0.01      # masked mean of the normalised x_s at or below which the rate is SENTINEL
POOLINGS = ("area", "max")


# ------------------------------------------------------------------------ pure functions


def normalise_maps(features):
  """Min-max normalises each feature map (one channel of one image) to [0, 1].

  Args:
    features: (N, h, w, C) float.

  Returns:
    (N, h, w, C) float32 in [0, 1]; a constant map becomes 0.
  """
  features = jnp.asarray(features, jnp.float32)
  lo = jnp.min(features, axis=(1, 2), keepdims=True)
  span = jnp.max(features, axis=(1, 2), keepdims=True) - lo
  return jnp.where(span > 0, (features - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def channel_mean_map(features):
  """(N, h, w, C) features -> (N, h, w): the channel mean of the normalised maps (step 1, 3)."""
  return normalise_maps(features).mean(axis=-1)


def downsample_mask(mask, shape: Sequence[int], pooling: str = "area"):
  """Brings an object mask to a stage's resolution (step 2 of the definition).

  Args:
    mask: (N, H, W) bool at input resolution.
    shape: (h, w) of the stage; H = f * h and W = f * w for one integer f >= 1.
    pooling: 'area' (at least half the covered input pixels) or 'max' (any of them).

  Returns:
    (N, h, w) bool.
  """
  if pooling not in POOLINGS:
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
  mask = jnp.asarray(mask, bool)
  n, big_h, big_w = mask.shape
  h, w = (int(v) for v in shape)
  f = big_h // h
  if f < 1 or f * h != big_h or f * w != big_w:
    raise ValueError(f"mask of shape {(big_h, big_w)} is not an integer multiple of the "
                     f"stage shape {(h, w)}")
  blocks = mask.reshape(n, h, f, w, f)
  if pooling == "max":
    return blocks.any(axis=(2, 4))
  # 2 * count >= f * f: "at least half", exact in integers.
  return 2 * blocks.sum(axis=(2, 4), dtype=jnp.int32) >= f * f


def masked_sums(before_map, after_map, mask):
  """Per image: the sums of two (N, h, w) maps over `mask` (N, h, w) and the mask's count.

  Returns:
    (before_sum, after_sum, count), each (N,) float32.
  """
  m = jnp.asarray(mask, jnp.float32)
  return ((before_map * m).sum(axis=(1, 2)), (after_map * m).sum(axis=(1, 2)),
          m.sum(axis=(1, 2)))


def rate_from_sums(before_sum, after_sum, count):
  """Step 4: after / before masked means, SENTINEL where undefined. Works element-wise."""
  before_sum, after_sum, count = (jnp.asarray(a, jnp.float32) for a in (before_sum, after_sum, count))
  safe = jnp.maximum(count, 1.0)
  defined = (count > 0) & (before_sum / safe > MIN_BEFORE)
  return jnp.where(defined, after_sum / jnp.where(defined, before_sum, 1.0), SENTINEL)


@functools.partial(jax.jit, static_argnames=("pooling",))
def permeation_from_features(before, after, mask, pooling: str = "area"):
  """Permeation rate per image at one stage, from the features around the residual path.

  Args:
    before: (N, h, w, C) x_s, the feature entering the skip connection.
    after: (N, h, w, C) r_s = x_s - u_s, the feature after the residual path.
    mask: (N, H, W) bool object mask at input resolution, H = f * h, W = f * w.
    pooling: how the mask reaches the stage ('area' or 'max'; module docstring).

  Returns:
    (N,) float32 rates; SENTINEL (-0.5) where the mask vanishes at this stage or the
    masked mean of the normalised `before` is <= 0.01.
  """
  small = downsample_mask(mask, before.shape[1:3], pooling)
  return rate_from_sums(*masked_sums(channel_mean_map(before), channel_mean_map(after), small))


# ------------------------------------------------------------------------ through a model


def _model_key(config) -> str:
  return json.dumps({"model": config.model.to_dict()}, sort_keys=True)


@functools.lru_cache(maxsize=8)
def _feature_fn(key: str):
  """Jitted (variables, images) -> per stage (x_s, r_s, u_s or None), and -> per stage the
  channel-mean maps of normalised (x_s, r_s); for one model config (cached by its key)."""
  from munet_jax.config import config_from_dict
  from munet_jax.models import from_config
  config = config_from_dict(json.loads(key))
  model = from_config(config)
  stages = len(config.model.features) - 1

  @jax.jit
  def features(variables, images):
    _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    inter = state["intermediates"]
    out = []
    for s in range(1, stages + 1):
      node = inter[f"skip_{s}"]
      up = node["odu"]["upsampled"][0] if "odu" in node else None
      out.append((node["before_residual"][0], node["after_residual"][0], up))
    return out

  @jax.jit
  def maps(variables, images):
    return [(channel_mean_map(x), channel_mean_map(r)) for x, r, _ in features(variables, images)]

  return features, maps


def _padding(config, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """The model's own padding of an (h, w) slice to a multiple of its pooling factor."""
  multiple = 2 ** (len(config.model.features) - 1)
  ph, pw = (-h) % multiple, (-w) % multiple
  return (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)


def _pad_images(images: np.ndarray, config) -> np.ndarray:
  (t, b), (l, r) = _padding(config, *images.shape[1:3])
  return np.pad(images, ((0, 0), (t, b), (l, r), (0, 0)), mode="edge")


def _pad_masks(masks: np.ndarray, config) -> np.ndarray:
  (t, b), (l, r) = _padding(config, *masks.shape[-2:])
  pad = [(0, 0)] * (masks.ndim - 2) + [(t, b), (l, r)]
  return np.pad(np.asarray(masks, bool), pad)


def _check_batch(images, labels=None) -> tuple[np.ndarray, np.ndarray | None]:
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] != 1:
    raise ValueError(f"images must have shape (N, H, W, 1), got {images.shape}")
  if labels is None:
    return images, None
  labels = np.asarray(labels)
  if labels.shape != images.shape[:3]:
    raise ValueError(f"labels must have shape {images.shape[:3]} (N, H, W), got {labels.shape}")
  return images, labels.astype(bool)


def skip_features(variables, images, config) -> list[dict]:
  """The features around each skip connection's residual path, for inspection (Fig. 3).

  Args:
    variables: model variables ({'params', 'batch_stats'}).
    images: (N, H, W, 1) preprocessed slices (`munet_jax.preprocess`).
    config: the config the variables belong to.

  Returns:
    One dict per stage s = 1 .. S-1: "before" x_s and "after" r_s, each (N, h_s, w_s, C_s)
    float32 numpy, and "upsampled" u_s (None without the residual path), on the padded
    grid (see the module docstring).
  """
  images, _ = _check_batch(images)
  features, _ = _feature_fn(_model_key(config))
  out = []
  for x, r, u in features(variables, _pad_images(images, config)):
    out.append({"before": np.asarray(x), "after": np.asarray(r),
                "upsampled": None if u is None else np.asarray(u)})
  return out


def permeation_rate(variables, images, labels, config, *, per_image: bool = False,
                    pooling: str = "area") -> np.ndarray:
  """The permeation rate of Eq. 7 per skip stage, for one object mask per image.

  Args:
    variables: model variables ({'params', 'batch_stats'}).
    images: (N, H, W, 1) preprocessed slices (`munet_jax.preprocess` of HU).
    labels: (N, H, W) bool: True on the object whose rate is wanted (one liver, one
      tumour, or a union of objects); integer arrays are read as `labels != 0`.
    config: the config the variables belong to (its `model` section).
    per_image: return one rate per image instead of the batch's.
    pooling: 'area' or 'max', how the mask reaches each stage (module docstring).

  Returns:
    float32 numpy: (S-1,) with stage s at index s-1 -- the batch's rate, from the masked
    sums pooled over all images (each image normalised on its own), i.e. the batch's
    objects taken as one; or (N, S-1) when `per_image`. SENTINEL (-0.5) where undefined.
  """
  if pooling not in POOLINGS:
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
  images, labels = _check_batch(images, labels)
  _, maps = _feature_fn(_model_key(config))
  masks = _pad_masks(labels, config)
  rates = []
  for before_map, after_map in maps(variables, _pad_images(images, config)):
    small = downsample_mask(masks, before_map.shape[1:3], pooling)
    sums = masked_sums(before_map, after_map, small)
    if not per_image:
      sums = tuple(s.sum(keepdims=True) for s in sums)
    rates.append(np.asarray(rate_from_sums(*sums)))
  out = np.stack(rates, axis=-1).astype(np.float32)
  return out if per_image else out[0]


def object_rates(variables, config, images, masks, image_index, *, pooling: str = "area",
                 batch_size: int = 16) -> np.ndarray:
  """Permeation rates of many objects, several per image, the features computed once per image.

  Args:
    variables, config: the model.
    images: (N, H, W, 1) preprocessed slices.
    masks: (M, H, W) bool, one object each.
    image_index: (M,) int, the image of each object.
    pooling: 'area' or 'max'.
    batch_size: images per forward pass.

  Returns:
    (M, S-1) float32, SENTINEL where undefined.
  """
  images, _ = _check_batch(images)
  masks = np.asarray(masks, bool)
  image_index = np.asarray(image_index, np.int64)
  if masks.ndim != 3 or masks.shape[1:] != images.shape[1:3] or image_index.shape != masks.shape[:1]:
    raise ValueError(f"masks must be (M, H, W) with (H, W) = {images.shape[1:3]} and "
                     f"image_index (M,); got {masks.shape} and {image_index.shape}")
  _, maps = _feature_fn(_model_key(config))
  stages = len(config.model.features) - 1
  out = np.full((len(masks), stages), SENTINEL, np.float32)
  for start in range(0, len(images), batch_size):
    stop = min(start + batch_size, len(images))
    chunk = np.zeros((batch_size,) + images.shape[1:], np.float32)  # one compiled shape
    chunk[:stop - start] = images[start:stop]
    rows = np.flatnonzero((image_index >= start) & (image_index < stop))
    if rows.size == 0:
      continue
    stage_maps = maps(variables, _pad_images(chunk, config))
    padded = _pad_masks(masks[rows], config)
    local = image_index[rows] - start
    for s, (before_map, after_map) in enumerate(stage_maps):
      small = downsample_mask(padded, before_map.shape[1:3], pooling)
      sums = masked_sums(np.asarray(before_map)[local], np.asarray(after_map)[local], small)
      out[rows, s] = np.asarray(rate_from_sums(*sums))
  return out


# ------------------------------------------------------------------------ objects in slices


def slice_objects(label_slice: np.ndarray, spacing_xy: Sequence[float],
                  small_area_mm2: float) -> list[dict]:
  """The objects of one axial label slice: each tumour component, and the liver.

  Args:
    label_slice: (X, Y) labels 0/1/2.
    spacing_xy: in-plane voxel size (mm).
    small_area_mm2: an object whose area in this slice is below this is small.

  Returns:
    [{"kind": "tumour" | "liver", "mask": (X, Y) bool, "area_mm2", "pixels", "small"}].
    Tumours are 2-D connected components (face connectivity, as `munet_jax.lesions` in
    3-D); the liver is labels 1 and 2 together, one object per slice.
  """
  from scipy import ndimage
  pixel_mm2 = float(spacing_xy[0]) * float(spacing_xy[1])
  objects = []

  def add(kind, mask):
    pixels = int(mask.sum())
    objects.append({"kind": kind, "mask": mask, "pixels": pixels,
                    "area_mm2": pixels * pixel_mm2,
                    "small": pixels * pixel_mm2 < small_area_mm2})

  components, n = ndimage.label(label_slice == 2)
  for i in range(1, n + 1):
    add("tumour", components == i)
  liver = label_slice > 0
  if liver.any():
    add("liver", liver)
  return objects


def _choose_slices(label_ras: np.ndarray, limit: int) -> np.ndarray:
  """Axial slices holding liver or tumour: tumour slices first, each set evenly thinned."""
  tumour = np.flatnonzero((label_ras == 2).any(axis=(0, 1)))
  liver = np.setdiff1d(np.flatnonzero((label_ras > 0).any(axis=(0, 1))), tumour)

  def thin(idx, k):
    if k <= 0 or idx.size == 0:
      return idx[:0]
    if idx.size <= k:
      return idx
    return idx[np.unique(np.round(np.linspace(0, idx.size - 1, k)).astype(int))]

  chosen = thin(tumour, limit)
  chosen = np.concatenate([chosen, thin(liver, limit - chosen.size)])
  return np.sort(chosen)


def volume_object_rates(variables, config, hu_ras: np.ndarray, label_ras: np.ndarray,
                        spacing: Sequence[float], *, small_area_mm2: float,
                        max_slices: int = 40, pooling: str = "area",
                        batch_size: int = 16) -> tuple[list[dict], list[dict]]:
  """Permeation rates of every object in up to `max_slices` slices of one volume.

  Args:
    variables, config: the model (and its HU window).
    hu_ras, label_ras: (X, Y, Z) Hounsfield units and labels 0/1/2, RAS order.
    spacing: (3,) voxel size (mm), RAS order.
    small_area_mm2, max_slices, pooling, batch_size: see `slice_objects`, `object_rates`.

  Returns:
    (records, slices): one record per object {"slice", "kind", "pixels", "area_mm2",
    "small", "rates": [S-1 floats]}, and per chosen slice {"slice", "objects": [record
    indices]} (for picking a slice to show).
  """
  from munet_jax.preprocessing import preprocess
  zs = _choose_slices(label_ras, max_slices)
  if zs.size == 0:
    return [], []
  images = preprocess(np.moveaxis(hu_ras[:, :, zs], -1, 0), config)[..., None]
  records, masks, index, slices = [], [], [], []
  for i, z in enumerate(zs):
    found = slice_objects(label_ras[:, :, z], spacing[:2], small_area_mm2)
    slices.append({"slice": int(z), "objects": list(range(len(records), len(records) + len(found)))})
    for obj in found:
      masks.append(obj.pop("mask"))
      index.append(i)
      records.append({"slice": int(z), **obj})
  rates = object_rates(variables, config, images, np.stack(masks), np.array(index),
                       pooling=pooling, batch_size=batch_size)
  for record, r in zip(records, rates):
    record["rates"] = [float(v) for v in r]
  return records, slices


def summarize_rates(records: Sequence[dict], stages: int) -> dict:
  """Per group and stage: objects, defined rates' mean / std (population) / median, vanished share.

  Groups: 'small' and 'large' (all kinds), and 'tumour_small', 'tumour_large',
  'liver_small', 'liver_large'. Means leave out the SENTINEL values; 'vanished' is the
  share of the group's objects whose rate is SENTINEL at that stage.
  """
  groups = {"small": lambda r: r["small"], "large": lambda r: not r["small"]}
  for kind in ("tumour", "liver"):
    groups[f"{kind}_small"] = lambda r, k=kind: r["kind"] == k and r["small"]
    groups[f"{kind}_large"] = lambda r, k=kind: r["kind"] == k and not r["small"]
  out = {}
  for name, member in groups.items():
    rates = np.array([r["rates"] for r in records if member(r)], np.float64).reshape(-1, stages)
    entry = {"objects": int(len(rates)), "defined": [], "mean": [], "std": [], "median": [],
             "vanished": []}
    for s in range(stages):
      col = rates[:, s]
      ok = col[col != SENTINEL]
      entry["defined"].append(int(ok.size))
      entry["mean"].append(float(ok.mean()) if ok.size else None)
      entry["std"].append(float(ok.std()) if ok.size else None)
      entry["median"].append(float(np.median(ok)) if ok.size else None)
      entry["vanished"].append(float((col == SENTINEL).mean()) if col.size else None)
    out[name] = entry
  return out


# ------------------------------------------------------------------------ pictures


def _save_png(fig, path: str) -> None:
  """Writes a matplotlib figure as PNG atomically (temporary name, then rename)."""
  with atomic_output(path, ".png") as tmp:
    fig.savefig(tmp, format="png")


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
  from matplotlib.figure import Figure
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
  _save_png(fig, path)


def _to_display(a: np.ndarray) -> np.ndarray:
  from munet_jax.overlays import _display
  return _display(a)


def _upsampled_crop(map_hw: np.ndarray, factor: int, pad, shape) -> np.ndarray:
  """A stage map back on the input grid: nearest up-sampling, the model's padding cut off."""
  (top, _), (left, _) = pad
  big = np.repeat(np.repeat(map_hw, factor, axis=0), factor, axis=1)
  return big[top:top + shape[0], left:left + shape[1]]


def plot_skip_features(path: str, hu_slice: np.ndarray, label_slice: np.ndarray,
                       runs: Sequence[tuple[str, object, object]], title: str,
                       rates: Sequence[tuple[str, list]] = (), pooling: str = "area") -> None:
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
  """
  from matplotlib.figure import Figure
  from munet_jax.preprocessing import preprocess
  columns = []
  for k, (name, variables, config) in enumerate(runs):
    image = preprocess(hu_slice[None, :, :, None].astype(np.float32), config)
    feats = skip_features(variables, image, config)
    pad = _padding(config, *hu_slice.shape)
    on_grid = lambda key: [_upsampled_crop(np.asarray(channel_mean_map(f[key]))[0], 2 ** s, pad,
                                           hu_slice.shape) for s, f in enumerate(feats)]
    if config.model.odu_residual:
      columns.append((f"{name}: x_s (before residual)", on_grid("before"), False))
      columns.append((f"{name}: r_s = x_s - u_s", on_grid("after"), k == 0))
    else:
      columns.append((f"{name}: x_s (copied, no ODU)", on_grid("before"), False))
  stages = min(len(c[1]) for c in columns)
  config = runs[0][2]
  pad = _padding(config, *hu_slice.shape)
  padded_label = np.pad(label_slice, pad)
  window = tuple(config.data.hu_window)
  fig = Figure(figsize=(2.1 * (len(columns) + 1), 2.1 * stages + 0.7), dpi=80)
  axes = fig.subplots(stages, len(columns) + 1, squeeze=False)
  liver, tumour = _to_display(label_slice > 0), _to_display(label_slice == 2)

  def contours(ax):
    for mask, colour in ((liver, "#33dd33"), (tumour, "#ff3333")):
      if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.6)

  for s in range(stages):
    ax = axes[s, 0]
    ax.set_axis_off()
    if s == 0:
      ax.imshow(_to_display(np.clip(hu_slice.astype(np.float32), *window)), cmap="gray",
                vmin=window[0], vmax=window[1], interpolation="nearest")
      contours(ax)
      ax.set_title("CT, reference", fontsize=7)
    else:
      shape = tuple(n // 2 ** s for n in padded_label.shape)
      reached = np.zeros(hu_slice.shape + (3,), np.float32)
      for value, colour in ((1, (0.2, 0.85, 0.2)), (2, (1.0, 0.2, 0.2))):
        m = np.asarray(downsample_mask((padded_label >= value)[None], shape, pooling))[0]
        reached[_upsampled_crop(m, 2 ** s, pad, hu_slice.shape)] = colour
      ax.imshow(np.stack([_to_display(reached[..., i]) for i in range(3)], axis=-1),
                interpolation="nearest")
      ax.set_title(f"reference at stage {s + 1}", fontsize=7)
    ax.text(-0.06, 0.5, f"stage {s + 1} (1/{2 ** s})", transform=ax.transAxes, rotation=90,
            ha="right", va="center", fontsize=8)
    for c, (column_title, maps, with_rates) in enumerate(columns):
      ax = axes[s, c + 1]
      ax.set_axis_off()
      ax.imshow(_to_display(maps[s]), cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
      contours(ax)
      if s == 0:
        ax.set_title(column_title, fontsize=7)
      if with_rates and rates:
        ax.text(0.5, -0.02, "rate " + ", ".join(f"{t} {r[s]:.2f}" for t, r in rates),
                transform=ax.transAxes, ha="center", va="top", fontsize=6)
  fig.suptitle(title, fontsize=8)
  fig.tight_layout(rect=(0.03, 0, 1, 0.97))
  _save_png(fig, path)


# ------------------------------------------------------------------------ command line


def _parse(argv: Sequence[str]):
  class Parser(argparse.ArgumentParser):
    def error(self, message):
      raise UserError(f"python -m munet_jax.diagnostics: {message}")

  p = Parser(prog="python -m munet_jax.diagnostics",
             description="Permeation rates (Eq. 7, Fig. 2) and skip features (Fig. 3) of a "
                         "trained mU-Net, on small and large objects of its data.")
  p.add_argument("--workdir", required=True, help="the training run")
  p.add_argument("--data", help="the data root (default: the run's data.root)")
  p.add_argument("--split", default="val", choices=("train", "val", "test", "all"),
                 help="which of the run's splits to look at (default val)")
  p.add_argument("--out", help="output folder (default WORKDIR/diagnostics)")
  p.add_argument("--which", default="latest", choices=("latest", "best"), help="checkpoint")
  p.add_argument("--compare-workdir", help="a second run (e.g. the U-Net) shown in the "
                 "feature picture and measured on the same objects")
  p.add_argument("--max-slices", type=int, default=40,
                 help="slices per volume at most, tumour slices first (default 40)")
  p.add_argument("--pooling", default="area", choices=POOLINGS,
                 help="how object masks reach each stage (default area)")
  p.add_argument("--small-lesion-mm", type=float,
                 help="objects below this squared (mm^2) in a slice are small "
                      "(default: the run's eval.small_lesion_mm, 28)")
  p.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
  args = p.parse_args(argv)
  if args.max_slices < 1:
    raise UserError("--max-slices must be >= 1")
  if args.batch_size < 1:
    raise UserError("--batch-size must be >= 1")
  if args.small_lesion_mm is not None and not args.small_lesion_mm > 0:
    raise UserError("--small-lesion-mm must be positive")
  return args


def _load_run(workdir: str, which: str, flag: str):
  from munet_jax.checkpoints import load_variables
  if not os.path.isdir(workdir):
    raise UserError(f"{workdir}: {flag} not found")
  return load_variables(workdir, which)


def _slice_score(slice_info, records) -> tuple:
  objs = [records[i] for i in slice_info["objects"]]
  small_t = [o for o in objs if o["kind"] == "tumour" and o["small"]]
  large_t = [o for o in objs if o["kind"] == "tumour" and not o["small"]]
  large = [o for o in objs if not o["small"]]
  tumour_area = sum(o["pixels"] for o in objs if o["kind"] == "tumour")
  return (bool(small_t) and bool(large_t), bool(small_t) and bool(large), bool(small_t),
          tumour_area)


def run(args) -> tuple[dict, list[str]]:
  """The command: rates for every object of the chosen split, the two pictures, the JSON.

  Returns (the JSON document, the files written).
  """
  from munet_jax.data import nifti
  from munet_jax.data.discovery import find_cases
  from munet_jax.data.splits import split_cases
  from munet_jax.evaluation import write_json

  config, variables, step = _load_run(args.workdir, args.which, "--workdir")
  compare = None
  if args.compare_workdir:
    compare = _load_run(args.compare_workdir, args.which, "--compare-workdir")
  root = args.data or config.data.root
  if not os.path.isdir(root):
    raise UserError(f"{root}: data folder not found (give --data)")
  config.data.root = root
  small_mm = args.small_lesion_mm or float(config.eval.small_lesion_mm)
  small_area = small_mm ** 2
  cases = find_cases(root)
  chosen = cases if args.split == "all" else split_cases(cases, config)[args.split]
  if not chosen:
    raise UserError(f"{root}: the '{args.split}' split of this run's config "
                    f"(data.split='{config.data.split}') has no case; try --split")
  out = args.out or os.path.join(args.workdir, "diagnostics")
  stages = len(config.model.features) - 1
  if stages < 1:
    raise UserError(f"{args.workdir}: the model has one stage and no skip connection")
  runs = [("run", variables, config)]
  if compare is not None:
    runs.append(("compare", compare[1], compare[0]))
    if len(compare[0].model.features) - 1 != stages:
      raise UserError(f"{args.compare_workdir}: {len(compare[0].model.features)} stages, "
                      f"the --workdir run has {stages + 1}")

  records = {name: [] for name, _, _ in runs}
  best = None
  for case in chosen:
    if case.label is None:
      continue
    image = nifti.read_image(case.image)
    label = nifti.read_label(case.label, like=image)
    hu = nifti.to_ras(image.data, image.affine)
    ref = nifti.to_ras(label.data, image.affine)
    spacing = nifti.ras_spacing(image.affine)
    for name, v, c in runs:
      recs, slices = volume_object_rates(v, c, hu, ref, spacing, small_area_mm2=small_area,
                                         max_slices=args.max_slices, pooling=args.pooling,
                                         batch_size=args.batch_size)
      for r in recs:
        r["case"] = case.name
      if name == "run":
        for sl in slices:
          score = _slice_score(sl, recs)
          if best is None or score > best[0]:
            best = (score, case.name, sl["slice"], hu[:, :, sl["slice"]].copy(),
                    ref[:, :, sl["slice"]].copy(), spacing,
                    [recs[i] for i in sl["objects"]])
      records[name].extend(recs)
  if not records["run"]:
    raise UserError(f"{root}: no liver or tumour in the '{args.split}' split's labels, so "
                    "no object to measure")

  document = {
      "source": {"workdir": os.path.abspath(args.workdir), "checkpoint_step": int(step),
                 "which": args.which, "data": os.path.abspath(root), "split": args.split,
                 "cases": [c.name for c in chosen], "max_slices": args.max_slices},
      "definition": {"pooling": args.pooling, "sentinel": SENTINEL, "min_before": MIN_BEFORE,
                     "small_area_mm2": small_area, "normalisation": "min-max per channel per image",
                     "rate": "masked mean of normalised r_s / masked mean of normalised x_s"},
      "stages": list(range(1, stages + 1)),
      "model": {"odu_residual": bool(config.model.odu_residual),
                "skip_conv": bool(config.model.skip_conv),
                "features": list(config.model.features)},
      "summary": summarize_rates(records["run"], stages),
      "objects": records["run"],
  }
  if compare is not None:
    document["compare"] = {
        "workdir": os.path.abspath(args.compare_workdir),
        "model": {"odu_residual": bool(compare[0].model.odu_residual),
                  "skip_conv": bool(compare[0].model.skip_conv)},
        "summary": summarize_rates(records["compare"], stages),
        "objects": records["compare"]}
  json_path = os.path.join(out, "permeation.json")
  write_json(json_path, document)

  series, dots = {}, {}
  for name, recs in records.items():
    summary = document["summary"] if name == "run" else document["compare"]["summary"]
    for group in ("small", "large"):
      label = group if compare is None else (
          f"{group}, {_model_name(config)}" if name == "run"
          else f"{group}, {_model_name(compare[0])} (compare)")
      series[label] = summary[group]
      dots[label] = [r["rates"] for r in recs if r["small"] == (group == "small")]
  model_name = _model_name(config)
  plot_permeation(os.path.join(out, "permeation.png"), series, stages,
                  f"permeation rate, {model_name}, '{args.split}' split "
                  f"(small: < {small_mm:g} x {small_mm:g} mm²)", dots)

  _, case_name, z, hu_slice, ref_slice, spacing, objs = best
  rate_lines = []
  for kind, small in (("tumour", True), ("tumour", False), ("liver", False)):
    picked = [o for o in objs if o["kind"] == kind and o["small"] == small]
    if picked:
      o = max(picked, key=lambda o: o["pixels"]) if not small else min(picked,
                                                                     key=lambda o: o["pixels"])
      rate_lines.append((("small" if small else "large") + (" tum." if kind == "tumour"
                                                            else " liver"), o["rates"]))
  named = [(("mU-Net" if c.model.odu_residual and c.model.skip_conv else _model_name(c))
            + (" (compare)" if name == "compare" else ""), v, c) for name, v, c in runs]
  plot_skip_features(os.path.join(out, "skip_features.png"), hu_slice, ref_slice, named,
                     f"{case_name}, axial slice {z}: skip features (channel mean of "
                     f"normalised maps)", rate_lines[:2], args.pooling)
  return document, [json_path, os.path.join(out, "permeation.png"),
                    os.path.join(out, "skip_features.png")]


def _model_name(config) -> str:
  m = config.model
  if m.odu_residual and m.skip_conv:
    return "mU-Net"
  if m.odu_residual:
    return "U-Net + ODU residual"
  if m.skip_conv:
    return "U-Net + skip conv"
  return "U-Net"


def _format(document: dict) -> str:
  stages = document["stages"]
  lines = [f"{'group':14s}{'objects':>8s}" + "".join(f"{'stage ' + str(s):>16s}" for s in stages)]
  for group in ("small", "large", "tumour_small", "tumour_large", "liver_small", "liver_large"):
    e = document["summary"][group]
    cells = []
    for m, sd, v in zip(e["mean"], e["std"], e["vanished"]):
      cells.append("-" if m is None else f"{m:.2f}±{sd:.2f} ({100 * v:.0f}%)")
    lines.append(f"{group:14s}{e['objects']:>8d}" + "".join(f"{c:>16s}" for c in cells))
  lines.append("(mean ± std of defined rates; in brackets the share at -0.5)")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  args = _parse(argv)
  import matplotlib
  matplotlib.use("Agg")
  from munet_jax.runtime import configure_jax, configure_logging
  configure_jax()
  configure_logging()
  document, paths = run(args)
  print(_format(document))
  print("wrote " + ", ".join(paths))
  return 0


if __name__ == "__main__":
  sys.exit(run_cli(main))
