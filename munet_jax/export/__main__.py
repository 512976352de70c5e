"""`python -m munet_jax.export`: the `munet-export` tool (munet_jax.cli.export).

Run by name, so that the library never imports the command line.
"""

import runpy

runpy.run_module("munet_jax.cli.export", run_name="__main__")
