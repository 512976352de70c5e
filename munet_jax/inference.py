"""Volume inference: a CT volume in, a label volume out, slice batches through the model.

Slices are the last axis of a RAS-oriented volume (axial). Whole slices go through the
network at their own size (the model pads to a multiple of its pooling factor and crops
back), so nothing is cropped or resampled. Batches have a fixed size, a multiple of the
local device count, sharded over the devices along the batch axis; the last, partial
batch is padded and the padding dropped, so every batch of a slice shape reuses one
compiled program. Hounsfield units travel to the device as int16 when the volume is
integer (half the bytes of float32) and are windowed there.

`predict_path` is `predict.py` on a checkpoint (or an ensemble of runs): NIfTI or DICOM
in, labels out on exactly the input's grid (`munet_jax.prediction` reads and writes).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from munet_jax import postprocessing as pp
from munet_jax import prediction, sharding
from munet_jax.checkpoints import load_variables
from munet_jax.config import config_from_dict
from munet_jax.errors import UserError
from munet_jax.models import from_config
from munet_jax.prediction import PROBABILITY_SCALE, plan_outputs  # noqa: F401 (public here too)
from munet_jax.preprocessing import intensity_shift, preprocess, shifted


@functools.lru_cache(maxsize=8)
def _labeller(key: str, devices: tuple, models: int = 1, tta: bool = False,
              probabilities: bool = False) -> tuple[Callable, jax.sharding.Mesh]:
  """The jitted `(variables, hu (B, H, W)) -> labels (B, H, W) uint8` of a model config.

  Cached by the parts of the config that change the computation (the model and the HU
  window), so a new checkpoint, volume or eval setting never recompiles; jit itself
  compiles once per slice shape and dtype. With several `models` (`variables` is then a
  list, an ensemble) or `tta`, the labels are the argmax of the mean softmax over models
  and mirrorings; with `probabilities` the function returns (labels, (B, H, W, classes)
  uint8 softmax x 255) as well.
  """
  config = config_from_dict(json.loads(key))
  model = from_config(config)
  mesh = sharding.make_mesh(list(devices))
  # In-plane mirrorings of the (B, H, W, 1) batch: none, H, W, both.
  flips = ((), (1,), (2,), (1, 2)) if tta else ((),)
  out = sharding.batch_sharding(mesh)

  def softmax(variables, images):
    total = 0.0
    for v in (variables if models > 1 else [variables]):
      for axes in flips:
        logits = model.apply(v, jnp.flip(images, axes) if axes else images, train=False)
        total = total + jax.nn.softmax(jnp.flip(logits, axes) if axes else logits, axis=-1)
    return total / (len(flips) * models)

  @functools.partial(jax.jit, out_shardings=(out, out) if probabilities else out)
  def label_slices(variables, hu):
    images = preprocess(hu[..., None], config)
    if models == 1 and not tta and not probabilities:
      logits = model.apply(variables, images, train=False)
      return jnp.argmax(logits, axis=-1).astype(jnp.uint8)
    mean = softmax(variables, images)
    labels = jnp.argmax(mean, axis=-1).astype(jnp.uint8)
    if not probabilities:
      return labels
    return labels, jnp.round(mean * PROBABILITY_SCALE).astype(jnp.uint8)

  return label_slices, mesh


def _computation_key(config: ml_collections.ConfigDict) -> str:
  data = {"hu_window": list(config.data.hu_window),
          "scaled_range": list(config.data.scaled_range)}
  if config.data.get("reference_hu") is not None:   # the per-volume HU shift, when set
    data.update(reference_hu=float(config.data.reference_hu),
                reference_window=[float(v) for v in config.data.reference_window],
                reference_percentile=float(config.data.reference_percentile))
  return json.dumps({"model": config.model.to_dict(), "data": data}, sort_keys=True)


def _replicate(variables: dict, mesh: jax.sharding.Mesh) -> dict:
  """Variables on every device of `mesh` (a no-op for arrays already placed so)."""
  everywhere = sharding.replicated(mesh)

  def place(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = leaf.addressable_data(0)  # multi-host: this process's copy of a replicated array
    return jax.device_put(leaf, everywhere)

  return jax.tree_util.tree_map(place, variables)


def _transfer_dtype(hu: np.ndarray) -> np.dtype:
  if hu.dtype.kind in "iub":
    if hu.dtype.itemsize <= 1 or hu.dtype == np.int16:
      return np.dtype(np.int16)
    if hu.size and np.iinfo(np.int16).min <= hu.min() and hu.max() <= np.iinfo(np.int16).max:
      return np.dtype(np.int16)
  return np.dtype(np.float32)


class VolumeSegmenter:
  """Segments CT volumes with one set of variables, or an ensemble; reuse it across volumes.

  Args:
    variables: model variables ({'params', 'batch_stats'}), or a list of them (an
      ensemble of runs of one architecture and HU window: the mean of their softmax).
    config: the run's config (model, HU window, `data.reference_hu` if the run shifts
      each volume's HU, `eval.*`; `eval.tta` mirrors each slice along both in-plane
      axes and averages the four softmaxes).
    batch_size: slices per batch; `eval.batch_size` when None. Rounded up to a multiple
      of the local device count.
    devices: devices to shard batches over; this process's devices when None.
    postprocessing: the post-processing steps to apply ({step: value}, e.g. a run's
      `munet_jax.postprocessing.load_choice`); the config's `eval.*` values when None.
  """

  def __init__(self, variables: dict | Sequence[dict], config: ml_collections.ConfigDict,
               batch_size: int | None = None, devices=None,
               postprocessing: dict | None = None):
    devices = tuple(devices if devices is not None else jax.local_devices())
    self.config = config
    self.postprocessing = pp.normalise(postprocessing if postprocessing is not None
                                       else pp.from_config(config))
    self._models = 1 if isinstance(variables, Mapping) else len(variables)
    if self._models == 0:
      raise ValueError("an ensemble needs at least one set of variables")
    self._key = (_computation_key(config), devices, self._models, bool(config.eval.tta))
    self._label, self.mesh = _labeller(*self._key)
    self._sharding = sharding.batch_sharding(self.mesh)
    self.batch_size = sharding.padded_batch_size(batch_size or config.eval.batch_size,
                                                 len(devices))
    if self._models == 1 and not isinstance(variables, Mapping):
      variables = variables[0]
    self.variables = (_replicate(variables, self.mesh) if self._models == 1
                      else [_replicate(v, self.mesh) for v in variables])

  def __call__(self, hu: np.ndarray) -> np.ndarray:
    """Labels (0/1/2, uint8) for a CT volume.

    Args:
      hu: (X, Y, Z) Hounsfield units in RAS orientation; slices along Z (any X, Y, Z >= 1).

    Returns:
      (X, Y, Z) uint8 labels, post-processed as `postprocessing` (or `eval.*`) asks.
    """
    return self.segment(hu)[0]

  def segment(self, hu: np.ndarray, probabilities: bool = False
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels, probabilities): as `__call__`, and the softmax when asked.

    Returns:
      (X, Y, Z) uint8 labels (post-processed), and (X, Y, Z, classes) uint8 softmax x 255
      (`PROBABILITY_SCALE`; the mean over the ensemble and mirrorings, before
      post-processing) or None.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
      raise ValueError(f"expected a 3-D volume, got shape {hu.shape}")
    x, y, z = hu.shape
    label = _labeller(*self._key, probabilities)[0] if probabilities else self._label
    dtype = _transfer_dtype(hu)
    shift = intensity_shift(hu, self.config)   # 0 unless data.reference_hu is set
    batch = self.batch_size
    out = np.empty((z, x, y), np.uint8)
    probs = (np.empty((z, x, y, self.config.model.num_classes), np.uint8)
             if probabilities else None)
    pending = None
    for start in range(0, z, batch):
      stop = min(start + batch, z)
      # A fresh host buffer per batch: the transfer may still be reading the last one.
      images = np.zeros((batch, x, y), dtype)
      images[:stop - start] = shifted(
          np.moveaxis(hu[:, :, start:stop], -1, 0).astype(dtype, copy=False), shift)
      result = label(self.variables, jax.device_put(images, self._sharding))
      # Fetch the previous batch while this one runs: the host and device overlap.
      if pending is not None:
        self._fetch(out, probs, *pending)
      pending = (start, stop, result)
    if pending is not None:
      self._fetch(out, probs, *pending)
    labels = pp.apply(np.moveaxis(out, 0, -1), self.postprocessing)
    return labels, None if probs is None else np.moveaxis(probs, 0, 2)

  @staticmethod
  def _fetch(out, probs, start, stop, result):
    if probs is None:
      out[start:stop] = np.asarray(jax.device_get(result))[:stop - start]
    else:
      labels, p = jax.device_get(result)
      out[start:stop] = np.asarray(labels)[:stop - start]
      probs[start:stop] = np.asarray(p)[:stop - start]


def postprocess(labels: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  """The clean-up the config fixes (`eval.largest_liver_component`, `eval.tumour_inside_liver`,
  `eval.min_tumour_voxels`, off by default, as in the paper); see `munet_jax.postprocessing`."""
  return pp.apply(labels, pp.from_config(config))


def load_runs(workdirs: str | Sequence[str], which: str = "latest"
              ) -> tuple[list[ml_collections.ConfigDict], dict | list[dict], list[int]]:
  """(configs, variables, checkpoint steps) of one run, or of an ensemble of runs.

  One workdir gives its variables; several give a list (an ensemble), one config and step
  per run. The runs must share the architecture, the HU window and any per-volume HU
  shift (a `UserError` naming the run that differs); the first run's config (its
  `eval.*`) is the ensemble's.
  """
  if isinstance(workdirs, (str, os.PathLike)):
    config, variables, step = load_variables(workdirs, which)
    return [config], variables, [step]
  configs, variables, steps = [], [], []
  for workdir in workdirs:
    config, v, step = load_variables(workdir, which)
    if configs and _computation_key(config) != _computation_key(configs[0]):
      raise UserError(f"{workdir}: its model, HU window or HU shift differs from "
                      f"{workdirs[0]}'s; an ensemble needs runs of one architecture and "
                      "preprocessing")
    configs.append(config)
    variables.append(v)
    steps.append(step)
  return configs, variables, steps


def predict_path(workdir: str | Sequence[str], input_path: str, output_path: str,
                 which: str = "latest", batch_size: int | None = None,
                 progress: bool | None = None, *, output_format: str = "nifti",
                 tta: bool = False, save_probabilities: bool = False) -> list[str]:
  """Segments CT files or DICOM series with a training run's checkpoint (or several).

  Args:
    workdir: the training run (its checkpoints), or a list of runs: an ensemble, the
      mean of their softmax.
    input_path: a .nii / .nii.gz CT file (Hounsfield units), a folder of them, or a
      folder of DICOM CT series (`munet_jax.prediction.plan`).
    output_path: the label file or folder.
    which: 'latest' or 'best' checkpoint.
    batch_size: slices per batch; the run's `eval.batch_size` when None.
    progress: show a progress bar over volumes; None: only on a terminal.
    output_format: 'nifti', or 'dicom-seg' (DICOM input only).
    tta: mirror each slice along both in-plane axes and average the softmax.
    save_probabilities: also write NAME_probabilities.nii.gz (uint8 softmax x 255).

  Returns:
    The label files written: uint8 0/1/2 on exactly the input's grid (NIfTI: its shape,
    affine and header geometry; DICOM: the grid of ITK's series reader, or a DICOM-SEG
    referencing the series), each written atomically.
  """
  jobs = prediction.plan(input_path, output_path, output_format, save_probabilities)
  configs, variables, _ = load_runs(workdir, which)
  config = configs[0]
  if tta:
    config.eval.tta = True
  # One run: the post-processing chosen on its validation split, if it chose; an
  # ensemble: the config's flags.
  chosen = pp.load_choice(workdir) if isinstance(workdir, (str, os.PathLike)) else None
  segmenter = VolumeSegmenter(variables, config, batch_size, postprocessing=chosen)
  return prediction.run(jobs, segmenter.segment, progress)
