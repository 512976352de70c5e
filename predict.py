#!/usr/bin/env python
"""Segment CT volumes: python predict.py --workdir W --input IN --output OUT (--help).

The same tool as `munet-predict` (munet_jax/cli/predict.py).
"""

import sys

from munet_jax.cli import run
from munet_jax.cli.predict import main

if __name__ == "__main__":
  sys.exit(run(main))
