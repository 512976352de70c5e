"""A tiny training run on disk for the eval / predict tests: a checkpoint, no training.

`make_tiny_run(workdir, data_root)` writes a freshly initialised mU-Net of widths (4, 8)
as checkpoint step 1 of `workdir`, with a config whose data.root is `data_root` and whose
'custom' split takes 1 / 1 / 2 cases (train / val / test).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def tiny_run_config(data_root: str = "data/none"):
  from munet_jax.config import base_config
  c = base_config()
  c.model.features = (4, 8)
  c.data.root = str(data_root)
  c.data.split = "custom"
  c.data.num_train, c.data.num_val, c.data.num_test = 1, 1, 2
  c.eval.batch_size = 4
  return c


def make_tiny_run(workdir, data_root: str = "data/none", config=None, steps=(1,)):
  import jax
  from munet_jax.checkpoints import Checkpointer
  from munet_jax.training.state import create_train_state
  config = config or tiny_run_config(data_root)
  state = create_train_state(config, jax.random.key(0))
  ckpt = Checkpointer(str(workdir))
  for step in steps:
    ckpt.save(step, state, {}, config)
    ckpt.wait()
  ckpt.close()
  return config, state


if __name__ == "__main__":  # python tests/helpers/tiny_run.py WORKDIR [DATA_ROOT]
  from munet_jax.runtime import configure_jax
  configure_jax()
  make_tiny_run(*sys.argv[1:3])
