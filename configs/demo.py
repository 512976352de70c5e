"""The README's main job: synthetic CT, a small mU-Net, a few minutes on a 2-core CPU.

`python train.py --config configs/demo.py --workdir runs/demo` makes the synthetic data at
`data.root` when none is there, trains, checkpoints, evaluates the held-out volumes and
prints the paper's table.

Departures from the paper's recipe (configs/lits.py), for a CPU budget of minutes:
- Data: 64 synthetic volumes (48 training, 4 validation, 12 held out) drawn at 192x192
  (1.6-2.4 mm pixels; 32 slices over 150-240 mm, so 4.7-7.5 mm thick) and stored as a
  112x112 window around the liver (a liver region of interest, as cascaded
  liver-tumour methods use) instead of whole 512x512 slices; 1 + Poisson(6) lesions in
  each liver with tumour (85% of cases; the generator's default is 1 + Poisson(2.5)), so
  that the held-out volumes hold large lesions as well as small ones.
- Training on 80x80 crops placed around a tumour voxel of the slice (else a liver voxel;
  `data.train_crop = "foreground"`), a quarter of the slices drawn from tumour slices;
  evaluation segments the whole 112x112 slices.
- Widths 16..128 over four stages; soft Dice (pooled over the batch) + cross-entropy
  instead of MSE; Adam 2e-3 x0.7 every 300 steps, 1,000 steps of batch 8; weight decay
  1e-4; no dropout.
- Post-processing (largest liver component, tumour inside liver) kept where it improves
  the validation volumes (`eval.choose_postprocessing`; the paper uses none).

Lesion sizes are the generator's (`munet_jax.data.synthetic`): radii log-uniform from
2.5 mm to 8 mm for half the lesions and to 35 mm for the other half, each axis scaled by
0.75-1.25, clipped by the liver. Measured on this data set (`python bench/lesion_sizes.py
data/synthetic_demo`), as the diameter of a circle with the area of the lesion's largest
axial cross-section: 331 lesions in the 64 volumes, 290 of them "small"
(below 28 x 28 mm²) and 41 large; 10/25/50/75/90 % quantiles 5.9 / 7.5 / 10.8 / 16.8 /
37.5 mm, from 1.9 to 77.2 mm; 47 % below 10 mm, 78 % below 20 mm. The LiTS paper
(Bilic et al., The Liver Tumor Segmentation Benchmark, Medical Image Analysis 2023)
describes its tumours as of varied sizes and appearances; its size histogram is not
reproduced here, so no closer match is claimed.
"""

from munet_jax.config import base_config


def get_config():
  c = base_config()
  c.seed = 0
  c.data.root = "data/synthetic_demo"
  c.data.synthetic.cases = 64
  c.data.synthetic.size = 192
  c.data.synthetic.crop = 112
  c.data.synthetic.slices = 32
  c.data.synthetic.tumour_rate = 6.0  # lesions per liver with tumour: 1 + Poisson(6)
  c.data.image_size = 80             # training crops; evaluation segments whole slices
  c.data.train_crop = "foreground"
  c.data.split = "custom"
  c.data.num_train = 48
  c.data.num_val = 4
  c.data.num_test = 12
  c.data.sampling = "tumour_oversample"
  c.data.tumour_oversample = 0.25
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
  c.train.eval_every_steps = 1000
  c.checkpoint.every_steps = 250
  c.eval.batch_size = 32
  c.eval.choose_postprocessing = True
  return c
