"""The tumour benchmark: the recipe bench/ablation.py trains U-Net, U-Net + ODU and mU-Net with.

`python bench/ablation.py` (this config by default) makes the data once, with a fixed
seed, at `data.root`, and trains every network for every seed on the same cases:
`data.synthetic.cases` volumes, the first `data.num_train` for training and the rest
held out (the ablation lists them explicitly, so the split does not move with the seed).
It also runs on its own (`python train.py --config configs/synthetic_tumours.py`).

Data: as configs/demo.py (volumes drawn at 288x288, 1.07-1.6 mm pixels, 48 slices over
150-240 mm, noise scaled with the voxel volume, stored as a 168x168 window around the
liver) but with many lesions per liver (`data.synthetic.tumour_rate = 10`: 1 +
Poisson(10) in the 85% of cases with tumour), so that 40 held-out volumes hold hundreds
of small and tens of large lesions (counts in bench/RESULTS.md). Lesion sizes are the
generator's (`munet_jax.data.synthetic`).

Departures from the paper's recipe (configs/lits.py), for a CPU budget of about three
minutes per network: the liver-region volumes above instead of 512x512 slices; 64x64
training crops placed around tumour (or liver) voxels; widths 8..64 over four stages
(three skip connections), as the demo; soft Dice + cross-entropy instead of MSE; Adam
2e-3 halved at a third and two thirds of the run (1,000 steps of batch 8); no dropout;
half the training slices drawn from tumour slices; post-processing fixed for every
network (largest liver component, tumour components of fewer than 8 voxels dropped),
since there is no validation split to choose it on. The three networks differ only in
`model.odu_residual` and `model.skip_conv` (set by the ablation).
"""

from munet_jax.config import base_config


def get_config():
  c = base_config()
  c.seed = 0
  c.data.root = "data/synthetic_tumours"
  c.data.synthetic.cases = 64
  c.data.synthetic.size = 288
  c.data.synthetic.crop = 168
  c.data.synthetic.slices = 48
  c.data.synthetic.voxel_noise = True
  c.data.synthetic.tumour_rate = 10.0
  c.data.image_size = 64             # training crops; evaluation segments whole slices
  c.data.train_crop = "foreground"
  c.data.split = "custom"
  c.data.num_train = 24
  c.data.num_val = 0
  c.data.num_test = 40
  c.data.sampling = "tumour_oversample"
  c.data.tumour_oversample = 0.5
  c.data.num_workers = 0
  c.model.features = (8, 16, 32, 64)
  c.model.dropout_rate = 0.0
  c.train.batch_size = 8
  c.train.steps = 1000
  c.train.learning_rate = 2e-3
  c.train.lr_decay_steps = 334
  c.train.lr_decay_rate = 0.5
  c.train.weight_decay = 1e-4
  c.train.loss = "ce_dice"
  c.train.log_every_steps = 50
  c.train.eval_every_steps = 10 ** 9   # no validation split: the test split at the end
  c.checkpoint.every_steps = 250
  c.checkpoint.keep = 1
  c.eval.batch_size = 32
  c.eval.largest_liver_component = True   # fixed, the same for every network: there is
  c.eval.min_tumour_voxels = 8            # no validation split to choose it on
  return c
