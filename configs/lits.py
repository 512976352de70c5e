"""Paper-faithful LiTS training (Table I widths, section II.E recipe), 512x512 slices."""

from munet_jax.config import base_config


def get_config():
  c = base_config()
  c.data.root = "data/lits"
  c.data.split = "lits"              # 40 train / 5 validation / 35 test patients
  c.data.image_size = 512
  c.train.batch_size = 15
  c.train.learning_rate = 1e-4
  c.train.lr_decay_rate = 0.9
  c.train.lr_decay_steps = 5_000
  c.train.weight_decay = 0.003
  c.train.loss = "mse"
  c.train.steps = 150_000            # 100 epochs of 1,500 steps; the paper gives no total
  c.model.features = (64, 128, 256, 512, 1024)
  c.model.dropout_rate = 0.2
  c.model.bn_momentum = 0.9
  return c
