"""A jaxpr, translated primitive by primitive into ONNX nodes (opset 18).

`translate` walks a closed jaxpr (as `jax.make_jaxpr` gives it): calls (jit, custom_jvp,
custom_vjp, remat) are inlined, every equation whose inputs are all constants is
evaluated here and becomes an initializer (the variables, batch-norm scales, kernels
rearranged for the sub-pixel up-convolution), and each remaining equation becomes a few
ONNX nodes. Only the primitives mU-Net's inference produces are known; any other is an
`UnsupportedPrimitive` naming it.

Shapes may hold symbolic dimensions (`jax.export.symbolic_shape`): each is a sum of
products of dimension variables and integers (`2*h`), computed in the graph from the
int64 tensors the caller gives for the variables. JAX's layouts are kept: a convolution
is transposed to ONNX's NCHW and back (onnxruntime's layout pass removes most of those
pairs).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import onnx
from jax.extend import core
from onnx import helper, numpy_helper

OPSET = 18


class UnsupportedPrimitive(ValueError):
  """A primitive (or a form of one) that the translation does not know."""


class Graph:
  """The nodes and initializers of an ONNX graph under construction."""

  def __init__(self):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self._count = 0
    self._consts: dict[tuple, str] = {}

  def name(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def const(self, value, dtype=None) -> str:
    """An initializer holding `value` (small integer ones are shared)."""
    array = np.asarray(value, dtype=dtype)
    key = None
    if array.size <= 16 and array.dtype.kind in "iub":
      key = (array.dtype.str, array.shape, array.tobytes())
      if key in self._consts:
        return self._consts[key]
    name = self.name("const")
    self.initializers.append(numpy_helper.from_array(array, name))
    if key is not None:
      self._consts[key] = name
    return name

  def node(self, op: str, inputs: Sequence[str], outputs: int = 1, **attrs):
    """Adds one node; returns its output name (or the list of them when `outputs` > 1)."""
    names = [self.name(op.lower()) for _ in range(outputs)]
    self.nodes.append(helper.make_node(op, list(inputs), names, name=names[0], **attrs))
    return names[0] if outputs == 1 else names


def onnx_dtype(dtype) -> int:
  return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


# Elementwise primitives with one ONNX operator of the same meaning (JAX broadcasts only
# scalars here, which ONNX's broadcasting also does).
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max",
           "min": "Min", "pow": "Pow", "ge": "GreaterOrEqual", "gt": "Greater",
           "le": "LessOrEqual", "lt": "Less", "eq": "Equal", "and": "And", "or": "Or",
           "xor": "Xor"}
_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "tanh": "Tanh", "logistic": "Sigmoid",
          "sqrt": "Sqrt", "abs": "Abs", "sign": "Sign", "floor": "Floor", "ceil": "Ceil",
          "erf": "Erf", "not": "Not", "copy": "Identity", "copy_p": "Identity"}
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


class _Translation:
  def __init__(self, graph: Graph, dims: dict[str, str]):
    self.g = graph
    self.dims = dims              # dimension variable -> int64[1] tensor
    self._dim_cache: dict[str, str] = {}

  # -- values: ("const", ndarray) or ("onnx", name) -------------------------------------
  def onnx(self, value) -> str:
    kind, v = value
    return self.g.const(v) if kind == "const" else v

  # -- symbolic dimensions --------------------------------------------------------------
  def dim(self, d) -> str:
    """An int64[1] tensor holding the dimension `d` (an int or a symbolic expression)."""
    if _is_int(d):
      return self.g.const(np.array([int(d)], np.int64))
    text = str(d)
    if text in self._dim_cache:
      return self._dim_cache[text]
    total = None
    for sign, term in re.findall(r"([+-]?)\s*([^+-]+)", text.replace(" ", "")):
      coefficient, factors = (-1 if sign == "-" else 1), []
      for factor in term.split("*"):
        if factor.isdigit():
          coefficient *= int(factor)
        elif factor in self.dims:
          factors.append(self.dims[factor])
        else:
          raise UnsupportedPrimitive(f"symbolic dimension {text!r}: only sums of products "
                                     f"of {sorted(self.dims)} and integers are translated")
      value = None if factors and coefficient == 1 else self.g.const(
          np.array([coefficient], np.int64))
      for f in factors:
        value = f if value is None else self.g.node("Mul", [value, f])
      total = value if total is None else self.g.node("Add", [total, value])
    self._dim_cache[text] = total
    return total

  def shape(self, dims) -> str:
    """An int64[rank] tensor of the shape `dims`."""
    if all(_is_int(d) for d in dims):
      return self.g.const(np.array([int(d) for d in dims], np.int64))
    return self.g.node("Concat", [self.dim(d) for d in dims], axis=0)

  def ints(self, values) -> str:
    return self.g.const(np.array(list(values), np.int64))

  # -- the walk -------------------------------------------------------------------------
  def jaxpr(self, jaxpr: core.Jaxpr, consts: Sequence, args: Sequence) -> list:
    env = {}

    def read(atom):
      if isinstance(atom, core.Literal):
        return ("const", np.asarray(atom.val, atom.aval.dtype))
      return env[atom]

    for var, c in zip(jaxpr.constvars, consts):
      env[var] = ("const", np.asarray(c))
    for var, a in zip(jaxpr.invars, args):
      env[var] = a
    for eqn in jaxpr.eqns:
      inputs = [read(v) for v in eqn.invars]
      outputs = self.equation(eqn, inputs)
      for var, out in zip(eqn.outvars, outputs):
        env[var] = out
    return [read(v) for v in jaxpr.outvars]

  def equation(self, eqn, inputs: list) -> list:
    name = eqn.primitive.name
    sub = next((eqn.params[p] for p in _CALL_PARAMS if p in eqn.params), None)
    if isinstance(sub, core.ClosedJaxpr):
      return self.jaxpr(sub.jaxpr, sub.consts, inputs)
    if isinstance(sub, core.Jaxpr):
      return self.jaxpr(sub, (), inputs)
    concrete = all(_is_int(d) for v in eqn.outvars for d in getattr(v.aval, "shape", ()))
    if concrete and all(kind == "const" for kind, _ in inputs):
      values = eqn.primitive.bind(*[v for _, v in inputs], **eqn.params)
      if not eqn.primitive.multiple_results:
        values = [values]
      return [("const", np.asarray(v)) for v in values]
    rule = getattr(self, "_" + name, None)
    if name in _BINARY:
      out = self.g.node(_BINARY[name], [self.onnx(v) for v in inputs])
    elif name in _UNARY:
      out = self.g.node(_UNARY[name], [self.onnx(inputs[0])])
    elif rule is not None:
      out = rule(eqn, *inputs)
    else:
      raise UnsupportedPrimitive(f"the ONNX export does not translate the JAX primitive "
                                 f"'{name}'")
    return [("onnx", out)]

  # -- rules: one per primitive, (eqn, *inputs) -> ONNX name ----------------------------
  def _ne(self, eqn, x, y):
    return self.g.node("Not", [self.g.node("Equal", [self.onnx(x), self.onnx(y)])])

  def _rsqrt(self, eqn, x):
    return self.g.node("Reciprocal", [self.g.node("Sqrt", [self.onnx(x)])])

  def _square(self, eqn, x):
    x = self.onnx(x)
    return self.g.node("Mul", [x, x])

  def _integer_pow(self, eqn, x):
    exponent = np.array(eqn.params["y"], eqn.outvars[0].aval.dtype)
    return self.g.node("Pow", [self.onnx(x), self.g.const(exponent)])

  def _select_n(self, eqn, which, *cases):
    if len(cases) != 2 or eqn.invars[0].aval.dtype != np.bool_:
      raise UnsupportedPrimitive("select_n is translated with a boolean predicate and two "
                                 "cases only")
    # select_n(p, a, b) is b where p, else a.
    return self.g.node("Where", [self.onnx(which), self.onnx(cases[1]), self.onnx(cases[0])])

  def _convert_element_type(self, eqn, x):
    return self.g.node("Cast", [self.onnx(x)], to=onnx_dtype(eqn.params["new_dtype"]))

  def _reshape(self, eqn, x):
    if eqn.params.get("dimensions") is not None:
      raise UnsupportedPrimitive("reshape with 'dimensions' (a transposing reshape)")
    return self.g.node("Reshape", [self.onnx(x), self.shape(eqn.params["new_sizes"])])

  def _squeeze(self, eqn, x):
    return self.g.node("Squeeze", [self.onnx(x), self.ints(eqn.params["dimensions"])])

  def _broadcast_in_dim(self, eqn, x):
    shape, kept = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    x = self.onnx(x)
    new = [d for d in range(len(shape)) if d not in kept]
    if new:
      x = self.g.node("Unsqueeze", [x, self.ints(new)])
    return self.g.node("Expand", [x, self.shape(shape)])

  def _transpose(self, eqn, x):
    return self.g.node("Transpose", [self.onnx(x)], perm=list(eqn.params["permutation"]))

  def _concatenate(self, eqn, *xs):
    return self.g.node("Concat", [self.onnx(x) for x in xs], axis=eqn.params["dimension"])

  def _pad(self, eqn, x, value):
    config = eqn.params["padding_config"]
    if any(not _is_int(p) or (i and p != 0) for lo, hi, i in config for p in (lo, hi, i)):
      raise UnsupportedPrimitive("pad with interior or symbolic padding")
    lo = [int(c[0]) for c in config]
    hi = [int(c[1]) for c in config]
    out = self.g.node("Pad", [self.onnx(x), self.ints([max(p, 0) for p in lo + hi]),
                              self.onnx(value)], mode="constant")
    if min(lo + hi) < 0:   # negative padding crops
      shape = eqn.invars[0].aval.shape
      starts = [max(-p, 0) for p in lo]
      ends = [d + max(p, 0) + h for p, d, h in zip(lo, shape, hi)]
      out = self.g.node("Slice", [out, self.ints(starts), self.shape(ends)])
    return out

  def _slice(self, eqn, x):
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(starts)
    axes = list(range(len(starts)))
    return self.g.node("Slice", [self.onnx(x), self.shape(starts), self.shape(limits),
                                 self.ints(axes), self.ints(strides)])

  def _reduce(self, op, eqn, x):
    return self.g.node(op, [self.onnx(x), self.ints(eqn.params["axes"])], keepdims=0)

  def _reduce_sum(self, eqn, x):
    return self._reduce("ReduceSum", eqn, x)

  def _reduce_max(self, eqn, x):
    return self._reduce("ReduceMax", eqn, x)

  def _reduce_min(self, eqn, x):
    return self._reduce("ReduceMin", eqn, x)

  def _reduce_prod(self, eqn, x):
    return self._reduce("ReduceProd", eqn, x)

  def _argmax(self, eqn, x):
    (axis,) = eqn.params["axes"]
    out = self.g.node("ArgMax", [self.onnx(x)], axis=axis, keepdims=0)
    return self.g.node("Cast", [out], to=onnx_dtype(eqn.params["index_dtype"]))

  def _gather(self, eqn, x, indices):
    """Static indices on some axes, whole others (x[:, :, i, :, j]): slices and a squeeze."""
    dn = eqn.params["dimension_numbers"]
    operand = eqn.invars[0].aval.shape
    sizes = eqn.params["slice_sizes"]
    kind, index = indices
    collapsed = tuple(dn.collapsed_slice_dims)
    simple = (kind == "const" and index.ndim == 1 and len(index) == len(collapsed)
              and tuple(dn.start_index_map) == collapsed and not dn.operand_batching_dims
              and tuple(dn.offset_dims) == tuple(range(len(eqn.outvars[0].aval.shape)))
              and all((sizes[d] == 1) if d in collapsed else (sizes[d] == operand[d])
                      for d in range(len(operand)))
              and all(_is_int(operand[d]) and 0 <= int(i) < operand[d]
                      for d, i in zip(collapsed, index)))
    if not simple:
      raise UnsupportedPrimitive("gather other than constant indices on whole axes "
                                 "(x[:, i, :, j])")
    starts = [int(i) for i in index]
    out = self.g.node("Slice", [self.onnx(x), self.ints(starts),
                                self.ints([s + 1 for s in starts]), self.ints(collapsed)])
    return self.g.node("Squeeze", [out, self.ints(collapsed)])

  def _reduce_window_max(self, eqn, x):
    p = eqn.params
    window, strides, pads = p["window_dimensions"], p["window_strides"], p["padding"]
    if (len(window) != 4 or window[0] != 1 or window[3] != 1 or strides[0] != 1
        or strides[3] != 1 or any(d != 1 for d in p["base_dilation"])
        or tuple(pads[0]) != (0, 0) or tuple(pads[3]) != (0, 0)):
      raise UnsupportedPrimitive("reduce_window_max other than an NHWC spatial max pool")
    x = self.g.node("Transpose", [self.onnx(x)], perm=[0, 3, 1, 2])
    y = self.g.node("MaxPool", [x], kernel_shape=list(window[1:3]),
                    strides=list(strides[1:3]),
                    pads=[pads[1][0], pads[2][0], pads[1][1], pads[2][1]],
                    dilations=list(p["window_dilation"][1:3]))
    return self.g.node("Transpose", [y], perm=[0, 2, 3, 1])

  def _conv_general_dilated(self, eqn, x, w):
    p = eqn.params
    dn = p["dimension_numbers"]
    if p["batch_group_count"] != 1:
      raise UnsupportedPrimitive("conv_general_dilated with batch_group_count > 1")
    pads = [tuple(int(v) for v in pair) for pair in p["padding"]]
    x = self.g.node("Transpose", [self.onnx(x)], perm=list(dn.lhs_spec))    # NC...
    kind, kernel = w
    if kind == "const":
      kernel = np.transpose(kernel, dn.rhs_spec)                            # OI...
    elif any(d != 1 for d in p["lhs_dilation"]):
      raise UnsupportedPrimitive("transposed convolution of a computed kernel")
    else:
      kernel = self.g.node("Transpose", [kernel], perm=list(dn.rhs_spec))
    if all(d == 1 for d in p["lhs_dilation"]):
      if min(v for pair in pads for v in pair) < 0:
        raise UnsupportedPrimitive("conv_general_dilated with negative padding")
      y = self.g.node("Conv", [x, self.onnx((kind, kernel))],
                      strides=list(p["window_strides"]),
                      pads=[lo for lo, _ in pads] + [hi for _, hi in pads],
                      dilations=list(p["rhs_dilation"]), group=p["feature_group_count"])
    else:
      # An input-dilated convolution is ONNX's ConvTranspose with the kernel flipped and
      # its two feature axes swapped; ConvTranspose pads the dilated input by k - 1 on
      # each side less its `pads` (output_padding adds at the end).
      if (any(s != 1 for s in p["window_strides"]) or any(d != 1 for d in p["rhs_dilation"])
          or p["feature_group_count"] != 1):
        raise UnsupportedPrimitive("input-dilated conv_general_dilated with strides, "
                                   "kernel dilation or feature groups")
      spatial = kernel.shape[2:]
      begin = [k - 1 - lo for k, (lo, _) in zip(spatial, pads)]
      end = [k - 1 - hi for k, (_, hi) in zip(spatial, pads)]
      if min(begin) < 0:
        raise UnsupportedPrimitive("input-dilated conv_general_dilated padded by more "
                                   "than the kernel size")
      flipped = np.flip(kernel, axis=tuple(range(2, kernel.ndim))).swapaxes(0, 1)
      y = self.g.node("ConvTranspose", [x, self.g.const(np.ascontiguousarray(flipped))],
                      strides=list(p["lhs_dilation"]), pads=begin + [max(e, 0) for e in end],
                      output_padding=[max(-e, 0) for e in end])
    y = self.g.node("Transpose", [y], perm=[int(i) for i in np.argsort(dn.out_spec)])
    out_dtype = eqn.outvars[0].aval.dtype
    if p.get("preferred_element_type") is not None and out_dtype != eqn.invars[0].aval.dtype:
      y = self.g.node("Cast", [y], to=onnx_dtype(out_dtype))
    return y


def _is_int(d) -> bool:
  return isinstance(d, (int, np.integer))


def translate(closed: core.ClosedJaxpr, graph: Graph, inputs: Sequence[str],
              dims: dict[str, str]) -> list[str]:
  """Adds the nodes computing `closed` to `graph`; returns the names of its outputs.

  Args:
    closed: from `jax.make_jaxpr`; its constants become initializers.
    graph: where the nodes and initializers go.
    inputs: the ONNX names of the jaxpr's inputs, in order.
    dims: each symbolic dimension variable of the input shapes -> an int64[1] tensor
      holding its value.

  Raises:
    UnsupportedPrimitive naming the first primitive (or form of one) not translated.
  """
  t = _Translation(graph, dims)
  outputs = t.jaxpr(closed.jaxpr, closed.consts, [("onnx", name) for name in inputs])
  return [t.onnx(out) for out in outputs]


def value_info(name: str, dtype, shape: Sequence) -> onnx.ValueInfoProto:
  """A graph input or output: `shape` holds ints and names (symbolic dimensions)."""
  return helper.make_tensor_value_info(name, onnx_dtype(dtype),
                                       [d if isinstance(d, str) else int(d) for d in shape])
