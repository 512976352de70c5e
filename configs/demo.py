"""The README's main job: synthetic CT, a small mU-Net, a few minutes on a 2-core CPU.

`python train.py --config configs/demo.py --workdir runs/demo` makes the synthetic data at
`data.root` when none is there, trains, checkpoints, evaluates the held-out volumes and
prints the paper's table.
"""

from munet_jax.config import base_config


def get_config():
  c = base_config()
  c.seed = 0
  c.data.root = "data/synthetic_demo"
  c.data.synthetic.cases = 12
  c.data.synthetic.size = 64
  c.data.synthetic.slices = 24
  c.data.image_size = 64
  c.data.split = "custom"
  c.data.num_train = 8
  c.data.num_val = 1
  c.data.num_test = 3
  c.data.sampling = "liver"        # slices with liver: the small run's budget goes where it matters
  c.data.num_workers = 0
  c.model.features = (16, 32, 64, 128)
  c.model.dropout_rate = 0.1
  c.train.batch_size = 8
  c.train.steps = 600
  c.train.learning_rate = 3e-3
  c.train.lr_decay_steps = 200
  c.train.lr_decay_rate = 0.7
  c.train.weight_decay = 1e-4
  c.train.loss = "ce_dice"
  c.train.log_every_steps = 10
  c.train.eval_every_steps = 200
  c.checkpoint.every_steps = 100
  c.eval.batch_size = 24
  return c
