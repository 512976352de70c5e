"""Overlap and surface-distance metrics of a segmentation against a reference.

`segmentation_metrics(pred, ref, spacing)` gives DSC, VOE, RVD, ASSD, MSSD, RMSD, HD95
and the normalised surface Dice (NSD) with exact Euclidean surface distances in physical
units, in agreement with medpy 0.5.2 (`dc`, `1 - jc`, `ravd`, `assd`, `hd`, `hd95`,
connectivity 1) wherever medpy is defined. Two exact ways to the distances give the same
numbers (to float rounding); numpy takes the statistics in float64 after either.

Method "host" (the default; numpy and scipy on the CPU's cores):

* Boxes. Each object's surface lies in its own bounding box, and outside it there are
  none of its voxels, so the erosion runs there (which also makes the array's edge count
  as background), packed 64 voxels to a word along the last axis, in slabs along the
  first axis on a thread pool. The surface voxels become flat indices in the joint box,
  padded by the shells' reach; one byte a voxel of it marks S(ref) and S(pred).
* Shells. For each surface voxel of one object (a target), the voxel offsets within a
  few of the finest voxels are tried nearest first, a block at a time, for the targets
  not yet settled; the first offset that meets the other surface gives the exact
  distance whenever it is below the bound past which offsets were not tried
  (`_shell_offsets`). Most distances of a usable segmentation are settled here, at a cost
  per target that does not depend on the box.
* k-d tree. The targets left (an island far from the other surface, a gross error) ask
  scipy's k-d tree of the other surface's voxels in physical coordinates (exact, float64).
  Its cost grows with the number of surface voxels, not with the box or the distance.
  Both directions run side by side.

Cost: one streaming pass over each object's box for the erosion (then work on 1/64 of
it), O(S log S) in the S surface voxels for the search; memory about 1.1 bytes a voxel
of the joint box plus O(S).

Method "jax" (one jitted JAX program on JAX's default device, e.g. a GPU; then numpy):

* Crop. Every surface voxel lies in the bounding box of ref ∪ pred, and a voxel just
  outside that box is outside both objects, so the surfaces and all nearest-surface
  searches can be done inside the box with "outside the box" meaning "background". This
  also gives the rule that the array's edge counts as background.
* Buckets. The box is padded with background up to a bucketed shape, so differently
  sized cases share one compiled program (`_bucket`); the loops run only over the box's
  true extent, so the padding costs memory but little time.
* Exact distance transform, separable (Saito-Toriwaki): with the squared distance
  D(p) = min over surface voxels q of sum_k s_k^2 (p_k - q_k)^2,
    pass 1 (axis a) f = the squared distance to the nearest surface voxel on the same
           line, from the last and next surface index (cumulative max/min): linear;
    pass 2 (axis b) g(p) = min_t f(p + t e_b) + s_b^2 t^2,  |t| <= r_b;
    pass 3 (axis c) D(p) = min_u g(p + u e_c) + s_c^2 u^2,  |u| <= r_c.
  With windows r_b, r_c, the result is the exact distance to the nearest surface voxel
  within the window; every surface voxel outside it is at least
  min(s_b (r_b + 1), s_c (r_c + 1)) away, so wherever the result is within that bound it
  is exact.
* First window, everywhere. Passes 2 and 3 first run with a fixed window of
  `_FIRST_WINDOW` voxels along b and c, unrolled, so XLA fuses each pass into one sweep
  over the chunk: a cost per voxel that is the same for every case. Most surface
  distances of a usable segmentation are settled there.
* Bands, only where needed. The targets it does not settle (an island far from the
  other surface, a bad boundary) are searched again band by band, a band being `_BAND`
  planes along b of the chunk: passes 2 and 3 for that band alone with a radius that
  grows threefold until every target of the band is settled (at most the whole box,
  where the bound is infinite). A distant false positive thus costs the few bands it
  lies in, not the whole chunk. Both directions (distance to S(ref) at S(pred), and to
  S(pred) at S(ref)) run side by side.
* Chunks. The box is processed in chunks of a few planes along axis a (the box's finest,
  then longest axis), so memory is linear in the box: the packed box (one byte a voxel),
  the per-chunk bookkeeping of pass 1 (at most one byte a voxel), the squared distance
  at every voxel of the box (4 bytes, -1 off the surfaces; one value serves both
  directions, as a voxel on both surfaces is 0 from either), and chunk-sized
  temporaries. Pass 1 crosses chunks: a first, backward sweep records per chunk the
  first surface plane after it; the main sweep carries the last one before it.
* Statistics. numpy takes the surface voxels' values (float64 from there on): means,
  maximum, the 95th percentile (numpy's linear interpolation, as medpy) and the count
  within the NSD tolerance.

Precision, method "host": squared distances are float64 (shells: sums of s_k^2 o_k^2; the
tree: from float64 coordinates), about 1e-16 relative; ties with the NSD tolerance are
compared in float64.

Precision, method "jax": squared distances are float32 sums of non-negative terms
s_k^2 * i^2 (i an exact integer offset), so each is within about 3e-7 relative of the exact
value, and so is their minimum (the window bound is tested with a 1e-6 relative margin,
far above that rounding); square roots and all sums over voxels are float64. Distances
therefore agree with an exact float64 computation to better than 1e-6 relative, and so
do the percentile (an interpolation between two of them) and the means. NSD compares
each distance with the tolerance: exact unless a distance is within that rounding of the
tolerance (with spacings and tolerances of few binary digits, e.g. 0.5 mm and 2 mm, the
float32 squares are exact and so are ties).

Cost, method "jax": with the box of N voxels, time O(N) for the surfaces, pass 1 and the
first window, plus O(n_band R) for each band searched again, n_band its voxels and R the
radius in voxels that settles it (about its largest distance); memory O(N) as above.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from munet_jax.errors import UserError
from munet_jax.labels import bounding_box

__all__ = ["DEFAULT_NSD_TOLERANCE", "METHODS", "METRIC_NAMES", "MetricsArgumentError",
           "segmentation_metrics", "surface"]

METRIC_NAMES = ("dsc", "voe", "rvd", "assd", "mssd", "rmsd", "hd95", "nsd")  # keys, in order
METHODS = ("host", "jax")   # segmentation_metrics(method=...)
DEFAULT_NSD_TOLERANCE = 2.0   # mm: about two in-plane voxels of abdominal CT (0.6-1 mm)

_MIN_BUCKET = 32           # the smallest padded length of a box axis
_CHUNK_VOXELS = 1 << 18    # per direction: 1 MiB of float32, about a CPU core's cache
_MIN_CHUNK_PLANES = 4      # keeps the per-chunk bookkeeping at most 1/2 byte a voxel
_MAX_CHUNK_PLANES = 16     # thin chunks: one far voxel widens the search for fewer others
_FAR = 1 << 28             # "no surface voxel on this side" plane index
_FIRST_WINDOW = 6          # voxels: most surface distances of a fair segmentation are less
_RADIUS_GROWTH = 3.0       # the search radius's growth while some distance exceeds it
_BAND = 8                  # planes along b searched again together when one needs more
_REF, _PRED = 1, 2         # bits of the packed box
# Method "host":
_SHELL_VOXELS = 4          # shells reach about this many of the finest voxels
_SHELL_BLOCKS = (1, 8, 8, 16, 16) + (32,) * 64   # offsets tried per step, nearest first
_LEAF_SIZE = 16            # points in a k-d tree's leaf
_TARGET_CHUNK = 4096       # targets taken through the shells together


class MetricsArgumentError(UserError, ValueError):
  """Arguments of the wrong shape, dtype or spacing."""


# --------------------------------------------------------------------------- public


def segmentation_metrics(pred, ref, spacing: Sequence[float],
                         nsd_tolerance: float = DEFAULT_NSD_TOLERANCE, *,
                         method: str = "host") -> dict[str, float]:
  """Overlap and surface-distance metrics of `pred` against `ref`.

  Args:
    pred: (X, Y) or (X, Y, Z) boolean array (numpy or jax; integer arrays count nonzero
      as True), the segmentation B.
    ref: boolean array of the same shape, the reference A.
    spacing: one positive voxel size per axis, in the arrays' axis order (e.g. mm).
    nsd_tolerance: the tolerance tau of the normalised surface Dice, in the units of
      `spacing` (non-negative).
    method: how the surface distances are found, both exact: "host" (the default:
      numpy and a k-d tree on the CPU's cores, the fastest on a CPU) or "jax" (one jitted
      JAX program on JAX's default device, e.g. a GPU).

  Returns:
    {"dsc", "voe", "rvd"} as fractions, {"assd", "mssd", "rmsd", "hd95"} in the units of
    `spacing` and {"nsd"} as a fraction, all Python floats (keys in `METRIC_NAMES`'
    order). Surfaces are the voxels with a face neighbour outside the object (the
    array's edge counts as outside); distances are exact Euclidean, from each surface
    voxel of one object to the nearest surface voxel of the other, both directions
    pooled: hd95 is their 95th percentile (numpy's linear interpolation, as medpy's
    `hd95`; MONAI's `compute_hausdorff_distance(percentile=95)` takes the larger of the
    two directions' percentiles instead), nsd the fraction of them at most
    `nsd_tolerance` (MONAI's `compute_surface_dice` without subvoxels).
    Both empty: dsc 1, voe 0, rvd 0, distances 0, nsd 1. One empty: dsc 0, voe 1, rvd -1
    (pred empty) or +inf (ref empty), distances +inf, nsd 0.

  Raises:
    MetricsArgumentError (a ValueError): shapes differ, not 2-D or 3-D, not boolean or
      integer, `spacing` is not one positive finite number per axis, `nsd_tolerance`
      is not a non-negative finite number, or `method` is not "host" or "jax".
  """
  pred, ref, spacing = _check_arguments(pred, ref, spacing)
  tolerance = _check_tolerance(nsd_tolerance)
  if method not in METHODS:
    raise MetricsArgumentError(
        f"segmentation_metrics: method must be one of {METHODS}, got {method!r}")
  box_ref, box_pred = bounding_box(ref), bounding_box(pred)
  if box_ref is None and box_pred is None:
    return dict(dsc=1.0, voe=0.0, rvd=0.0, assd=0.0, mssd=0.0, rmsd=0.0, hd95=0.0, nsd=1.0)
  if box_ref is None or box_pred is None:
    inf = math.inf
    return dict(dsc=0.0, voe=1.0, rvd=-1.0 if box_pred is None else inf,
                assd=inf, mssd=inf, rmsd=inf, hd95=inf, nsd=0.0)
  distances = _host_distances if method == "host" else _jax_distances
  (n_ref, n_pred, n_both), d2 = distances(ref, pred, box_ref, box_pred, spacing)
  d = np.sqrt(d2)
  return dict(
      dsc=2.0 * n_both / (n_ref + n_pred),
      voe=1.0 - n_both / (n_ref + n_pred - n_both),
      rvd=(n_pred - n_ref) / n_ref,
      assd=float(d.mean()),
      mssd=float(d.max()),
      rmsd=math.sqrt(float(d2.mean())),
      hd95=float(np.percentile(d, 95)),
      nsd=int(np.count_nonzero(d <= tolerance)) / d.size,
  )


def surface(mask) -> np.ndarray:
  """The surface of `mask` as a boolean array of its shape (2-D or 3-D).

  The voxels of `mask` with at least one face neighbour (4- or 6-neighbourhood) outside
  it, the array's edge counting as outside. A plain numpy helper for plots and checks.
  """
  mask = np.asarray(mask).astype(bool)
  inner = mask.copy()
  for axis in range(mask.ndim):
    for step in (1, -1):
      inner &= _shift_np(mask, axis, step)
  return mask & ~inner


def _shift_np(x: np.ndarray, axis: int, step: int) -> np.ndarray:
  """x moved by `step` along `axis`, filled with False: out[i] = x[i + step]."""
  out = np.zeros_like(x)
  src = [slice(None)] * x.ndim
  dst = [slice(None)] * x.ndim
  src[axis] = slice(step, None) if step > 0 else slice(None, step)
  dst[axis] = slice(None, -step) if step > 0 else slice(-step, None)
  out[tuple(dst)] = x[tuple(src)]
  return out


# ------------------------------------------------------------------------ arguments


def _check_arguments(pred, ref, spacing):
  arrays = []
  for name, x in (("pred", pred), ("ref", ref)):
    try:
      x = np.asarray(x)
    except Exception as e:  # objects numpy cannot hold
      raise MetricsArgumentError(f"segmentation_metrics: {name} is not an array ({e})")
    if x.dtype != np.bool_ and not np.issubdtype(x.dtype, np.integer):
      raise MetricsArgumentError(
          f"segmentation_metrics: {name} must be a boolean mask, got dtype {x.dtype}")
    if x.ndim not in (2, 3):
      raise MetricsArgumentError(
          f"segmentation_metrics: {name} must be 2-D or 3-D, got shape {x.shape}")
    arrays.append(np.ascontiguousarray(x if x.dtype == np.bool_ else x != 0))
  pred, ref = arrays
  if pred.shape != ref.shape:
    raise MetricsArgumentError(
        f"segmentation_metrics: pred and ref differ in shape: {pred.shape} vs {ref.shape}")
  try:
    values = np.asarray(spacing, dtype=np.float64)
  except (TypeError, ValueError):
    raise MetricsArgumentError(
        f"segmentation_metrics: spacing must be {pred.ndim} numbers, got {spacing!r}") from None
  if values.shape != (pred.ndim,):
    raise MetricsArgumentError(
        f"segmentation_metrics: spacing must have one value per axis ({pred.ndim}), "
        f"got {spacing!r}")
  if not np.all(np.isfinite(values)) or np.any(values <= 0):
    raise MetricsArgumentError(
        f"segmentation_metrics: spacing must be positive and finite, got {spacing!r}")
  return pred, ref, tuple(float(v) for v in values)


def _check_tolerance(tolerance) -> float:
  try:
    value = float(tolerance)
  except (TypeError, ValueError):
    value = math.nan
  if not (math.isfinite(value) and value >= 0):
    raise MetricsArgumentError(
        f"segmentation_metrics: nsd_tolerance must be a non-negative finite number, "
        f"got {tolerance!r}")
  return value


# ---------------------------------------------------------------------- method "host"


def _threads() -> int:
  """The CPU cores this process may use."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:   # not on Linux
    return max(1, os.cpu_count() or 1)


def _host_distances(ref, pred, box_ref, box_pred, spacing):
  """([|ref|, |pred|, |ref ∩ pred|], float64 squared distances of both surfaces' voxels)
  with numpy and a k-d tree (module docstring, "method host")."""
  ndim = ref.ndim
  s = np.asarray(spacing, np.float64)
  offsets, offset_d2, reach = _shell_offsets(s)
  # The joint box, padded by the shells' reach so that a shell never leaves the array.
  joint = [(min(r.start, p.start) - k, max(r.stop, p.stop) + k)
           for r, p, k in zip(box_ref, box_pred, reach)]
  shape = tuple(hi - lo for lo, hi in joint)
  strides = np.array([math.prod(shape[k + 1:]) for k in range(ndim)], np.int64)
  inter = tuple(slice(max(r.start, p.start), min(r.stop, p.stop))
                for r, p in zip(box_ref, box_pred))
  threads = _threads()
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    # Surfaces (flat indices in the padded box) and volumes, in slabs along axis 0.
    jobs = [[pool.submit(_surface_slab, mask, box, lo, hi, joint, strides)
             for lo, hi in _slabs(box, threads)] for mask, box in ((ref, box_ref),
                                                                   (pred, box_pred))]
    both = [pool.submit(_overlap, ref, pred, inter, lo, hi)
            for lo, hi in _slabs(inter, threads)] if all(
                b.start < b.stop for b in inter) else []
    (surf_ref, n_ref), (surf_pred, n_pred) = (
        (np.concatenate([j.result()[0] for j in group]), sum(j.result()[1] for j in group))
        for group in jobs)
    n_both = sum(j.result() for j in both)
    # One byte a voxel of the padded box: bit 0 on S(ref), bit 1 on S(pred).
    code = np.zeros(math.prod(shape), np.uint8)
    code[surf_ref] = 1
    code[surf_pred] |= 2
    flat_offsets = offsets @ strides
    workers = max(1, threads // 2)
    to_ref = pool.submit(_directed, surf_pred, surf_ref, code, 0, flat_offsets, offset_d2,
                         shape, s, workers)
    to_pred = _directed(surf_ref, surf_pred, code, 1, flat_offsets, offset_d2, shape, s,
                        workers)
    d2 = np.concatenate([to_ref.result(), to_pred])
  return (n_ref, n_pred, n_both), d2


def _shell_offsets(s):
  """The voxel offsets checked around each target before the k-d tree, nearest first.

  Returns (offsets (K, ndim) int64, their squared lengths (K,) float64 ascending, reach
  (ndim,) ints). The offsets are every one with |o_k| <= reach_k whose squared length is
  below the bound B = min_k s_k^2 (reach_k + 1)^2: any offset outside that box is at
  least sqrt(B) long, so the first offset (in this order) that meets a source voxel is
  the nearest one whenever its length is below the bound. The reach is about
  `_SHELL_VOXELS` of the finest voxel along each axis.
  """
  radius = _SHELL_VOXELS * float(s.min())
  reach = [max(0, math.ceil(radius / float(v)) - 1) for v in s]
  bound = min(float(v) ** 2 * (r + 1) ** 2 for v, r in zip(s, reach))
  grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"),
                  axis=-1).reshape(-1, len(reach)).astype(np.int64)
  d2 = ((grid.astype(np.float64) * s) ** 2).sum(axis=1)
  # A relative margin keeps rounding of the bound on the safe side (the k-d tree then
  # settles such a target, exactly as well).
  kept = d2 < bound * (1.0 - 1e-9)
  order = np.argsort(d2[kept], kind="stable")
  return grid[kept][order], d2[kept][order], reach


def _slabs(box, pieces):
  """About `pieces` x 2 ranges [lo, hi) that split box[0] (for a thread pool)."""
  lo, hi = box[0].start, box[0].stop
  n = max(1, min(hi - lo, 2 * pieces))
  edges = np.linspace(lo, hi, n + 1).round().astype(int)
  return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _surface_slab(mask, box, lo, hi, joint, strides):
  """(flat indices in the padded joint box of the surface voxels of `mask` in planes
  [lo, hi) of its bounding box `box`, number of object voxels there).

  A surface voxel is one with a face neighbour outside the object; outside `box` there
  are none of the object's voxels, which also makes the array's edge count as outside.
  The erosion works on the object packed 64 voxels to a word along the last axis.
  """
  rest = tuple(box[1:])
  first, last = max(lo - 1, box[0].start), min(hi + 1, box[0].stop)   # with halo planes
  words = _pack_rows(mask[(slice(first, last),) + rest])
  eroded = words.copy()
  for axis in range(words.ndim - 1):   # whole words: neighbours along the other axes
    def at(part):
      index = [slice(None)] * words.ndim
      index[axis] = part
      return tuple(index)
    eroded[at(slice(1, None))] &= words[at(slice(None, -1))]
    eroded[at(slice(None, -1))] &= words[at(slice(1, None))]
    eroded[at(0)] = 0
    eroded[at(-1)] = 0
  # Along the last axis, bit i of a row is voxel i: shift across the row's words.
  after = words >> np.uint64(1)
  after[..., :-1] |= words[..., 1:] << np.uint64(63)
  eroded &= after
  before = words << np.uint64(1)
  before[..., 1:] |= words[..., :-1] >> np.uint64(63)
  eroded &= before
  eroded ^= words                        # the surface: the object less its erosion
  surface = eroded[lo - first:hi - first].reshape(-1)
  hit = np.flatnonzero(surface)
  bits = np.unpackbits(surface[hit].view(np.uint8).reshape(-1, 8), axis=1,
                       bitorder="little")
  word, bit = np.nonzero(bits)
  word = hit[word]
  row, column = np.divmod(word, words.shape[-1])
  coords = list(np.unravel_index(row, (hi - lo,) + words.shape[1:-1]))
  coords.append(column * 64 + bit)
  origin = [lo] + [b.start for b in rest]
  flat = np.zeros(word.size, np.int64)
  for k, c in enumerate(coords):
    flat += (c + (origin[k] - joint[k][0])) * strides[k]
  count = np.count_nonzero(mask[(slice(lo, hi),) + rest])
  return flat, int(count)


def _pack_rows(x):
  """x (boolean, n >= 1 axes) packed along its last axis into little-endian uint64
  words, voxel i of a row at bit i % 64 of word i // 64, zero bits after the row's end."""
  packed = np.packbits(x, axis=-1, bitorder="little")
  width = -(-packed.shape[-1] // 8) * 8
  if width != packed.shape[-1]:
    padded = np.zeros(packed.shape[:-1] + (width,), np.uint8)
    padded[..., :packed.shape[-1]] = packed
    packed = padded
  return packed.view(np.dtype("<u8"))


def _overlap(ref, pred, box, lo, hi):
  """|ref ∩ pred| in planes [lo, hi) of `box`."""
  index = (slice(lo, hi),) + tuple(box[1:])
  return int(np.count_nonzero(np.logical_and(ref[index], pred[index])))


def _directed(targets, sources, code, bit, flat_offsets, offset_d2, shape, s, workers):
  """Squared distances (float64) from each target voxel to the nearest source voxel.

  `targets`, `sources`: flat indices in the padded box; bit `bit` (0 or 1) of `code`
  marks the sources. Shells first: the offsets nearest first, a block at a time, for the
  targets not yet settled, a few thousand targets at a time (so the blocks stay in the
  cache); a target is settled by its first offset meeting a source (exact, see
  `_shell_offsets`). Most surface voxels of a usable segmentation are. The rest (a
  distant island, a gross error) ask a k-d tree of all source voxels in physical
  coordinates, exact as well; its cost grows with their number, not their distance.
  """
  d2 = np.empty(targets.size, np.float64)
  unsettled = []
  for first in range(0, targets.size, _TARGET_CHUNK):
    left = np.arange(first, min(first + _TARGET_CHUNK, targets.size))
    where = targets[left]
    start = 0
    for block in _SHELL_BLOCKS:
      if start >= flat_offsets.size or left.size == 0:
        break
      stop = min(start + block, flat_offsets.size)
      near = np.take(code, where[:, None] + flat_offsets[None, start:stop])
      if bit:
        near >>= bit
      near &= 1
      hit = near.view(bool)             # 0 or 1 bytes: a valid boolean array
      found = hit.any(axis=1)
      if found.any():
        d2[left[found]] = offset_d2[start + np.argmax(hit[found], axis=1)]
        kept = ~found
        left, where = left[kept], where[kept]
      start = stop
    unsettled.append(left)
  left = np.concatenate(unsettled)
  if left.size:
    import scipy.spatial   # here: about 0.3 s to import, and many calls never need it
    points = np.stack(np.unravel_index(sources, shape), axis=-1) * s
    queries = np.stack(np.unravel_index(targets[left], shape), axis=-1) * s
    tree = scipy.spatial.cKDTree(points, leafsize=_LEAF_SIZE, balanced_tree=False,
                                 compact_nodes=False)
    distance, _ = tree.query(queries, workers=workers)
    d2[left] = distance * distance
  return d2


# ----------------------------------------------------------------------- method "jax"


def _jax_distances(ref, pred, box_ref, box_pred, spacing):
  """([|ref|, |pred|, |ref ∩ pred|], float64 squared distances of both surfaces' voxels)
  with the jitted kernel (module docstring, "method jax")."""
  box = tuple(slice(min(r.start, p.start), max(r.stop, p.stop))
              for r, p in zip(box_ref, box_pred))
  packed, spacing3, sizes, planes = _pack(ref[box], pred[box], spacing)
  with jax.enable_x64(True):   # float64 sums; this thread only, this call only
    out = _kernel(jnp.asarray(packed), jnp.asarray(spacing3, jnp.float64),
                  jnp.asarray(sizes, jnp.int32), planes=planes, flat=pred.ndim == 2,
                  window=_FIRST_WINDOW, band=_BAND)
    out = jax.device_get(out)
  volumes, n_surf, at_surface = out
  n_surf = int(n_surf[0]) + int(n_surf[1])
  at_surface = at_surface[:sizes[0], :sizes[1], :sizes[2]]
  d2 = at_surface[at_surface >= 0].astype(np.float64)
  # Voxels on both surfaces hold one value (0) for two distances (both 0).
  d2 = np.concatenate([d2, np.zeros(n_surf - d2.size)])
  return tuple(int(v) for v in volumes), d2


def _bucket(n: int) -> int:
  """The padded length of a box axis (b or c) of `n` voxels.

  32 or 64 up to 64 voxels (small boxes cost little, so coarse steps there save
  compilations), then four steps per octave (80, 96, 112, 128, 160, ...: at most 25 %
  more), so a data set of similar organs compiles a handful of shapes. A length of 1 (a
  2-D input's added axis, or a box one voxel thick) stays 1.
  """
  if n <= 1:
    return 1
  if n <= 64:
    return max(_MIN_BUCKET, 1 << (n - 1).bit_length())
  step = 1 << (n.bit_length() - 3)
  return -(-n // step) * step


def _pack(ref_box: np.ndarray, pred_box: np.ndarray, spacing: tuple[float, ...]):
  """The box as one uint8 array of bucketed shape (N_a + 2, N_b, N_c), axes reordered.

  Passes 2 and 3 cost the window's length in voxels along b and c (up to the axis's
  length), pass 3 mostly only at the target voxels. So axis a (chunked, the exact linear
  pass) is the one a window would be longest along: the finest spacing, then the longest;
  axis c (pass 3, contiguous in memory) the next; axis b the cheapest. 2-D boxes get a
  length-1 axis b. Planes 0 and N_a + 1 are a background halo so that chunk slices need
  no bounds checks.
  """
  axes = [0, 1, 2]
  if ref_box.ndim == 2:
    ref_box, pred_box = ref_box[..., None], pred_box[..., None]
    spacing = spacing + (1.0,)   # any value: all offsets along this axis are 0
    axes = [0, 1]
  sizes = ref_box.shape
  finest = min(spacing[i] for i in axes)
  # Voxels along each axis within a typical search radius (16 of the finest voxels).
  window = {i: min(sizes[i], 16.0 * finest / spacing[i]) for i in axes}
  a, c, b = sorted(range(3), key=lambda i: (i not in axes, -window.get(i, 0), -sizes[i], i))
  order = (a, b, c)
  ref_box, pred_box = ref_box.transpose(order), pred_box.transpose(order)
  n_a, n_b, n_c = ref_box.shape
  shape_b, shape_c = _bucket(n_b), _bucket(n_c)
  # Planes in a chunk: a power of two near _CHUNK_VOXELS voxels, within bounds.
  fit = _CHUNK_VOXELS // (shape_b * shape_c)
  planes = min(_MAX_CHUNK_PLANES, max(_MIN_CHUNK_PLANES, 1 << max(0, fit.bit_length() - 1)))
  # A power of two of chunks (padding along a costs memory only: the loops stop at n_a).
  chunks = 1 << (-(-n_a // planes) - 1).bit_length()
  shape_a = max(chunks * planes, _MIN_BUCKET)
  packed = np.zeros((shape_a + 2, shape_b, shape_c), np.uint8)
  view = packed[1:n_a + 1, :n_b, :n_c]
  view[...] = ref_box
  view |= pred_box.astype(np.uint8) << 1
  return packed, tuple(spacing[i] for i in order), (n_a, n_b, n_c), planes


def _shift(x, axis: int, step: int):
  """x moved by `step` (+1 or -1) along `axis`, filled with False: out[i] = x[i + step]."""
  n = x.shape[axis]
  if step > 0:
    kept = jax.lax.slice_in_dim(x, 1, n, axis=axis)
    pad = [(0, 0, 0)] * x.ndim
    pad[axis] = (0, 1, 0)
  else:
    kept = jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)
    pad = [(0, 0, 0)] * x.ndim
    pad[axis] = (1, 0, 0)
  return jax.lax.pad(kept, jnp.zeros((), x.dtype), pad)


def _chunk_surfaces(packed, start, planes, flat):
  """Surfaces of ref and pred in planes [start, start + planes) of the box.

  Returns the objects and their surfaces, each (2, planes, N_b, N_c) booleans ordered
  [ref, pred] and [S(ref), S(pred)]. `packed` has one halo plane
  each end, so the slice [start, start + planes + 2) holds the neighbours along a. With
  `flat` (a 2-D input), axis b is not an image axis and has no neighbours.
  """
  x = jax.lax.dynamic_slice_in_dim(packed, start, planes + 2, axis=0)
  objects = jnp.stack([(x & _REF) != 0, (x & _PRED) != 0])     # (2, planes + 2, B, C)
  inner = objects[:, :-2] & objects[:, 2:]
  core = objects[:, 1:-1]
  for axis in (3,) if flat else (2, 3):
    inner = inner & _shift(core, axis, 1) & _shift(core, axis, -1)
  return core, core & ~inner


@functools.partial(jax.jit, static_argnames=("planes", "flat", "window", "band"))
def _kernel(packed, spacing, sizes, planes, flat, window=_FIRST_WINDOW, band=_BAND):
  """Volumes and the surface voxels' distances in the packed box (module docstring).

  Args:
    packed: (N_a + 2, N_b, N_c) uint8, bit 0 ref, bit 1 pred, planes 0 and N_a + 1 empty.
    spacing: (3,) float64 voxel sizes along a, b, c.
    sizes: (3,) int32 extent of the box along a, b, c (the rest is padding).
    planes: planes in a chunk along a; N_a is a multiple of it.
    flat: a 2-D input; axis b is an added axis of length 1.
    window: the first window along b and c, in voxels.
    band: planes along b searched again together (N_b is a multiple of it, or it is
      N_b's length).

  Returns:
    [|ref|, |pred|, |ref ∩ pred|] (int64); [|S(pred)|, |S(ref)|] (int64); and (N_a, N_b,
    N_c) float32: at each voxel of S(pred) ∪ S(ref) its squared distance to the other
    surface, -1 elsewhere (a voxel on both surfaces is at 0 from either, so one value a
    voxel stands for both directions).
  """
  shape = packed.shape
  chunks = (shape[0] - 2) // planes
  _, shape_b, shape_c = shape
  n_a, n_b, n_c = sizes[0], sizes[1], sizes[2]
  used = (n_a + planes - 1) // planes
  s2 = (spacing * spacing).astype(jnp.float32)
  far = jnp.int32(_FAR)

  def plane_index(j):
    return (j * planes + jnp.arange(planes, dtype=jnp.int32))[None, :, None, None]

  # Sweep 1, backwards: per chunk j and (source, b, c) line, the first surface plane after
  # the chunk (the running minimum is carried, so no scan temporaries of this size).
  # Stored as int16 where plane indices fit (half the memory), its maximum meaning "none".
  stored = jnp.int16 if shape[0] < np.iinfo(np.int16).max else jnp.int32
  none = np.iinfo(stored).max

  def first_after(i, carry):
    after, first = carry
    j = used - 1 - i
    kept = jnp.where(first == far, none, first).astype(stored)
    after = jax.lax.dynamic_update_index_in_dim(after, kept, j, axis=0)
    _, source = _chunk_surfaces(packed, j * planes, planes, flat)
    first = jnp.minimum(first, jnp.min(jnp.where(source, plane_index(j), far), axis=1))
    return after, first

  after, _ = jax.lax.fori_loop(
      0, used, first_after, (jnp.full((chunks, 2, shape_b, shape_c), none, stored),
                             jnp.full((2, shape_b, shape_c), far, jnp.int32)))

  def static_window(x, axis, radius, s2_axis):
    """min over |t| <= radius (a Python int) of x moved by t along `axis` (inf beyond) +
    s2_axis t^2: unrolled, so XLA fuses it into one pass over x."""
    n = x.shape[axis]
    radius = min(radius, n - 1)
    padding = [(0, 0)] * x.ndim
    padding[axis] = (radius, radius)
    padded = jnp.pad(x, padding, constant_values=jnp.inf)
    out = x
    for t in range(1, radius + 1):
      # Rounding is monotone, so min(u, v) + w is min(u + w, v + w) exactly.
      moved = jnp.minimum(jax.lax.slice_in_dim(padded, radius + t, radius + t + n, axis=axis),
                          jax.lax.slice_in_dim(padded, radius - t, radius - t + n, axis=axis))
      out = jnp.minimum(out, moved + jnp.float32(t * t) * s2_axis)
    return out

  def window_pass(x, axis, radius, s2_axis):
    """min over |t| <= radius of x moved by t along `axis` (inf beyond) + s2_axis t^2."""
    n = x.shape[axis]
    padding = [(0, 0)] * x.ndim
    padding[axis] = (n, n)
    padded = jnp.pad(x, padding, constant_values=jnp.inf)

    def shift(i, out):
      t = i - radius
      moved = jax.lax.dynamic_slice_in_dim(padded, n + t, n, axis=axis)
      t = t.astype(jnp.float32)
      return jnp.minimum(out, moved + t * t * s2_axis)

    return jax.lax.fori_loop(0, 2 * radius + 1, shift, jnp.full_like(x, jnp.inf))

  def window_bound(r_b, r_c):
    """The squared distance below which a search with windows r_b, r_c is exact: every
    source outside the window is at least this far (inf: the window covers the box)."""
    outside_b = jnp.where(r_b < n_b - 1, s2[1] * jnp.asarray((r_b + 1) ** 2, jnp.float32),
                          jnp.inf)
    outside_c = jnp.where(r_c < n_c - 1, s2[2] * jnp.asarray((r_c + 1) ** 2, jnp.float32),
                          jnp.inf)
    # A relative margin well above float32 rounding keeps the test on the safe side.
    return jnp.minimum(outside_b, outside_c) * (1.0 - 1e-6)

  first_bound = window_bound(window, window)
  # Physical radius of the first window, then of the first wider search.
  first_radius = jnp.sqrt(jnp.minimum(jnp.where(n_b > 1, s2[1], jnp.inf), s2[2])) * (
      window + 1) * _RADIUS_GROWTH

  def widening(distances, size):
    """Runs `distances(r_b, r_c) -> (d2, at_target)` with growing windows until exact.

    Passes 2 and 3 look only at offsets up to a radius; the result is then exact for the
    voxels whose distance is within the radius, since every source outside the window is
    at least the radius away. While some target is not, the radius grows, up to the whole
    box (where nothing is outside the window).
    """
    def widen(state):
      radius, _, _ = state
      # In voxels along b and c, no more than the box needs (clamped before the cast).
      r_b = jnp.minimum(jnp.ceil(radius / jnp.sqrt(s2[1])), n_b - 1).astype(jnp.int32)
      r_c = jnp.minimum(jnp.ceil(radius / jnp.sqrt(s2[2])), n_c - 1).astype(jnp.int32)
      d2, at_target = distances(r_b, r_c)
      exact = jnp.all(~at_target | (d2 <= window_bound(r_b, r_c)))
      return radius * _RADIUS_GROWTH, d2, exact

    init = (first_radius, jnp.zeros(size, jnp.float32), jnp.bool_(False))
    _, d2, _ = jax.lax.while_loop(lambda state: ~state[2], widen, init)
    return d2

  band = band if shape_b % band == 0 else shape_b
  band_shape = (2, planes, band, shape_c)

  def refine_bands(f, target, bad_bands, d2, update):
    """Searches again, with growing windows, the bands of `band` planes along b that hold
    a target the first window did not settle; `update(d2, band_d2, first_row)` puts a
    band's exact squared distances into d2. Only those bands pay for long distances."""
    def refine(d2):
      padded = jnp.pad(f, [(0, 0), (0, 0), (shape_b, shape_b), (0, 0)],
                       constant_values=jnp.inf)
      order = jnp.nonzero(bad_bands, size=bad_bands.size, fill_value=0)[0]
      return jax.lax.fori_loop(0, jnp.sum(bad_bands, dtype=jnp.int32),
                               functools.partial(one, padded, order), d2)

    def one(padded, order, i, d2):
      row = order[i] * band
      at_target = jax.lax.dynamic_slice_in_dim(target, row, band, axis=2)

      def distances(r_b, r_c):
        def shift(j, out):
          t = j - r_b
          moved = jax.lax.dynamic_slice_in_dim(padded, shape_b + row + t, band, axis=2)
          t = t.astype(jnp.float32)
          return jnp.minimum(out, moved + t * t * s2[1])

        g = jax.lax.fori_loop(0, 2 * r_b + 1, shift, jnp.full(band_shape, jnp.inf))
        return window_pass(g, 3, r_c, s2[2]), at_target

      return update(d2, widening(distances, band_shape), row)

    return jax.lax.cond(jnp.any(bad_bands), refine, lambda d2: d2, d2)

  def search(f, target):
    """Passes 2 and 3: per direction, the squared distance to the nearest source voxel
    (2, planes, N_b, N_c), exact at the targets."""
    d2 = static_window(static_window(f, 2, window, s2[1]), 3, window, s2[2])
    bad = target & ~(d2 <= first_bound)
    bad_bands = jnp.any(bad.reshape(2, planes, shape_b // band, band, shape_c),
                        axis=(0, 1, 3, 4))
    return refine_bands(f, target, bad_bands, d2,
                        lambda d2, d2_band, row: jax.lax.dynamic_update_slice_in_dim(
                            d2, d2_band, row, axis=2))

  def chunk_step(j, carry):
    last, volumes, count, listed = carry
    objects, source = _chunk_surfaces(packed, j * planes, planes, flat)
    # |ref|, |pred|, |ref ∩ pred|; int32 within a chunk, int64 across chunks.
    volumes = volumes + jnp.stack([jnp.sum(objects[0], dtype=jnp.int32),
                                   jnp.sum(objects[1], dtype=jnp.int32),
                                   jnp.sum(objects[0] & objects[1], dtype=jnp.int32)])
    target = source[::-1]        # distances to S(ref) at S(pred), and the reverse
    index = plane_index(j)
    # Pass 1, along a: the nearest surface plane before/after each voxel on its line.
    before = jnp.maximum(jax.lax.cummax(jnp.where(source, index, -far), axis=1),
                         last[:, None])
    next_chunks = jax.lax.dynamic_index_in_dim(after, j, axis=0, keepdims=False)
    next_chunks = jnp.where(next_chunks == none, far, next_chunks.astype(jnp.int32))
    nxt = jnp.minimum(jax.lax.cummin(jnp.where(source, index, far), axis=1, reverse=True),
                      next_chunks[:, None])
    gap = jnp.minimum(index - before, nxt - index)
    gap = gap.astype(jnp.float32)
    f = jnp.where(gap < _FAR // 2, gap * gap * s2[0], jnp.inf)
    last = jnp.maximum(last, before[:, -1])
    # Passes 2 and 3, along b and c.
    d2 = search(f, target)
    count = count + jnp.sum(target, axis=(1, 2, 3), dtype=jnp.int32)
    d2 = jnp.where(target[0], d2[0], jnp.where(target[1], d2[1], -1.0))
    listed = jax.lax.dynamic_update_slice_in_dim(listed, d2, j * planes, axis=0)
    return last, volumes, count, listed

  init = (jnp.full((2, shape_b, shape_c), -far, jnp.int32), jnp.zeros(3, jnp.int64),
          jnp.zeros(2, jnp.int64), jnp.full((chunks * planes, shape_b, shape_c), -1.0,
                                            jnp.float32))
  _, volumes, count, listed = jax.lax.fori_loop(0, used, chunk_step, init)
  return volumes, count, listed
