"""The README's main job: synthetic CT, a small mU-Net, a few minutes on a 2-core CPU.

`python train.py --config configs/demo.py --workdir runs/demo` makes the synthetic data at
`data.root` when none is there, trains, checkpoints, evaluates the held-out volumes and
prints the paper's table.

Departures from the paper's recipe (configs/lits.py), for a CPU budget of minutes:
96x96 volumes instead of 512x512, trained on 80x80 centre crops (the crop removes air
around the body; evaluation segments whole slices), widths 16..128 over four stages,
soft Dice + cross-entropy instead of MSE, a higher learning rate decaying faster, no
dropout, and tumour slices oversampled. At this size most synthetic tumours are a few
voxels across, and a model this small and this briefly trained finds few of them (a
fifth of the held-out lesions in bench/RESULTS.md). Liver is what it shows.
"""

from munet_jax.config import base_config


def get_config():
  c = base_config()
  c.seed = 0
  c.data.root = "data/synthetic_demo"
  c.data.synthetic.cases = 32
  c.data.synthetic.size = 96
  c.data.synthetic.slices = 24
  c.data.image_size = 80             # centre crops for training; whole slices for evaluation
  c.data.split = "custom"
  c.data.num_train = 24
  c.data.num_val = 2
  c.data.num_test = 6
  c.data.sampling = "tumor_oversample"
  c.data.tumor_oversample = 0.3
  c.data.num_workers = 0             # two cores: the training step needs both
  c.model.features = (16, 32, 64, 128)
  c.model.dropout_rate = 0.0
  c.train.batch_size = 8
  c.train.steps = 1000
  c.train.learning_rate = 2e-3
  c.train.lr_decay_steps = 300
  c.train.lr_decay_rate = 0.7
  c.train.weight_decay = 1e-4
  c.train.loss = "ce_dice"
  c.train.log_every_steps = 10
  c.train.eval_every_steps = 500
  c.checkpoint.every_steps = 100
  c.eval.batch_size = 24
  return c
