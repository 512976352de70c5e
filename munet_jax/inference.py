"""Volume inference: a CT volume in, a label volume out, slice batches through the model.

Slices are the last axis of a RAS-oriented volume (axial). Whole slices go through the
network at their own size (the model pads to a multiple of its pooling factor and crops
back), so nothing is cropped or resampled. Batches have a fixed size, a multiple of the
local device count, sharded over the devices along the batch axis; the last, partial
batch is padded and the padding dropped, so every batch of a slice shape reuses one
compiled program. Hounsfield units travel to the device as int16 when the volume is
integer (half the bytes of float32) and are windowed there.

`predict_path` is `predict.py`: NIfTI in, NIfTI labels out on exactly the input's grid.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from munet_jax.errors import UserError
from munet_jax import sharding

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_LITS_LABEL = re.compile(r"^segmentation-\d+\.nii(\.gz)?$")


@functools.lru_cache(maxsize=8)
def _labeller(key: str, devices: tuple) -> tuple[Callable, jax.sharding.Mesh]:
  """The jitted `(variables, hu (B, H, W)) -> labels (B, H, W) uint8` of a model config.

  Cached by the parts of the config that change the computation (the model and the HU
  window), so a new checkpoint, volume or eval setting never recompiles; jit itself
  compiles once per slice shape and dtype.
  """
  from munet_jax.config import config_from_dict
  from munet_jax.models import from_config
  from munet_jax.preprocessing import preprocess
  config = config_from_dict(json.loads(key))
  model = from_config(config)
  mesh = sharding.make_mesh(list(devices))

  @functools.partial(jax.jit, out_shardings=sharding.batch_sharding(mesh))
  def label_slices(variables, hu):
    images = preprocess(hu[..., None], config)
    logits = model.apply(variables, images, train=False)
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

  return label_slices, mesh


def _computation_key(config: ml_collections.ConfigDict) -> str:
  return json.dumps({"model": config.model.to_dict(),
                     "data": {"hu_window": list(config.data.hu_window),
                              "scaled_range": list(config.data.scaled_range)}},
                    sort_keys=True)


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
  """Segments CT volumes with one set of variables; reuse it across volumes.

  Args:
    variables: model variables ({'params', 'batch_stats'}).
    config: the run's config (model, HU window, `eval.*`).
    batch_size: slices per batch; `eval.batch_size` when None. Rounded up to a multiple
      of the local device count.
    devices: devices to shard batches over; this process's devices when None.
    postprocessing: the post-processing steps to apply ({step: bool}, e.g. a run's
      `munet_jax.postprocessing.load_choice`); the config's `eval.*` flags when None.
  """

  def __init__(self, variables: dict, config: ml_collections.ConfigDict,
               batch_size: int | None = None, devices=None,
               postprocessing: dict | None = None):
    from munet_jax import postprocessing as pp
    devices = tuple(devices if devices is not None else jax.local_devices())
    self.config = config
    self.postprocessing = postprocessing if postprocessing is not None else \
        pp.from_config(config)
    self._label, self.mesh = _labeller(_computation_key(config), devices)
    self._sharding = sharding.batch_sharding(self.mesh)
    self.batch_size = sharding.padded_batch_size(batch_size or config.eval.batch_size,
                                                 len(devices))
    self.variables = _replicate(variables, self.mesh)

  def __call__(self, hu: np.ndarray) -> np.ndarray:
    """Labels (0/1/2, uint8) for a CT volume.

    Args:
      hu: (X, Y, Z) Hounsfield units in RAS orientation; slices along Z (any X, Y, Z >= 1).

    Returns:
      (X, Y, Z) uint8 labels, post-processed as `postprocessing` (or `eval.*`) asks.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
      raise ValueError(f"expected a 3-D volume, got shape {hu.shape}")
    x, y, z = hu.shape
    dtype = _transfer_dtype(hu)
    batch = self.batch_size
    out = np.empty((z, x, y), np.uint8)
    pending = None
    for start in range(0, z, batch):
      stop = min(start + batch, z)
      # A fresh host buffer per batch: the transfer may still be reading the last one.
      images = np.zeros((batch, x, y), dtype)
      images[:stop - start] = np.moveaxis(hu[:, :, start:stop], -1, 0)
      labels = self._label(self.variables, jax.device_put(images, self._sharding))
      # Fetch the previous batch while this one runs: the host and device overlap.
      if pending is not None:
        self._fetch(out, *pending)
      pending = (start, stop, labels)
    if pending is not None:
      self._fetch(out, *pending)
    from munet_jax import postprocessing
    return postprocessing.apply(np.moveaxis(out, 0, -1), self.postprocessing)

  @staticmethod
  def _fetch(out, start, stop, labels):
    out[start:stop] = np.asarray(jax.device_get(labels))[:stop - start]


def segment_volume(variables: dict, config: ml_collections.ConfigDict, hu: np.ndarray,
                   batch_size: int | None = None) -> np.ndarray:
  """Labels (0/1/2, uint8) for a CT volume.

  Args:
    variables: model variables ({'params', 'batch_stats'}).
    config: the run's config (HU window, model, `eval.*`).
    hu: (X, Y, Z) Hounsfield units in RAS orientation; slices along Z.
    batch_size: slices per batch; `eval.batch_size` when None.

  Returns:
    (X, Y, Z) uint8 labels, optionally post-processed as `eval.*` asks. For many
    volumes, `VolumeSegmenter` places the variables on the devices once.
  """
  return VolumeSegmenter(variables, config, batch_size)(hu)


def postprocess(labels: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  """The clean-up the config fixes (`eval.largest_liver_component`, `eval.tumor_inside_liver`,
  off by default, as in the paper); see `munet_jax.postprocessing`."""
  from munet_jax import postprocessing
  return postprocessing.apply(labels, postprocessing.from_config(config))


# ----------------------------------------------------------------------------- predict.py


def case_name(path: str) -> str:
  """The case name of a CT file: its name without .nii[.gz] and a Decathlon `_0000` suffix."""
  name = os.path.basename(path)
  for suffix in NIFTI_SUFFIXES:
    if name.endswith(suffix):
      name = name[:-len(suffix)]
      break
  return re.sub(r"_0000$", "", name)


def is_nifti(name: str) -> bool:
  return name.endswith(NIFTI_SUFFIXES) and not os.path.basename(name).startswith(".")


def list_nifti(folder: str) -> list[str]:
  """The NIfTI files directly in `folder` (hidden files skipped), sorted by name."""
  from munet_jax.data.discovery import natural_key
  try:
    names = os.listdir(folder)
  except OSError as e:
    raise UserError(f"{folder}: cannot list folder ({e.strerror or e})") from e
  return [os.path.join(folder, n) for n in sorted(names, key=natural_key)
          if is_nifti(n) and os.path.isfile(os.path.join(folder, n))]


def plan_outputs(input_path: str, output_path: str) -> list[tuple[str, str]]:
  """(input CT file, output label file) pairs for predict.py; checks the paths.

  A file in gives the file `output_path` (or, when `output_path` is an existing folder,
  CASE.nii.gz in it); a folder in gives OUTPUT/CASE.nii.gz for every NIfTI file of it,
  CASE being the input's name without a Decathlon `_0000` suffix. LiTS label files
  (segmentation-N.nii[.gz]) in an input folder are left out.
  """
  if not os.path.exists(input_path):
    raise UserError(f"{input_path}: --input not found")
  if os.path.isdir(input_path):
    inputs = list_nifti(input_path)
    # A LiTS folder holds its label files beside the CT: segmentation-N is not a CT.
    labels = [p for p in inputs if _LITS_LABEL.match(os.path.basename(p))]
    if labels:
      inputs = [p for p in inputs if p not in labels]
      print(f"note: {len(labels)} LiTS label file(s) (segmentation-N) in {input_path} "
            "are not CT and are left out", file=sys.stderr)
    if not inputs:
      raise UserError(f"{input_path}: no NIfTI files (*.nii, *.nii.gz) in the --input folder")
    if os.path.exists(output_path) and not os.path.isdir(output_path):
      raise UserError(f"{output_path}: --output must be a folder when --input is a folder")
    for path in inputs:
      suffix = re.search(r"_(\d{4})\.nii(\.gz)?$", os.path.basename(path))
      if suffix and suffix.group(1) != "0000":
        raise UserError(f"{path}: only single-channel CT is supported (channel "
                        f"{suffix.group(1)}; expected NAME.nii.gz or NAME_0000.nii.gz)")
    pairs = [(p, os.path.join(output_path, case_name(p) + ".nii.gz")) for p in inputs]
  else:
    if not is_nifti(input_path):
      raise UserError(f"{input_path}: --input must be a .nii or .nii.gz file or a folder")
    if os.path.isdir(output_path):
      pairs = [(input_path, os.path.join(output_path, case_name(input_path) + ".nii.gz"))]
    elif not output_path.endswith(NIFTI_SUFFIXES):
      raise UserError(f"{output_path}: --output must end in .nii or .nii.gz "
                      "(or be an existing folder) when --input is a file")
    else:
      pairs = [(input_path, output_path)]
  seen: dict[str, str] = {}
  inputs_real = {os.path.realpath(p) for p, _ in pairs}
  for src, dst in pairs:
    real = os.path.realpath(dst)
    if real in inputs_real:
      raise UserError(f"{dst}: output would overwrite an input CT file; choose another --output")
    if real in seen:
      raise UserError(f"{src}: gives the same output name {dst} as {seen[real]}")
    seen[real] = src
  return pairs


def prefetch(loaders: Iterable[Callable], ahead: int = 1) -> Iterator:
  """Calls each loader in a background thread, `ahead` of the consumer; yields results.

  Reading and decompressing the next NIfTI file overlaps with segmenting this one. An
  exception from a loader is raised where its result is consumed.
  """
  loaders = list(loaders)
  with ThreadPoolExecutor(max_workers=1) as pool:
    futures = [pool.submit(f) for f in loaders[:ahead]]
    for i in range(len(loaders)):
      if i + ahead < len(loaders):
        futures.append(pool.submit(loaders[i + ahead]))
      try:
        yield futures[i].result()
      except BaseException:
        for f in futures[i + 1:]:
          f.cancel()
        raise
      futures[i] = None  # free the volume


def predict_path(workdir: str, input_path: str, output_path: str, which: str = "latest",
                 batch_size: int | None = None, progress: bool | None = None) -> list[str]:
  """Segments one CT file or a folder of them with a training run's checkpoint.

  Args:
    workdir: the training run (its checkpoints).
    input_path: a .nii / .nii.gz CT file (Hounsfield units), or a folder of them.
    output_path: the label file (input a file) or folder (input a folder).
    which: 'latest' or 'best' checkpoint.
    batch_size: slices per batch; the run's `eval.batch_size` when None.
    progress: show a progress bar over volumes; None: only on a terminal.

  Returns:
    The label files written: uint8 0/1/2 with exactly the input's shape, affine and
    header geometry (qform / sform), each written atomically.
  """
  from tqdm import tqdm

  from munet_jax.api import load
  from munet_jax.data import nifti
  pairs = plan_outputs(input_path, output_path)
  from munet_jax.postprocessing import load_choice
  config, variables = load(workdir, which)
  segmenter = VolumeSegmenter(variables, config, batch_size,
                              postprocessing=load_choice(workdir))
  written = []
  volumes = prefetch(functools.partial(nifti.read_image, src) for src, _ in pairs)
  bar = tqdm(pairs, desc="predict", unit="volume", disable=_no_bar(progress), leave=False)
  with bar:
    for (src, dst), image in zip(bar, volumes):
      bar.set_postfix_str(os.path.basename(src), refresh=False)
      labels_ras = segmenter(nifti.to_ras(image.data, image.affine))
      nifti.write_label(dst, nifti.from_ras(labels_ras, image.affine), like=image)
      written.append(dst)
  return written


def _no_bar(progress: bool | None) -> bool | None:
  return None if progress is None else not progress
