"""`python -m munet_jax.data.prepare ROOT`: the `munet-prepare` tool (`munet_jax.cli.prepare`).

The slice store itself is `munet_jax.data.store`.
"""

if __name__ == "__main__":   # the `munet-prepare` tool
  import sys
  from munet_jax.cli import prepare, run
  sys.exit(run(prepare.main))
