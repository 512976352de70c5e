"""Volume inference: a CT volume in, a label volume out, slice batches through the model.

Slices are the last axis of a RAS-oriented volume (axial). Batches are padded to a
multiple of the device count and sharded over the devices; the padding is dropped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import ndimage

from munet_jax.models import from_config
from munet_jax.preprocessing import preprocess
from munet_jax.training import parallel


@functools.lru_cache(maxsize=8)
def _predict_fn(config_json: str, mesh_devices: tuple):
  from munet_jax.config import config_from_dict
  import json
  config = config_from_dict(json.loads(config_json))
  model = from_config(config)
  mesh = jax.sharding.Mesh(np.asarray(mesh_devices), (parallel.DATA_AXIS,))

  @functools.partial(jax.jit, out_shardings=parallel.batch_sharding(mesh))
  def predict(variables, images):
    logits = model.apply(variables, images, train=False)
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

  return predict, mesh


def segment_volume(variables: dict, config: ml_collections.ConfigDict, hu: np.ndarray,
                   batch_size: int | None = None) -> np.ndarray:
  """Labels (0/1/2, uint8) for a CT volume.

  Args:
    variables: model variables ({'params', 'batch_stats'}).
    config: the run's config (HU window, model).
    hu: (X, Y, Z) Hounsfield units in RAS orientation; slices along Z.
    batch_size: slices per batch; `eval.batch_size` when None.

  Returns:
    (X, Y, Z) uint8 labels, optionally post-processed as `eval.*` asks.
  """
  import json
  if hu.ndim != 3:
    raise ValueError(f"expected a 3-D volume, got shape {hu.shape}")
  predict, mesh = _predict_fn(json.dumps(config.to_dict()), tuple(jax.devices()))
  n_dev = mesh.devices.size
  batch = parallel.padded_batch_size(batch_size or config.eval.batch_size, n_dev)
  x, y, z = hu.shape
  out = np.empty((x, y, z), np.uint8)
  sharding = parallel.batch_sharding(mesh)
  for start in range(0, z, batch):
    stop = min(start + batch, z)
    slices = np.moveaxis(hu[:, :, start:stop], -1, 0)              # (b, X, Y)
    images = np.zeros((batch, x, y, 1), np.float32)
    images[:stop - start, ..., 0] = preprocess(slices.astype(np.float32), config)
    labels = predict(variables, jax.device_put(images, sharding))
    out[:, :, start:stop] = np.moveaxis(np.asarray(labels)[:stop - start], 0, -1)
  return postprocess(out, config)


def postprocess(labels: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  """Optional clean-up (off by default, as in the paper).

  `eval.largest_liver_component`: keep the largest 6-connected component of liver+tumour.
  `eval.tumor_inside_liver`: tumour components that touch no liver voxel become background.
  """
  if not (config.eval.largest_liver_component or config.eval.tumor_inside_liver):
    return labels
  labels = labels.copy()
  organ = labels > 0
  if config.eval.largest_liver_component and organ.any():
    components, n = ndimage.label(organ)
    sizes = np.bincount(components.ravel())[1:]
    keep = components == (1 + int(np.argmax(sizes)))
    labels[~keep] = 0
  if config.eval.tumor_inside_liver and (labels == 2).any():
    tumours, n = ndimage.label(labels == 2)
    near_liver = ndimage.binary_dilation(labels == 1)
    touching = np.unique(tumours[near_liver & (tumours > 0)])
    labels[(tumours > 0) & ~np.isin(tumours, touching)] = 0
  return labels
