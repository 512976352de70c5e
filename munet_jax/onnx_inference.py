"""Volume inference with an exported ONNX model and onnxruntime: no JAX, no checkpoint.

`predict.py --onnx model.onnx` runs here. The model file (`munet_jax.export`) maps
preprocessed slices (N, H, W, 1) to logits (N, H, W, classes); its metadata_props carry
the rest of what `predict.py --workdir` would read from the run: the HU window and any
per-volume HU shift (`munet_jax.preprocessing`), the classes, the post-processing chosen
for the run, the evaluation batch size and mirroring. The volume is segmented as
`inference.VolumeSegmenter` does it: slices along the last (RAS, axial) axis, argmax of
the logits, or of the mean softmax over in-plane mirrorings with `tta` (and whenever
probabilities are asked).

Needs onnxruntime (`pip install "munet-jax[onnx]"`), imported when a model is opened.
"""

from __future__ import annotations

import json
import os

import numpy as np

from munet_jax import postprocessing as pp
from munet_jax import prediction
from munet_jax.config import base_config
from munet_jax.errors import UserError
from munet_jax.prediction import PROBABILITY_SCALE
from munet_jax.preprocessing import intensity_shift, preprocess, shifted

FORMAT_KEY = "munet_jax.format"
FORMAT = "munet-jax onnx 1"
CLASS_NAMES = ("background", "liver", "tumour")
INPUT, OUTPUT = "images", "logits"
# In-plane mirrorings of a (B, H, W, 1) batch: none, H, W, both (as inference._labeller).
FLIPS = ((), (1,), (2,), (1, 2))


def _first_line(error: Exception) -> str:
  text = " ".join(str(error).split())
  return text if len(text) <= 160 else text[:157] + "..."


class OnnxModel:
  """An exported mU-Net: `logits(images)` and the settings from its metadata.

  Raises:
    UserError naming the file: missing, not loadable, not a munet-jax export (no such
    metadata), or an input / output signature other than images (N, H, W, 1) float32 ->
    logits (N, H, W, classes).
  """

  def __init__(self, path: str, threads: int | None = None):
    if not os.path.isfile(path):
      raise UserError(f"{path}: --onnx file not found")
    try:
      import onnxruntime as ort
    except ImportError as e:
      raise UserError(f"{path}: running an ONNX model needs onnxruntime: pip install "
                      "\"munet-jax[onnx]\"") from e
    options = ort.SessionOptions()
    options.log_severity_level = 3   # errors only: the load warnings are ours to say
    if threads:
      options.intra_op_num_threads = threads
    try:
      self.session = ort.InferenceSession(path, options,
                                          providers=ort.get_available_providers())
    except Exception as e:  # onnxruntime raises its own classes for a bad file
      raise UserError(f"{path}: not an ONNX model onnxruntime can load "
                      f"({_first_line(e)})") from e
    self.path = path
    props = self.session.get_modelmeta().custom_metadata_map
    if props.get(FORMAT_KEY) != FORMAT:
      found = f"{FORMAT_KEY} is {props[FORMAT_KEY]!r}" if FORMAT_KEY in props else \
          f"its metadata has no {FORMAT_KEY}"
      raise UserError(f"{path}: not an ONNX export of a munet-jax run ({found}; export "
                      "one with python -m munet_jax.export)")
    try:
      self.num_classes = int(props["munet_jax.num_classes"])
      self.class_names = tuple(json.loads(props["munet_jax.class_names"]))
      config = base_config()
      config.data.hu_window = tuple(json.loads(props["munet_jax.hu_window"]))
      config.data.scaled_range = tuple(json.loads(props["munet_jax.scaled_range"]))
      shift = json.loads(props.get("munet_jax.reference", "null"))   # absent before it existed
      if shift is not None:
        config.data.reference_hu = float(shift["hu"])
        config.data.reference_window = tuple(float(v) for v in shift["window"])
        config.data.reference_percentile = float(shift["percentile"])
      self.preprocessing = config
      self.postprocessing = pp.normalise(json.loads(props["munet_jax.postprocessing"]))
      self.batch_size = int(props["munet_jax.eval_batch_size"])
      self.tta = bool(json.loads(props["munet_jax.eval_tta"]))
    except (KeyError, ValueError, TypeError) as e:
      raise UserError(f"{path}: the munet-jax metadata is incomplete or unreadable "
                      f"({type(e).__name__}: {e})") from e
    self.metadata = dict(props)
    self._check_signature()

  def _check_signature(self) -> None:
    inputs, outputs = self.session.get_inputs(), self.session.get_outputs()

    def fits(io, name, last):
      return (io.name == name and io.type == "tensor(float)" and len(io.shape) == 4
              and io.shape[3] == last)

    if not (len(inputs) == 1 and len(outputs) == 1 and fits(inputs[0], INPUT, 1)
            and fits(outputs[0], OUTPUT, self.num_classes)):
      seen = ", ".join(f"{io.name} {io.type}{list(io.shape)}" for io in inputs + outputs)
      raise UserError(f"{self.path}: the model's inputs and outputs ({seen}) are not "
                      f"{INPUT} float (N, H, W, 1) -> {OUTPUT} float (N, H, W, "
                      f"{self.num_classes})")

  def logits(self, images: np.ndarray) -> np.ndarray:
    """(N, H, W, 1) float32 preprocessed slices -> (N, H, W, classes) float32 logits."""
    return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(images, np.float32)})[0]


def softmax(logits: np.ndarray) -> np.ndarray:
  """Softmax over the last axis, float32 (as jax.nn.softmax)."""
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


class OnnxSegmenter:
  """Segments CT volumes with an `OnnxModel`; `segment` as `inference.VolumeSegmenter`'s.

  Args:
    model: the exported model.
    batch_size: slices per run; the run's `eval.batch_size` (from the metadata) when None.
    tta: mirror each slice along both in-plane axes, mean softmax; the run's `eval.tta`
      when None.
  """

  def __init__(self, model: OnnxModel, batch_size: int | None = None, tta: bool | None = None):
    self.model = model
    self.batch_size = batch_size or model.batch_size
    self.tta = model.tta if tta is None else tta

  def _mean_softmax(self, images: np.ndarray) -> np.ndarray:
    flips = FLIPS if self.tta else ((),)
    total = 0.0
    for axes in flips:
      logits = self.model.logits(np.flip(images, axes) if axes else images)
      total = total + softmax(np.flip(logits, axes) if axes else logits)
    return total / len(flips)

  def segment(self, hu: np.ndarray, probabilities: bool = False
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels, probabilities) of a (X, Y, Z) RAS volume in HU.

    Returns:
      (X, Y, Z) uint8 labels, post-processed as the run chose; (X, Y, Z, classes) uint8
      softmax x 255 (`PROBABILITY_SCALE`, before post-processing) or None.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
      raise ValueError(f"expected a 3-D volume, got shape {hu.shape}")
    x, y, z = hu.shape
    shift = intensity_shift(hu, self.model.preprocessing)   # 0 unless the run shifts HU
    labels = np.empty((z, x, y), np.uint8)
    probs = np.empty((z, x, y, self.model.num_classes), np.uint8) if probabilities else None
    for start in range(0, z, self.batch_size):
      stop = min(start + self.batch_size, z)
      slices = shifted(np.moveaxis(hu[:, :, start:stop], -1, 0), shift)
      images = preprocess(np.ascontiguousarray(slices), self.model.preprocessing)[..., None]
      if not self.tta and not probabilities:
        labels[start:stop] = self.model.logits(images).argmax(-1)
        continue
      mean = self._mean_softmax(images)
      labels[start:stop] = mean.argmax(-1)
      if probs is not None:
        probs[start:stop] = np.round(mean * PROBABILITY_SCALE)
    labels = pp.apply(np.moveaxis(labels, 0, -1), self.model.postprocessing)
    return labels, None if probs is None else np.moveaxis(probs, 0, 2)

  def __call__(self, hu: np.ndarray) -> np.ndarray:
    """Labels (0/1/2, uint8) for a (X, Y, Z) RAS volume in HU."""
    return self.segment(hu)[0]


def predict_path(onnx_path: str, input_path: str, output_path: str,
                 batch_size: int | None = None, progress: bool | None = None, *,
                 output_format: str = "nifti", tta: bool = False,
                 save_probabilities: bool = False) -> list[str]:
  """`inference.predict_path` with an exported model in place of the run's checkpoint.

  The inputs, outputs and their checks are `munet_jax.prediction`'s; `tta` turns mirroring
  on (the run's own `eval.tta` also does). Returns the label files written.
  """
  jobs = prediction.plan(input_path, output_path, output_format, save_probabilities)
  model = OnnxModel(onnx_path)
  segmenter = OnnxSegmenter(model, batch_size, tta=True if tta else None)
  return prediction.run(jobs, segmenter.segment, progress)
