#!/usr/bin/env python
"""Train mU-Net: python train.py --config configs/demo.py --workdir runs/demo [--config.a.b=v]."""

import sys

from munet_jax.errors import run_cli
from munet_jax.training.cli import main

if __name__ == "__main__":
  sys.exit(run_cli(main))
