"""How far float32 rounding can move a function's outputs: Monte Carlo arithmetic.

Two implementations of one function (XLA's and onnxruntime's) round differently: they sum
in other orders, fold other constants, fuse other operations. Their difference is of the
size of the rounding error of either, which depends on the function, not on a machine.
`spread(fn, x)` estimates it from the arithmetic: it evaluates the jaxpr of `fn` with
every rounded operation perturbed by a random error of the size float32 allows (Parker's
Monte Carlo arithmetic), u = 2**-24 being float32's unit roundoff, xi uniform in [-1, 1]
and drawn anew for every element of every result:

  an elementwise result v (add, mul, rsqrt, ...)   v (1 + u xi)
  a sum of K products (a convolution output)       v + xi gamma_K sum|x||w|,
      gamma_K = K u / (1 - K u): Higham's bound on the error of such a sum in any order,
      with or without fused multiply-adds ("Accuracy and Stability of Numerical
      Algorithms", eq. 3.5); K counts two more products, for a scale and a bias that
      onnxruntime folds into the kernel
  moves, pads, maxima, selections                   exact, on the perturbed values

and returns the per-element root-mean-square deviation from the unperturbed result. The
model is pessimistic: each convolution output is moved by up to the worst case of its
sum, where real summation errors grow like sqrt(K) u. The worst-case bound itself
(carried through the network as running error analysis, with |w| in place of w) is of no
use here: through the 16 layers of a three-stage mU-Net it grew to 16 against logits of
0.5, because it assumes every error adds with the same sign.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

U = 2.0 ** -24
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _bind(eqn, *args):
  out = eqn.primitive.bind(*args, **eqn.params)
  return out if eqn.primitive.multiple_results else [out]


def _gamma(eqn):
  """gamma_K of a convolution: K products per output, + 2 (see above)."""
  rhs = eqn.invars[1].aval.shape
  spec = eqn.params["dimension_numbers"].rhs_spec          # (out, in, spatial...)
  k = int(np.prod([rhs[d] for d in spec[2:]])) * rhs[spec[1]] + 2
  return k * U / (1 - k * U)


_ROUNDED = {"add", "sub", "mul", "div", "rsqrt", "sqrt", "exp", "log", "logistic", "tanh",
            "convert_element_type", "conv_general_dilated"}


def _perturbed_eval(jaxpr, consts, args, draw):
  """The jaxpr with every rounded result perturbed: v (1 + u xi), a K-product sum by
  xi gamma_K sum|terms|; xi = draw(shape), uniform in [-1, 1]."""
  env = {}

  def read(atom):
    return jnp.asarray(atom.val, atom.aval.dtype) if isinstance(atom, core.Literal) else env[atom]

  for var, c in zip(jaxpr.constvars, consts):
    env[var] = jnp.asarray(c)
  for var, a in zip(jaxpr.invars, args):
    env[var] = a
  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    sub = next((eqn.params[p] for p in _CALLS if p in eqn.params), None)
    if isinstance(sub, core.ClosedJaxpr):
      outputs = _perturbed_eval(sub.jaxpr, sub.consts, inputs, draw)
    elif isinstance(sub, core.Jaxpr):
      outputs = _perturbed_eval(sub, (), inputs, draw)
    else:
      outputs = _bind(eqn, *inputs)
      name = eqn.primitive.name
      if name in _ROUNDED and jnp.issubdtype(outputs[0].dtype, jnp.floating):
        (v,) = outputs
        xi = draw(v.shape)
        if name == "conv_general_dilated":
          gamma = _gamma(eqn)
          v = v + xi * gamma * _bind(eqn, jnp.abs(inputs[0]), jnp.abs(inputs[1]))[0]
        else:
          v = v * (1 + U * xi)
        outputs = [v]
    for var, out in zip(eqn.outvars, outputs):
      env[var] = out
  return [read(v) for v in jaxpr.outvars]


def spread(fn, x, samples=16, input_error=0.0, seed=0):
  """(fn(x), the per-element RMS deviation of fn(x) over `samples` randomly rounded runs).

  Args:
    fn: a function of one float32 array (traced with jax.make_jaxpr).
    x: its input.
    input_error: an absolute error of `x` itself (a preprocessing computed another way),
      added as xi * input_error.
  """
  closed = jax.make_jaxpr(fn)(x)
  sizes = []

  def count(shape):
    sizes.append(int(np.prod(shape)))
    return jnp.zeros(shape, jnp.float32)

  count(np.shape(x))
  jax.make_jaxpr(lambda x: _perturbed_eval(closed.jaxpr, closed.consts, [x], count))(x)

  def perturbed(x, key):
    # One draw for the whole run, sliced op by op: one random-number kernel to compile.
    noise = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    offset = [0]

    def draw(shape):
      start = offset[0]
      offset[0] += int(np.prod(shape))
      return noise[start:offset[0]].reshape(shape)

    x = x + draw(x.shape) * input_error
    return _perturbed_eval(closed.jaxpr, closed.consts, [x], draw)[0]

  run = jax.jit(perturbed)
  exact = np.asarray(jax.jit(fn)(x))
  devs = [np.asarray(run(x, jax.random.key(seed + r))) - exact for r in range(samples)]
  return exact, np.sqrt(np.mean(np.square(devs), axis=0))
