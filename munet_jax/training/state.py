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
  """Parameters, optimiser state and step, plus batch-norm statistics and the dropout key.

  `ema_params` is the moving average of the parameters when `train.ema_decay` > 0 (then
  validation, evaluation and inference use it), and `ema_batch_stats` the batch-norm
  statistics of the averaged network: the running statistics belong to the current
  weights, and the averaged ones need their own (`make_train_step(..., ema_stats=True)`).
  Both are None otherwise, so that a run without them checkpoints exactly the arrays it
  did before.
  """
  batch_stats: Any = None
  dropout_key: jax.Array = None   # raw key data (uint32), so checkpoints hold plain arrays
  ema_params: Any = None
  ema_batch_stats: Any = None


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
  """Fresh variables (section II.E initialisation) and Adam state for `config`.

  Built by one compiled program: run op by op, the initialisation compiles each of its
  hundreds of small operations on its own (42 s for the demo's network on a 2-core CPU).
  Its values need no optimised code, so XLA's backend optimisation is off for it (about
  5 s), where the backend accepts that option.
  """
  model = from_config(config)
  tx = create_optimizer(config)
  averaged = config.train.ema_decay > 0
  size = pooling_factor(len(config.model.features))   # the smallest slice it takes

  def create(rng):
    init_key, dropout_key = jax.random.split(rng)
    variables = model.init(init_key, jnp.zeros((1, size, size, 1), jnp.float32), train=False)
    params = variables["params"]
    copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree) if averaged else None
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             batch_stats=variables["batch_stats"],
                             dropout_key=jax.random.key_data(dropout_key),
                             ema_params=copy(params),
                             ema_batch_stats=copy(variables["batch_stats"]))

  if isinstance(rng, jax.core.Tracer):   # inside a transformation (eval_shape, jit)
    return create(rng)
  lowered = jax.jit(create).lower(rng)
  try:
    compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
  except Exception:   # a backend without the option: the default compile
    compiled = lowered.compile()
  return compiled(rng)


def ema_update(ema, params, step: jax.Array, decay: float):
  """One step of the weights' moving average, after the update of step `step` (0-based).

  The decay is min(decay, (1 + n) / (10 + n)) with n = step + 1 updates so far, so
  the first steps' random initialisation does not linger in the average (the warm-up of
  TensorFlow's ExponentialMovingAverage with `num_updates`).
  """
  n = jnp.asarray(step, jnp.float32) + 1.0
  d = jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))
  return jax.tree_util.tree_map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)


def make_train_step(config: ml_collections.ConfigDict, ema_stats: bool | None = False
                    ) -> Callable:
  """`step(state, batch) -> (state, metrics)` for batches {image, label, mask}.

  With `ema_stats` (and a weight average kept) the step also runs the averaged weights
  forward on the same batch, in training mode, to update their batch-norm statistics:
  a third more work, so the trainer does it only in the steps just before a checkpoint
  (`ema_stats_steps`). With `ema_stats=None` the step is `step(state, batch, fit_stats)`
  and fits them where the boolean `fit_stats` is true: both kinds of step in one
  compiled program (each program takes about 20 s to compile on a 2-core CPU).

  `batch['image']` is (N, H, W, 1): float, already through `preprocess`, or integer
  Hounsfield units, which are windowed and scaled here on the device (the data
  pipeline then moves half the bytes). `batch['mask']` marks real rows; padding rows
  count neither in the loss nor in the batch-norm statistics. Dropout for step s uses
  fold_in(dropout_key, s).
  """
  loss_fn = get_loss(config.train.loss)
  schedule = learning_rate_schedule(config)

  def step(state: TrainState, batch: dict, fit_stats=None):
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
    if state.ema_params is not None:
      ema = ema_update(state.ema_params, new_state.params, state.step, config.train.ema_decay)
      new_state = new_state.replace(ema_params=ema)
      def fitted(ema):
        _, updates = state.apply_fn(
            {"params": ema, "batch_stats": state.ema_batch_stats}, images, train=True,
            sample_mask=batch["mask"], rngs={"dropout": key}, mutable=["batch_stats"])
        return updates["batch_stats"]

      if ema_stats is None:
        new_state = new_state.replace(ema_batch_stats=jax.lax.cond(
            fit_stats, fitted, lambda _: state.ema_batch_stats, ema))
      elif ema_stats:
        new_state = new_state.replace(ema_batch_stats=fitted(ema))
    metrics = {"loss": loss, "learning_rate": schedule(state.step),
               "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  return step


def ema_stats_steps(done: int, config: ml_collections.ConfigDict, validating: bool) -> bool:
  """Whether step `done` (1-based) updates the averaged network's batch-norm statistics.

  True in the `train.ema_stats_steps` steps up to and including each checkpoint the
  trainer writes on schedule (every `checkpoint.every_steps`, every
  `train.eval_every_steps` when `validating`, the last step), so that each checkpoint
  holds statistics of its own averaged weights. With batch-norm momentum m the
  statistics of K such steps weigh the older ones by m ** K.
  """
  t = config.train
  if t.ema_decay <= 0:
    return False
  ends = [config.checkpoint.every_steps] + ([t.eval_every_steps] if validating else [])
  ahead = min([t.steps - done] + [(-done) % every for every in ends])
  return ahead < t.ema_stats_steps


def variables_of(state: TrainState) -> dict:
  """The variables to evaluate: the averaged network when the run keeps an average."""
  if state.ema_params is None:
    params, stats = state.params, state.batch_stats
  else:
    params, stats = state.ema_params, state.ema_batch_stats
  return flax.core.freeze({"params": params, "batch_stats": stats}).unfreeze()
