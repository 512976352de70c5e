"""Segmentation losses on (N, H, W, K) logits with integer labels and a per-row mask.

Padding rows (mask False) contribute nothing, and every loss is normalised over the real
rows only, so the value does not depend on how much padding the batch carries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _masked_mean(per_row: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(per_row.dtype)
  return jnp.sum(per_row * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _real(x):
  """float32 for float32 and narrower logits (bfloat16 compute); float64 stays float64."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def mse_loss(logits, labels, mask):
  """The paper's loss: mean squared error between softmax probabilities and one-hot labels."""
  probs = jax.nn.softmax(_real(logits), axis=-1)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=probs.dtype)
  return _masked_mean(jnp.mean((probs - onehot) ** 2, axis=(1, 2, 3)), mask)


def soft_dice_loss(logits, labels, mask, eps: float = 1.0):
  """1 - soft Dice per foreground class (classes 1..K-1) over the whole batch, averaged.

  The sums run over every real row's pixels before the ratio (a "batch Dice"). Per
  slice, a class the slice does not hold would score (eps) / (P + eps) for predicted
  mass P: every tumour probability on a tumour-free slice costs almost a full unit,
  while a correct pixel inside a tumour earns little, and small tumours are never
  learned. Pooled over the batch, absent classes cost in proportion. The sums are over
  the global batch, so the value does not depend on how it is split over devices.
  """
  probs = jax.nn.softmax(_real(logits), axis=-1)[..., 1:]
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=probs.dtype)[..., 1:]
  rows = mask.astype(probs.dtype)[:, None, None, None]
  inter = jnp.sum(probs * onehot * rows, axis=(0, 1, 2))
  denom = jnp.sum((probs + onehot) * rows, axis=(0, 1, 2))
  dice = (2.0 * inter + eps) / (denom + eps)   # (K-1,); a class absent everywhere scores ~1
  return jnp.mean(1.0 - dice)


def cross_entropy_loss(logits, labels, mask):
  ce = optax.softmax_cross_entropy_with_integer_labels(_real(logits), labels)
  return _masked_mean(jnp.mean(ce, axis=(1, 2)), mask)


def ce_dice_loss(logits, labels, mask):
  return cross_entropy_loss(logits, labels, mask) + soft_dice_loss(logits, labels, mask)


LOSSES = {"mse": mse_loss, "dice": soft_dice_loss, "ce_dice": ce_dice_loss}


def get_loss(name: str):
  return LOSSES[name]
