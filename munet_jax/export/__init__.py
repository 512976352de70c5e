"""A training run's model, exported: ONNX for onnxruntime, or a serialized `jax.export`.

  python -m munet_jax.export --workdir W --out model.onnx            (munet_jax.cli.export)
  python -m munet_jax.export --workdir W --out model.jaxexport --format jax [--shape H W]

The ONNX model is inference (`train=False`) from preprocessed slices to logits:
input `images` float32 (N, H, W, 1), any N, H and W, after `munet_jax.preprocess`; output
`logits` float32 (N, H, W, num_classes). The edge padding to a multiple of the pooling
factor and the crop back, which the model does itself, are done by the graph around the
translated network, so H and W stay free. Its metadata (`munet_jax.onnx_inference`) holds
what `predict.py --onnx` needs besides: the HU window, the classes, the post-processing,
the run's evaluation settings. The compute dtype is float32 whatever the run's
`model.dtype` (onnxruntime's CPU convolutions take no bfloat16; the parameters are
float32 in any case).

The jax.export artifact is the same function with the variables inside, a symbolic batch
and a fixed slice size (`jax.export.deserialize(blob).call(images)`).

Needs the `onnx` extra (`pip install "munet-jax[onnx]"`) for the ONNX format only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import munet_jax
from munet_jax import onnx_inference as meta
from munet_jax import postprocessing as pp
from munet_jax.atomic import atomic_output
from munet_jax.checkpoints import load_variables
from munet_jax.errors import UserError
from munet_jax.models import MUNet, from_config, pooling_factor

FORMATS = ("onnx", "jax")


def inference_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with float32 compute: what both exports compute."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.dtype = "float32"
  return config


def reference(config: ml_collections.ConfigDict) -> dict | None:
  """The per-volume HU shift's settings (`data.reference_*`), None when the run has none."""
  if config.data.get("reference_hu") is None:
    return None
  return {"hu": float(config.data.reference_hu),
          "window": [float(v) for v in config.data.reference_window],
          "percentile": float(config.data.reference_percentile)}


def config_hash(config: ml_collections.ConfigDict) -> str:
  """sha256 of the config parts that fix the computation (the model, the HU window and
  shift)."""
  data = {"hu_window": list(config.data.hu_window),
          "scaled_range": list(config.data.scaled_range)}
  if reference(config) is not None:
    data["reference"] = reference(config)
  key = json.dumps({"model": config.model.to_dict(), "data": data},
                   sort_keys=True, default=list)
  return hashlib.sha256(key.encode()).hexdigest()


def metadata(config: ml_collections.ConfigDict, postprocessing: dict,
             step: int | None = None) -> dict[str, str]:
  """The ONNX metadata_props of an export of `config`'s run (`munet_jax.onnx_inference`)."""
  values = {
      meta.FORMAT_KEY: meta.FORMAT,
      "munet_jax.version": munet_jax.__version__,
      "munet_jax.output": "logits",
      "munet_jax.num_classes": str(config.model.num_classes),
      "munet_jax.class_names": json.dumps(list(meta.CLASS_NAMES[:config.model.num_classes])),
      "munet_jax.hu_window": json.dumps([float(v) for v in config.data.hu_window]),
      "munet_jax.scaled_range": json.dumps([float(v) for v in config.data.scaled_range]),
      "munet_jax.reference": json.dumps(reference(config)),
      "munet_jax.pooling_factor": str(pooling_factor(len(config.model.features))),
      "munet_jax.postprocessing": json.dumps(pp.normalise(postprocessing)),
      "munet_jax.eval_batch_size": str(config.eval.batch_size),
      "munet_jax.eval_tta": json.dumps(bool(config.eval.tta)),
      "munet_jax.config_sha256": config_hash(config),
      "munet_jax.trained_dtype": str(config.model.dtype),
      "munet_jax.compute_dtype": "float32",
      "munet_jax.model": json.dumps(config.model.to_dict(), default=list, sort_keys=True),
  }
  if step is not None:
    values["munet_jax.checkpoint_step"] = str(step)
  return values


def onnx_model(variables: dict, config: ml_collections.ConfigDict,
               properties: dict[str, str] | None = None, *, model: MUNet | None = None):
  """The ONNX model (an `onnx.ModelProto`) of `config`'s network with `variables`.

  Input `images` (N, H, W, 1) float32, output `logits` (N, H, W, num_classes) float32,
  N, H and W free. `properties` go into metadata_props; `model` replaces the network
  `config` describes (a variant of it, e.g. `reformulated=False`).

  Raises:
    jaxpr_onnx.UnsupportedPrimitive when the network uses a primitive not translated.
  """
  import onnx
  from onnx import helper

  from munet_jax.export import jaxpr_onnx

  config = inference_config(config)
  model = model if model is not None else from_config(config)
  factor = pooling_factor(len(config.model.features))
  # Traced on slices whose sides are multiples of the pooling factor, the network pads
  # nothing; the graph pads and crops around it as MUNet.__call__ does (models/munet.py).
  n, h, w = jax.export.symbolic_shape(f"n, {factor}*h, {factor}*w")
  closed = jax.make_jaxpr(lambda x: model.apply(variables, x, train=False))(
      jax.ShapeDtypeStruct((n, h, w, 1), jnp.float32))

  g = jaxpr_onnx.Graph()
  ints = lambda *v: g.const(np.array(v, np.int64))   # noqa: E731
  shape = g.node("Shape", ["images"])
  size = {axis: g.node("Slice", [shape, ints(i), ints(i + 1)]) for i, axis in
          ((0, "N"), (1, "H"), (2, "W"))}
  before, after, padded = {}, {}, {}
  for axis in ("H", "W"):
    # models.padding: (-size) % factor split as (p // 2, p - p // 2).
    total = g.node("Mod", [g.node("Neg", [size[axis]]), ints(factor)], fmod=0)
    before[axis] = g.node("Div", [total, ints(2)])
    after[axis] = g.node("Sub", [total, before[axis]])
    padded[axis] = g.node("Add", [size[axis], total])
  zero = ints(0)
  pads = g.node("Concat", [zero, before["H"], before["W"], zero,
                           zero, after["H"], after["W"], zero], axis=0)
  x = g.node("Pad", ["images", pads], mode="edge")
  dims = {"n": size["N"], "h": g.node("Div", [padded["H"], ints(factor)]),
          "w": g.node("Div", [padded["W"], ints(factor)])}
  (y,) = jaxpr_onnx.translate(closed, g, [x], dims)
  starts = g.node("Concat", [before["H"], before["W"]], axis=0)
  ends = g.node("Concat", [g.node("Add", [before["H"], size["H"]]),
                           g.node("Add", [before["W"], size["W"]])], axis=0)
  g.nodes.append(helper.make_node("Slice", [y, starts, ends, ints(1, 2)], ["logits"],
                                  name="crop"))
  graph = helper.make_graph(
      g.nodes, "munet", [jaxpr_onnx.value_info("images", np.float32, ("N", "H", "W", 1))],
      [jaxpr_onnx.value_info("logits", np.float32, ("N", "H", "W", config.model.num_classes))],
      g.initializers)
  proto = helper.make_model(graph, producer_name="munet-jax",
                            producer_version=munet_jax.__version__,
                            opset_imports=[helper.make_opsetid("", jaxpr_onnx.OPSET)])
  proto.ir_version = min(proto.ir_version, 9)   # what onnxruntime >= 1.20 reads
  proto.doc_string = ("mU-Net inference: preprocessed CT slices (N, H, W, 1) -> logits "
                      "(N, H, W, classes)")
  helper.set_model_props(proto, properties or {})
  onnx.checker.check_model(proto)
  return proto


def jax_exported(variables: dict, config: ml_collections.ConfigDict,
                 shape: tuple[int, int]) -> jax.export.Exported:
  """`jax.export` of `images (b, H, W, 1) -> logits` with the variables inside; b symbolic."""
  model = from_config(inference_config(config))
  (b,) = jax.export.symbolic_shape("b")
  fn = jax.jit(lambda images: model.apply(variables, images, train=False))
  return jax.export.export(fn)(jax.ShapeDtypeStruct((b, *shape, 1), jnp.float32))


def _read_run(workdir: str, which: str):
  config, variables, step = load_variables(workdir, which)
  variables = jax.tree_util.tree_map(np.asarray, variables)
  chosen = pp.load_choice(workdir)
  return config, variables, step, chosen if chosen is not None else pp.from_config(config)


def export(workdir: str, out: str, which: str = "latest", format: str = "onnx",
           shape: tuple[int, int] | None = None) -> dict:
  """Writes the model of a run's checkpoint to `out`, atomically.

  Args:
    workdir: the training run.
    out: the file to write (model.onnx, model.jaxexport).
    which: 'latest' or 'best' checkpoint.
    format: 'onnx' (any slice size) or 'jax' (slices of `shape`).
    shape: (H, W) of the jax format; the run's `data.image_size` when None.

  Returns:
    {"path", "format", "step", "shape", "bytes", "trained_dtype"}.
  """
  if format not in FORMATS:
    raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
  if format == "onnx" and shape is not None:
    raise UserError("--shape is for --format jax; the ONNX model takes any slice size")
  if shape is not None and min(shape) < 1:
    raise UserError(f"--shape must be two sizes >= 1, got {list(shape)}")
  if os.path.isdir(out):
    raise UserError(f"{out}: --out is a folder; name the file to write")
  config, variables, step, postprocessing = _read_run(workdir, which)
  if format == "onnx":
    if importlib.util.find_spec("onnx") is None:
      raise UserError("the ONNX export needs the onnx package: pip install "
                      "\"munet-jax[onnx]\"")
    proto = onnx_model(variables, config, metadata(config, postprocessing, step))
    blob = proto.SerializeToString()
    size = ("N", "H", "W")
  else:
    shape = tuple(shape or (config.data.image_size, config.data.image_size))
    blob = jax_exported(variables, config, shape).serialize()
    size = ("N", *shape)
  with atomic_output(out) as tmp:
    with open(tmp, "wb") as f:
      f.write(blob)
  return {"path": out, "format": format, "step": step, "shape": size, "bytes": len(blob),
          "trained_dtype": str(config.model.dtype)}
