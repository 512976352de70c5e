"""The optimiser of section II.E: Adam, staircase decay, L2 weight decay."""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """lr * rate ** floor(step / decay_steps): 1e-4 x 0.9 every 5,000 steps in the paper."""
  t = config.train
  return optax.exponential_decay(t.learning_rate, transition_steps=t.lr_decay_steps,
                                 decay_rate=t.lr_decay_rate, staircase=True)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with weight decay, either as L2 in the loss's gradient (paper) or decoupled (AdamW).

  L2: the gradient of 0.5 * wd * |w|^2 is added before Adam's scaling, as a TensorFlow
  L2 regulariser does. Decoupled: wd * w is added after it, scaled by the learning rate.
  Decay applies to every parameter with more than one dimension (kernels), not to biases,
  batch-norm scales or PReLU slopes.
  """
  t = config.train
  schedule = learning_rate_schedule(config)
  kernels_only = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)
  if t.decoupled_weight_decay:
    return optax.adamw(schedule, weight_decay=t.weight_decay, mask=kernels_only)
  return optax.chain(
      optax.add_decayed_weights(t.weight_decay, mask=kernels_only),
      optax.scale_by_adam(),
      optax.scale_by_learning_rate(schedule),
  )

