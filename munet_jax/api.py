"""The functional entry points of SPEC.md: `init` and `apply` from a config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from munet_jax.models import from_config


def init(rng: jax.Array, config: ml_collections.ConfigDict, image_size: int | None = None) -> dict:
  """Model variables (`params`, `batch_stats`) for `config`.

  Args:
    rng: a JAX PRNG key.
    config: an experiment config (its `model` section, and `data.image_size` for the
      shape of the initialising batch; any size gives the same variables).
    image_size: optional side of the dummy slice used to trace the model (small is fast).
  """
  size = image_size or 2 ** (len(config.model.features) - 1)
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
  warning; a missing or wholly damaged run is a `UserError` naming the folder (and then
  no warning: the error says it all).
  """
  from munet_jax.training.checkpointing import load_variables
  config, variables, _ = load_run(workdir, which, load_variables)
  return config, variables


def load_run(workdir: str, which: str = "latest", loader=None):
  """`checkpointing.load_variables(workdir, which)` -> (config, variables, step), quietly.

  Orbax reports a damaged checkpoint with a many-line TensorStore dump and, after a
  failed restore, leaves asynchronous reads behind that print "Event loop is closed"
  tracebacks when the process exits. Command-line tools promise one line per problem,
  so the warnings are shortened to one line each (and dropped when loading fails), and
  those leftover reports (only they) are filtered out of `sys.unraisablehook`.
  """
  import logging
  if loader is None:
    from munet_jax.training.checkpointing import load_variables as loader
  logger = logging.getLogger("munet_jax.training.checkpointing")
  held = []

  class _Hold(logging.Handler):
    def emit(self, record):
      held.append(record)

  handler = _Hold(level=logging.WARNING)
  saved_propagate = logger.propagate
  logger.addHandler(handler)
  logger.propagate = False
  _ignore_orbax_leftovers()  # before: a failed restore's reads report while we still try
  try:
    result = loader(workdir, which)
  finally:
    logger.removeHandler(handler)
    logger.propagate = saved_propagate
  for record in held:
    message = " ".join(record.getMessage().split())
    if len(message) > 200:
      message = message[:197] + "..."
    logger.warning("%s", message)
  return result


def _ignore_orbax_leftovers() -> None:
  """Drops the unraisable-exception reports of orbax's abandoned reads (see `load_run`)."""
  import sys
  previous = sys.unraisablehook
  if getattr(previous, "_munet_filter", False):
    return

  def hook(unraisable):
    exc, obj = unraisable.exc_value, unraisable.object
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
      return
    if getattr(obj, "__qualname__", "").startswith("_read_array") or \
        "orbax" in str(getattr(getattr(obj, "cr_code", None), "co_filename", "")):
      return
    previous(unraisable)

  hook._munet_filter = True
  sys.unraisablehook = hook
