"""`python -m munet_jax.diagnostics`: the `munet-diagnose` tool (munet_jax.cli.diagnose).

Run by name, so that the library never imports the command line.
"""

import runpy

runpy.run_module("munet_jax.cli.diagnose", run_name="__main__")
