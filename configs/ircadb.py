"""3Dircadb-01 (converted to the LiTS layout by `python -m munet_jax.data.ircadb`)."""

from munet_jax.config import base_config


def get_config():
  c = base_config()
  c.data.root = "data/ircadb"
  c.data.split = "ircadb"            # 15 train / 5 test patients, as in the paper
  c.data.image_size = 512
  c.train.steps = 30_000             # 2,295 training slices: about 200 epochs at batch 15
  c.train.eval_every_steps = 1_000
  return c
