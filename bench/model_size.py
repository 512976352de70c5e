"""Parameter count and forward FLOPs of the Table I model at 512x512 (XLA cost analysis).

  python bench/model_size.py [--size 512]

Prints one Markdown row per network: the conventional U-Net, U-Net with only the residual
path, and mU-Net, for the Table I widths (64..1024), without and with residual learning.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from munet_jax.models import MUNet  # noqa: E402


def measure(model: MUNet, size: int) -> tuple[int, float]:
  x = jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1))))
  n_params = sum(v.size for v in jax.tree_util.tree_leaves(variables["params"]))
  lowered = jax.jit(lambda v, img: model.apply(v, img, train=False)).lower(variables, x)
  cost = lowered.compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per device
    cost = cost[0]
  return n_params, float(cost["flops"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=512)
  args = parser.parse_args()
  rows = [
      ("U-Net (Fig. 1a)", dict(odu_residual=False, skip_conv=False)),
      ("U-Net + ODU residual path", dict(odu_residual=True, skip_conv=False)),
      ("mU-Net (Table I)", dict(odu_residual=True, skip_conv=True)),
  ]
  print(f"| network | residual learning | parameters | forward GFLOP per {args.size}x{args.size} slice |")
  print("| --- | --- | --- | --- |")
  for name, kwargs in rows:
    for residual in (False, True):
      n, flops = measure(MUNet(residual_learning=residual, **kwargs), args.size)
      print(f"| {name} | {'yes' if residual else 'no'} | {n:,} | {flops / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
  main()
