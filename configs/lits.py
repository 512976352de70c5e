"""Paper-faithful LiTS training: the schema's defaults are the paper's recipe.

`munet_jax.config.base_config` holds it, key by key: Table I widths (64..1024), 512x512
slices, batch 15, Adam at 1e-4 with a staircase decay of 0.9 every 5,000 steps, L2 weight
decay 0.003, MSE on the softmax probabilities, dropout 0.2, batch-norm decay 0.9, the HU
window (-250, 250), all slices uniformly, the 40 / 5 / 35 patient split, no
post-processing; 150,000 steps (100 epochs of 1,500 steps; the paper gives no total).
"""

from munet_jax.config import base_config


def get_config():
  c = base_config()
  c.data.root = "data/lits"
  return c
