"""`python -m munet_jax.diagnostics`: the `munet-diagnose` tool (`munet_jax.cli.diagnose`)."""

import sys

from munet_jax.cli import diagnose, run

sys.exit(run(diagnose.main))
