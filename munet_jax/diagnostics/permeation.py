"""Permeation rates (Eq. 7): the pure steps 1-4 of the definition, then through a model."""

from __future__ import annotations

import functools
import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from munet_jax.config import config_from_dict
from munet_jax.models import from_config, padding

SENTINEL = -0.5        # the paper's value for "no meaningful feature"
MIN_BEFORE = 0.01      # masked mean of the normalised x_s at or below which the rate is SENTINEL
POOLINGS = ("area", "max")


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


def _model_key(config) -> str:
  return json.dumps({"model": config.model.to_dict()}, sort_keys=True)


@functools.lru_cache(maxsize=8)
def _feature_fn(key: str):
  """Jitted (variables, images) -> per stage (x_s, r_s, u_s or None), and -> per stage the
  channel-mean maps of normalised (x_s, r_s); for one model config (cached by its key)."""
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


def model_padding(config, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """The model's own padding of an (h, w) slice (`munet_jax.models.padding`)."""
  return padding(len(config.model.features), h, w)


def _pad_images(images: np.ndarray, config) -> np.ndarray:
  (t, b), (l, r) = model_padding(config, *images.shape[1:3])
  return np.pad(images, ((0, 0), (t, b), (l, r), (0, 0)), mode="edge")


def _pad_masks(masks: np.ndarray, config) -> np.ndarray:
  (t, b), (l, r) = model_padding(config, *masks.shape[-2:])
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
