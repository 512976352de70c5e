"""`python -m munet_jax.data.prepare ROOT`: the `munet-prepare` tool (`munet_jax.cli.prepare`).

The slice store itself is `munet_jax.data.store`.
"""

if __name__ == "__main__":   # the `munet-prepare` tool (munet_jax.cli.prepare); the library never imports it
  import runpy
  runpy.run_module("munet_jax.cli.prepare", run_name="__main__")
