"""A tiny run whose labels vary from voxel to voxel, for tests that compare label volumes.

A freshly initialised tiny mU-Net labels every voxel background: its class logits differ
by a near-constant. `make_varied_run` rescales the output layer so that, on a fixed
phantom, about 60 / 30 / 10 % of the voxels get labels 0 / 1 / 2. It is still an
untrained network (the labels follow no anatomy), but two paths that should give the same
labels (NIfTI and DICOM input, say) now have something to disagree on.
"""

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HELPERS = os.path.dirname(os.path.abspath(__file__))
for path in (ROOT, HELPERS):
  if path not in sys.path:
    sys.path.insert(0, path)

from tiny_run import tiny_run_config  # noqa: E402


def phantom(shape=(40, 36, 6), seed=0):
  """(X, Y, Z) int16 HU: a soft-tissue ellipse with a darker blob, in noise."""
  rng = np.random.default_rng(seed)
  x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
  body = ((x / 0.8) ** 2 + (y / 0.6) ** 2 < 1) * 1040.0 - 1000.0
  blob = ((x - 0.2) ** 2 + y ** 2 < 0.1) * -60.0
  hu = (body + blob)[..., None] + rng.normal(0, 40, shape)
  return np.round(hu).astype(np.int16)


def make_varied_run(workdir, data_root="data/none", seed=0, config=None):
  """Writes the run (checkpoint step 1); returns (config, variables)."""
  config = config or tiny_run_config(data_root)
  return _make(workdir, config, _initial_state(config)(seed))


TEST_CASES = ("volume-0", "volume-3")
_FOLDS = {}


def kfold_runs(base):
  """Made once per test process under `base`: a 4-case synthetic data root and three
  varied runs, folds 0 and 1 of a 2-fold 'kfold' split holding TEST_CASES out, and
  'other', of another HU window. Returns (fold workdirs, their variables, the fold-0
  config, the data root, the 'other' workdir)."""
  if not _FOLDS:
    from munet_jax.data import synthetic
    data = os.path.join(base, "data")
    synthetic.write_dataset(data, 4, 32, seed=1, slices=5, progress=False)
    configs = []
    for fold in (0, 1):
      c = tiny_run_config(data)
      c.data.split, c.data.folds, c.data.fold, c.data.test_cases = "kfold", 2, fold, TEST_CASES
      configs.append(c)
    other = tiny_run_config(data)
    other.data.hu_window = (-100.0, 200.0)
    workdirs = [os.path.join(base, f"fold{f}") for f in (0, 1)]
    made = make_varied_runs(workdirs + [os.path.join(base, "other")], configs + [other])
    _FOLDS["runs"] = (workdirs, [v for _, v in made[:2]], configs[0], data,
                      os.path.join(base, "other"))
  return _FOLDS["runs"]


def make_varied_runs(workdirs, configs):
  """Several varied runs, seeds 0, 1, ...; one compilation when the models agree."""
  init = _initial_state(configs[0])
  return [_make(w, c, init(seed)) for seed, (w, c) in enumerate(zip(workdirs, configs))]


def _initial_state(config):
  import jax
  from munet_jax.training.state import create_train_state
  init = jax.jit(lambda key: create_train_state(config, key))   # op by op it takes twice as long
  return lambda seed: init(jax.random.key(seed))


def _make(workdir, config, state):
  import jax
  import munet_jax
  from munet_jax.checkpoints import Checkpointer
  params = jax.tree_util.tree_map(np.asarray, state.params)
  variables = {"params": params, "batch_stats": state.batch_stats}
  hu = phantom()
  images = munet_jax.preprocess(np.moveaxis(hu, -1, 0).astype(np.float32), config)[..., None]
  apply = jax.jit(lambda v, x: munet_jax.apply(v, x, config))
  logits = np.asarray(apply(variables, images), np.float64).reshape(-1, 3)
  kernel = np.asarray(params["output"]["kernel"], np.float64)
  bias = np.asarray(params["output"]["bias"], np.float64)
  # With K'[:, c] = K[:, 0] + s_c (K[:, c] - K[:, 0]) the class-c logit minus the class-0
  # logit is s_c times its bias-free value plus the new bias difference beta_c.
  new_kernel, new_bias = kernel.copy(), bias.copy()
  e = {}
  for c in (1, 2):
    raw = logits[:, c] - logits[:, 0] - (bias[c] - bias[0])
    scale = 1.0 / raw.std()
    e[c] = scale * raw
    new_kernel[..., c] = kernel[..., 0] + scale * (kernel[..., c] - kernel[..., 0])
  beta1 = -np.quantile(e[1], 0.6)                                   # 40 % liver or tumour
  beta2 = -np.quantile(e[2] - np.maximum(0.0, e[1] + beta1), 0.9)  # 10 % tumour
  new_bias[1], new_bias[2] = bias[0] + beta1, bias[0] + beta2
  params = dict(params)
  params["output"] = {"kernel": new_kernel.astype(np.float32), "bias": new_bias.astype(np.float32)}
  state = state.replace(params=jax.tree_util.tree_map(jax.numpy.asarray, params))
  ckpt = Checkpointer(str(workdir))
  ckpt.save(1, state, {}, config)
  ckpt.wait()
  ckpt.close()
  return config, {"params": state.params, "batch_stats": state.batch_stats}
