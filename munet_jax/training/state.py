"""The training state and the pure, jitted training step."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from munet_jax.models import from_config, pooling_factor
from munet_jax.preprocessing import preprocess
from munet_jax.training.losses import get_loss
from munet_jax.training.optimizer import create_optimizer, learning_rate_schedule


class TrainState(train_state.TrainState):
  """Parameters, optimiser state and step, plus batch-norm statistics and the dropout key."""
  batch_stats: Any = None
  dropout_key: jax.Array = None   # raw key data (uint32), so checkpoints hold plain arrays


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
  """Fresh variables (section II.E initialisation) and Adam state for `config`."""
  model = from_config(config)
  init_key, dropout_key = jax.random.split(rng)
  size = pooling_factor(len(config.model.features))   # the smallest slice it takes
  variables = model.init(init_key, jnp.zeros((1, size, size, 1), jnp.float32), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           tx=create_optimizer(config), batch_stats=variables["batch_stats"],
                           dropout_key=jax.random.key_data(dropout_key))


def make_train_step(config: ml_collections.ConfigDict) -> Callable:
  """`step(state, batch) -> (state, metrics)` for batches {image, label, mask}.

  `batch['image']` is (N, H, W, 1): float, already through `preprocess`, or integer
  Hounsfield units, which are windowed and scaled here on the device (the data
  pipeline then moves half the bytes). `batch['mask']` marks real rows; padding rows
  count neither in the loss nor in the batch-norm statistics. Dropout for step s uses
  fold_in(dropout_key, s).
  """
  loss_fn = get_loss(config.train.loss)
  schedule = learning_rate_schedule(config)

  def step(state: TrainState, batch: dict):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
    images = batch["image"]
    if jnp.issubdtype(images.dtype, jnp.integer):
      images = preprocess(images, config)

    def objective(params):
      logits, updates = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, images, train=True,
          sample_mask=batch["mask"], rngs={"dropout": key}, mutable=["batch_stats"])
      return loss_fn(logits, batch["label"], batch["mask"]), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {"loss": loss, "learning_rate": schedule(state.step),
               "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  return step


def variables_of(state: TrainState) -> dict:
  return flax.core.freeze({"params": state.params, "batch_stats": state.batch_stats}).unfreeze()
