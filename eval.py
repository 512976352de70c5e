#!/usr/bin/env python
"""Score segmentations: python eval.py --workdir W, or --pred P --ref R --out F.json (--help).

The same tool as `munet-eval` (munet_jax/cli/evaluate.py).
"""

import sys

from munet_jax.cli import run
from munet_jax.cli.evaluate import main

if __name__ == "__main__":
  sys.exit(run(main))
