#!/usr/bin/env python
"""Train mU-Net: python train.py --config configs/demo.py --workdir runs/demo [--config.a.b=v].

The same tool as `munet-train` (munet_jax/cli/train.py).
"""

import sys

from munet_jax.cli import run
from munet_jax.cli.train import main

if __name__ == "__main__":
  sys.exit(run(main))
