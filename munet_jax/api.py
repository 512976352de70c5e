"""The functional entry points: `init`, `apply` and `load` from a config or a run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from munet_jax.checkpoints import load_variables
from munet_jax.models import from_config, pooling_factor


def init(rng: jax.Array, config: ml_collections.ConfigDict) -> dict:
  """Model variables (`params`, `batch_stats`) for `config`.

  Args:
    rng: a JAX PRNG key.
    config: an experiment config (its `model` section). The variables do not depend on
      the slice size, so the model is traced on the smallest slice it takes.
  """
  size = pooling_factor(len(config.model.features))
  model = from_config(config)
  dummy = jnp.zeros((1, size, size, 1), jnp.float32)
  return dict(jax.jit(lambda key: model.init(key, dummy, train=False))(rng))


def apply(variables: dict, images: jax.Array, config: ml_collections.ConfigDict,
          train: bool = False, *, rng: jax.Array | None = None,
          sample_mask: jax.Array | None = None) -> jax.Array:
  """Logits for preprocessed slices.

  Args:
    variables: from `init` or `munet_jax.load`.
    images: (N, H, W, 1) float, after `munet_jax.preprocess`; any H and W.
    config: the experiment config the variables belong to.
    train: dropout on and batch-norm statistics from this batch (needs `rng`); the
      updated running statistics are not returned (the trainer keeps them).
    rng: PRNG key for dropout when `train`.
    sample_mask: optional (N,) bool; False rows are left out of batch statistics.

  Returns:
    (N, H, W, num_classes) float32 logits.
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 1:
    raise ValueError(f"images must have shape (N, H, W, 1), got {images.shape}")
  model = from_config(config)
  if not train:
    return model.apply(variables, images, train=False, sample_mask=sample_mask)
  if rng is None:
    raise ValueError("apply(train=True) needs rng for dropout")
  logits, _ = model.apply(variables, images, train=True, sample_mask=sample_mask,
                          rngs={"dropout": rng}, mutable=["batch_stats"])
  return logits


def load(workdir: str, which: str = "latest") -> tuple[ml_collections.ConfigDict, dict]:
  """(config, variables) from the newest ('latest') or best-validated ('best') checkpoint.

  A damaged newest checkpoint falls back to the previous complete one with a one-line
  warning; a missing or wholly damaged run is a `UserError` naming the folder.
  """
  config, variables, _ = load_variables(workdir, which)
  return config, variables
