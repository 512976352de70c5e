"""A synthetic LiTS-layout data set: CT-like abdominal volumes with liver and tumour labels.

`python -m munet_jax.data.synthetic --out DIR --cases N --size S [--slices Z] [--seed K]`
writes `DIR/volume-i.nii.gz` (int16 HU) and `DIR/segmentation-i.nii.gz` (uint8: 0
background, 1 liver, 2 tumour) for i = 0..N-1, as the LiTS challenge lays them out.

Each case is drawn in world millimetres (RAS) and sampled on its own grid, so anatomy keeps
a plausible physical size whatever the array size:
  air (-1000) around an elliptical body with a subcutaneous fat layer (~-100) and a muscle
  wall (~50); a spine of vertebral bodies and discs with spinal canal and paraspinal
  muscles; ribs as oblique bands; kidneys (cortex enhancing in the portal phase); aorta and
  IVC; spleen (liver-like intensity, unlabelled); stomach with gas; bowel as a mottled
  soft-tissue / fat / gas field; a lobed liver (union of three ellipsoids with a lobulated
  surface and smooth texture) holding bright or dark vessels; a gallbladder (fluid,
  excluded from the liver label); and 0-10 tumours from a few mm to ~7 cm across, mostly
  hypo-dense (20-50 HU below liver), some hyper-dense, some of low contrast, with rims or
  necrotic cores, some at or bulging past the liver's edge.
Plain and portal-venous phases, low-contrast cases (20% by default), Gaussian noise of
10-25 HU (with `voxel_noise`, at a 0.75 x 0.75 x 5 mm voxel and scaled with the voxel volume),
partial-volume edges, in-plane spacing 0.6-0.9 mm scaled by 512 / size, and files stored
in RAS or LPS order with slices running up or down, so readers must use the affine.

Everything comes from `np.random.default_rng([seed, case])`: the same seed writes
byte-identical files, and case i does not depend on how many cases are made.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import tqdm

from munet_jax.data import nifti
from munet_jax.errors import UserError, WriteError
from munet_jax.labels import bounding_box

MIN_SIZE = 16  # below this the anatomy is a few voxels
NOISE_VOXEL_MM3 = 0.75 * 0.75 * 5.0  # the voxel the noise levels are given for (voxel_noise)
LOW_CONTRAST_RATE = 0.2              # share of low-contrast cases (faint tumours, more noise)


@dataclasses.dataclass(frozen=True)
class _Grid:
  """World coordinates (mm, RAS) of the voxel centres of a canonical (x, y, z) array."""
  xs: np.ndarray
  ys: np.ndarray
  zs: np.ndarray
  edge: float  # width of partial-volume edges, mm

  @property
  def shape(self):
    return (self.xs.size, self.ys.size, self.zs.size)

  def box(self, center, extent):
    """Index slices of the voxels within `extent` mm (per axis) of `center`, or None."""
    out = []
    for coords, c, e in zip((self.xs, self.ys, self.zs), center, extent):
      lo, hi = np.searchsorted(coords, [c - e, c + e])
      if lo >= hi:
        return None
      out.append(slice(int(lo), int(hi)))
    return tuple(out)

  def local(self, box):
    """Broadcastable (x, y, z) coordinates of a box: shapes (X,1,1), (1,Y,1), (1,1,Z)."""
    return (self.xs[box[0], None, None], self.ys[None, box[1], None],
            self.zs[None, None, box[2]])


def _rotation(rng, max_degrees=(8.0, 8.0, 25.0)) -> np.ndarray:
  """A random rotation, small about x and y, larger about the body axis z."""
  ax, ay, az = np.deg2rad([rng.uniform(-m, m) for m in max_degrees])
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  return rz @ ry @ rx


def _ellipsoid(grid: _Grid, center, radii, rot=None, margin=1.2):
  """Approximate signed distance (mm, negative inside) to an ellipsoid, within its box.

  Returns (box, d) with d of the box's shape, or (None, None) when it misses the grid.
  The distance is (sqrt(q) - 1) * min(radii): exact on the short axis, an underestimate
  elsewhere, which only sharpens edges a little.
  """
  rot = np.eye(3) if rot is None else rot
  # Half-extent of the rotated ellipsoid along each world axis.
  half = np.sqrt(((rot * np.asarray(radii, float)[None, :]) ** 2).sum(axis=1))
  box = grid.box(center, half * margin + 2 * grid.edge)
  if box is None:
    return None, None
  x, y, z = grid.local(box)
  dx, dy, dz = (x - center[0]).astype(np.float32), (y - center[1]).astype(np.float32), \
      (z - center[2]).astype(np.float32)
  q = 0.0
  for k in range(3):  # coordinates in the ellipsoid's own frame
    u = rot[0, k] * dx + rot[1, k] * dy + rot[2, k] * dz
    q = q + (u / np.float32(radii[k])) ** 2
  return box, (np.sqrt(q) - 1.0) * np.float32(min(radii))


def _alpha(d, width):
  """Partial-volume weight in [0, 1] from a signed distance: 0.5 on the surface."""
  return np.clip(0.5 - d / np.float32(width), 0.0, 1.0)


def _paint(hu, box, alpha, value):
  """Blends `value` (scalar or array) into hu[box] with weight alpha."""
  region = hu[box]
  region += alpha * (value - region)


def _smooth_field(rng, grid: _Grid, box, length: float) -> np.ndarray:
  """A smooth random field of unit standard deviation over `box`, correlation ~length mm.

  Random values on a coarse lattice of `length` mm, interpolated with Gaussian weights
  one axis at a time: cheap at 512 x 512 x 100 where a 3-D filter would not be.
  """
  x, y, z = (c[s] for c, s in zip((grid.xs, grid.ys, grid.zs), box))
  weights = []
  for coords in (x, y, z):
    nodes = np.arange(coords.min() - length, coords.max() + 1.5 * length, length)
    w = np.exp(-0.5 * ((coords[:, None] - nodes[None, :]) / (0.6 * length)) ** 2)
    weights.append((w / w.sum(axis=1, keepdims=True)).astype(np.float32))
  coarse = rng.standard_normal([w.shape[1] for w in weights]).astype(np.float32)
  field = np.tensordot(weights[0], coarse, axes=(1, 0))
  field = np.tensordot(weights[1], field, axes=(1, 1)).transpose(1, 0, 2)
  field = np.tensordot(field, weights[2], axes=(2, 1))
  return field / max(float(field.std()), 1e-6)


def _segment_distance(grid: _Grid, box, a, b):
  """Distance (mm) from each voxel of `box` to the segment a-b."""
  x, y, z = grid.local(box)
  ab = np.asarray(b, np.float32) - np.asarray(a, np.float32)
  px, py, pz = (x - a[0]).astype(np.float32), (y - a[1]).astype(np.float32), \
      (z - a[2]).astype(np.float32)
  t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / np.float32(ab @ ab), 0.0, 1.0)
  return np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)


def _geometry(rng, size: int, slices: int | None):
  """Voxel spacing and the world grid of one case."""
  in_plane = rng.uniform(0.6, 0.9) * 512.0 / size      # mm; field of view 307-461 mm
  extent = rng.uniform(150.0, 240.0)                    # mm of body the scan covers
  if slices is None:
    thickness = rng.uniform(1.0, 5.0)
    slices = max(8, int(round(extent / thickness)))
  else:
    thickness = extent / slices                         # keep the physical coverage
  xs = (np.arange(size) - (size - 1) / 2) * in_plane
  zs = (np.arange(slices) - (slices - 1) / 2) * thickness + rng.uniform(-0.15, 0.15) * extent
  voxel = (in_plane * in_plane * thickness) ** (1 / 3)
  return _Grid(xs=xs, ys=xs.copy(), zs=zs, edge=0.8 * voxel), in_plane, thickness


@dataclasses.dataclass(frozen=True)
class _Body:
  """Where the body is (mm): outline semi-axes, layer thicknesses, the spine's place."""
  cx: float
  cy: float
  a: float            # outline semi-axis, left-right
  b: float            # outline semi-axis, front-back
  fat: float          # subcutaneous fat
  muscle: float       # abdominal wall
  r_vert: float       # vertebral body radius
  vy: float           # vertebral body centre, front-back
  cavity_d: np.ndarray  # signed distance to the abdominal cavity, (X, Y, Z) view

  @property
  def b_cavity(self) -> float:
    return self.b - self.fat - self.muscle


def _ring_distance(grid: _Grid, cx, cy, a, b) -> np.ndarray:
  """Signed mm distance to an elliptic cylinder along z, as a broadcast (X, Y, Z) view."""
  x, y, _ = grid.local((slice(None),) * 3)
  q = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2
  return np.broadcast_to(((np.sqrt(q) - 1.0) * b).astype(np.float32), grid.shape)


def _body(rng, grid: _Grid, hu: np.ndarray, plain: bool) -> _Body:
  """Paints fat, the muscle wall, bowel in the cavity and the scanner table."""
  a = min(rng.uniform(140.0, 175.0), 0.92 * grid.xs[-1])  # fits the field of view
  b = a * rng.uniform(0.68, 0.80)
  cx, cy = rng.uniform(-8, 8), rng.uniform(-12, 8)
  fat, muscle = rng.uniform(8.0, 35.0), rng.uniform(8.0, 15.0)
  full = (slice(None),) * 3
  _paint(hu, full, _alpha(_ring_distance(grid, cx, cy, a, b), grid.edge),
         rng.uniform(-110, -85))
  _paint(hu, full, _alpha(_ring_distance(grid, cx, cy, a - fat, b - fat), grid.edge),
         rng.uniform(40, 60))
  cavity_d = _ring_distance(grid, cx, cy, a - fat - muscle, b - fat - muscle)
  # Bowel and mesentery: soft tissue blending into fat, with gas pockets.
  field = _smooth_field(rng, grid, full, length=14.0)
  soft = rng.uniform(30, 45) + (0.0 if plain else 60.0 * rng.uniform(0, 1))
  content = -95.0 + (soft + 95.0) / (1.0 + np.exp(-6.0 * (field - 0.2)))
  content = np.where(field < -1.6, np.float32(-900.0), content).astype(np.float32)
  _paint(hu, full, _alpha(cavity_d, grid.edge), content)
  table_y = cy - b * 1.1 - 15.0
  hu[:, (grid.ys > table_y - 8) & (grid.ys < table_y), :] = -300.0
  r_vert = rng.uniform(16.0, 22.0)
  return _Body(cx=cx, cy=cy, a=a, b=b, fat=fat, muscle=muscle, r_vert=r_vert,
               vy=cy - b + fat + 45.0 + r_vert, cavity_d=cavity_d)


def _cylinder(grid, hu, center_xy, radii_xy, value):
  """Paints an elliptic cylinder along z; returns (box, d) or (None, None)."""
  box, d = _ellipsoid(grid, (*center_xy, 0.0), (*radii_xy, 1e4))
  if box is not None:
    _paint(hu, box, _alpha(d, grid.edge), value)
  return box, d


def _spine_and_ribs(rng, grid: _Grid, hu: np.ndarray, body: _Body) -> None:
  """Vertebral bodies and discs, canal, posterior arch, paraspinal muscles, ribs."""
  cx, vy, r = body.cx, body.vy, body.r_vert
  for side in (-1, 1):
    _cylinder(grid, hu, (cx + side * 32, vy - r - 22), (24, 22), rng.uniform(45, 60))
  x, y, z = grid.local((slice(None),) * 3)
  pitch = rng.uniform(28.0, 34.0)
  in_bone = np.mod(z - rng.uniform(0, pitch), pitch) < pitch - 7.0  # else a disc
  marrow = np.broadcast_to(np.where(in_bone, np.float32(rng.uniform(250, 400)),
                                    np.float32(90.0)), grid.shape)
  cortex = np.broadcast_to(np.where(in_bone, np.float32(rng.uniform(600, 900)),
                                    np.float32(90.0)), grid.shape)
  box, d = _ellipsoid(grid, (cx, vy, 0.0), (r, r * 0.85, 1e4))
  if box is not None:
    _paint(hu, box, _alpha(d, grid.edge), marrow[box])
    _paint(hu, box, _alpha(np.abs(d + 1.5) - 1.5, grid.edge), cortex[box])
  canal_y = vy - r - 9.0
  _cylinder(grid, hu, (cx, canal_y - 4), (13, 11), rng.uniform(400, 700))   # arch
  _cylinder(grid, hu, (cx, canal_y), (7.5, 7.0), rng.uniform(5, 20))        # canal
  spinous = (np.abs(x - cx) < 4.0) & (y < canal_y - 8) & (y > body.cy - body.b + body.fat + 6)
  hu[np.broadcast_to(spinous, grid.shape)] = rng.uniform(400, 700)
  # Ribs: oblique bands in the muscle wall, running down towards the front; none at the
  # front midline (costal cartilage) or the back midline (spine).
  mid = body.fat + 0.5 * body.muscle
  rib_d = np.abs(_ring_distance(grid, body.cx, body.cy, body.a - mid, body.b - mid))
  theta = np.arctan2(y - body.cy, x - body.cx)
  rib_pitch = rng.uniform(35.0, 45.0)
  along = np.mod(z + 70.0 * np.sin(theta) + rng.uniform(0, rib_pitch), rib_pitch)
  hu[(rib_d < 4.5) & (along < 9.0) & (np.abs(np.sin(theta)) < 0.85)] = rng.uniform(350, 700)


def _vessels_and_kidneys(rng, grid: _Grid, hu: np.ndarray, body: _Body,
                         plain: bool) -> np.ndarray:
  """Aorta, IVC and kidneys; returns the (X, Y, Z) mask where the liver may not go."""
  cx, vy, r = body.cx, body.vy, body.r_vert
  keep_out = np.zeros(grid.shape, bool)
  aorta_hu = rng.uniform(40, 50) if plain else rng.uniform(140, 200)
  ivc_hu = rng.uniform(35, 45) if plain else rng.uniform(100, 150)
  for center, radii, value in (((cx - 15, vy + r + 13), (11, 11), aorta_hu),
                               ((cx + 24, vy + r + 12), (15, 10), ivc_hu)):
    box, d = _cylinder(grid, hu, center, (radii[0] * rng.uniform(0.85, 1.15), radii[1]), value)
    if box is not None:
      keep_out[box] |= d < 2.0
  box, d = _ellipsoid(grid, (cx, vy - 8, 0.0), (r + 14, r + 24, 1e4))
  if box is not None:
    keep_out[box] |= d < 0
  for side in (-1, 1):
    center = (cx + side * rng.uniform(55, 70), vy + rng.uniform(-5, 10), rng.uniform(-75, -40))
    radii = (rng.uniform(22, 28), rng.uniform(25, 32), rng.uniform(45, 55))
    box, d = _ellipsoid(grid, center, radii, _rotation(rng, (8, 8, 25)))
    if box is None:
      continue
    d = np.maximum(d, body.cavity_d[box])
    if plain:
      _paint(hu, box, _alpha(d, grid.edge), rng.uniform(28, 40))
    else:
      _paint(hu, box, _alpha(d, grid.edge), rng.uniform(150, 190))         # cortex
      _paint(hu, box, _alpha(d + 9.0, grid.edge), rng.uniform(90, 130))    # medulla
    keep_out[box] |= d < 1.0
  return keep_out


def _liver_shape(rng, grid: _Grid, body: _Body, keep_out: np.ndarray):
  """Signed distance (mm) to the liver: right lobe, left lobe, caudate, lobulated.

  Returns (liver_d of shape (X, Y, Z), its bounding box, the hilum point in mm).
  """
  cx, cy = body.cx, body.cy
  caudate = (cx + rng.uniform(10, 25), body.vy + body.r_vert + rng.uniform(25, 40),
             rng.uniform(0, 20))
  lobes = [
      ((cx + rng.uniform(55, 75), cy + rng.uniform(-15, 10), rng.uniform(-5, 15)),
       (rng.uniform(60, 75), rng.uniform(60, 80), rng.uniform(60, 80))),
      ((cx + rng.uniform(-25, 0), cy + body.b_cavity * rng.uniform(0.25, 0.45),
        rng.uniform(10, 35)),
       (rng.uniform(40, 60), rng.uniform(25, 40), rng.uniform(30, 45))),
      (caudate, (rng.uniform(25, 35), rng.uniform(20, 30), rng.uniform(40, 55))),
  ]
  liver_d = np.full(grid.shape, np.inf, np.float32)
  for center, radii in lobes:
    box, d = _ellipsoid(grid, center, radii, _rotation(rng))
    if box is not None:
      np.minimum(liver_d[box], d, out=liver_d[box])
  finite = np.isfinite(liver_d)
  box = bounding_box(finite) or tuple(slice(None) for _ in range(finite.ndim))
  liver_d[box] += 9.0 * _smooth_field(rng, grid, box, length=30.0)  # lobulated surface
  liver_d = np.maximum(liver_d, body.cavity_d + 3.0)                 # inside the wall
  liver_d[keep_out] = np.inf
  hilum = np.array(caudate) + (rng.uniform(5, 15), rng.uniform(5, 15), rng.uniform(-20, -5))
  return liver_d, box, hilum


def _spleen_and_stomach(rng, grid: _Grid, hu: np.ndarray, body: _Body, liver_hu: float):
  """Spleen (liver-like, unlabelled) and a stomach with a gas level, on the left."""
  cx = body.cx
  box, d = _ellipsoid(grid, (cx - rng.uniform(70, 90), body.vy + rng.uniform(10, 35),
                             rng.uniform(10, 40)),
                      (rng.uniform(20, 30), rng.uniform(40, 55), rng.uniform(40, 55)),
                      _rotation(rng, (8, 8, 35)))
  if box is not None:
    d = np.maximum(d, body.cavity_d[box] + 2.0)
    _paint(hu, box, _alpha(d, grid.edge), liver_hu + rng.uniform(-8, 15))
  center = (cx - rng.uniform(35, 55), body.cy + body.b_cavity * rng.uniform(0.05, 0.3),
            rng.uniform(20, 50))
  radii = (rng.uniform(35, 50), rng.uniform(30, 40), rng.uniform(30, 45))
  box, d = _ellipsoid(grid, center, radii, _rotation(rng))
  if box is not None:
    d = np.maximum(d, body.cavity_d[box] + 2.0)
    _, y, _ = grid.local(box)
    gas_level = center[1] + radii[1] * rng.uniform(-0.1, 0.6)  # supine: gas at the front
    lumen = np.where(y > gas_level, np.float32(-950.0), np.float32(rng.uniform(5, 30)))
    _paint(hu, box, _alpha(d, grid.edge), rng.uniform(40, 55))            # wall
    _paint(hu, box, _alpha(d + 4.0, grid.edge), np.broadcast_to(lumen, d.shape))


def _paint_liver(rng, grid: _Grid, hu, liver_d, box, hilum, liver_hu: float, plain: bool):
  """Liver parenchyma with smooth texture, and vessels branching from the hilum."""
  texture = np.float32(rng.uniform(3, 8)) * _smooth_field(rng, grid, box, length=15.0)
  _paint(hu, box, _alpha(liver_d[box], grid.edge), liver_hu + texture)
  liver = liver_d < 0
  inside = np.flatnonzero(liver)
  if not inside.size:
    return
  vessel_hu = liver_hu + (rng.uniform(-20, -8) if plain else rng.uniform(40, 80))
  for _ in range(rng.integers(3, 6)):
    tip = _world(grid, rng.choice(inside))
    for start, end, radius in ((hilum, tip, rng.uniform(3.0, 6.0)),
                               (tip, tip + rng.normal(0, 25, 3), rng.uniform(1.5, 3.0))):
      vbox = grid.box((start + end) / 2, np.abs(end - start) / 2 + radius + 2 * grid.edge)
      if vbox is not None:
        d = _segment_distance(grid, vbox, start, end) - np.float32(radius)
        _paint(hu, vbox, _alpha(d, grid.edge) * liver[vbox], vessel_hu)


def _world(grid: _Grid, flat_index) -> np.ndarray:
  """World position (mm) of a voxel given by its flat index."""
  i, j, k = np.unravel_index(flat_index, grid.shape)
  return np.array([grid.xs[i], grid.ys[j], grid.zs[k]])


def _tumours(rng, grid: _Grid, hu, liver, liver_d, liver_hu: float, in_plane: float,
             low_contrast: bool, rate: float = 2.5) -> np.ndarray:
  """Paints tumours; returns their (X, Y, Z) mask. May grow `liver` in place.

  15% of cases have none; the others 1 + Poisson(`rate`), at most 4 `rate` (0-10 for the
  default rate 2.5).

  Radii are log-uniform from max(2.5 mm, 0.8 voxel) up to 8 mm (half of them) or 35 mm;
  70% hypo-dense (20-50 HU below liver), 15% hyper-dense, 15% faint (8-18 HU); large
  ones may have an enhancing rim or a necrotic core; 30% sit at the liver's edge and
  half of those bulge past it.
  """
  tumour = np.zeros(grid.shape, bool)
  inner = np.flatnonzero(liver & (liver_d < -10.0))
  edge = np.flatnonzero(liver & (liver_d > -6.0))
  count = 0 if rng.uniform() < 0.15 else min(int(round(4 * rate)), 1 + rng.poisson(rate))
  if not (inner.size or edge.size):
    return tumour
  for _ in range(count):
    at_edge = bool(edge.size) and rng.uniform() < 0.3
    center = _world(grid, rng.choice(edge if at_edge or not inner.size else inner))
    r_min = max(2.5, 0.8 * in_plane)
    r_max = max(1.2 * r_min, 8.0 if rng.uniform() < 0.5 else 35.0)
    radius = float(np.exp(rng.uniform(np.log(r_min), np.log(r_max))))
    radii = radius * rng.uniform(0.75, 1.25, 3)
    box, d = _ellipsoid(grid, center, radii, _rotation(rng, (30, 30, 90)))
    if box is None:
      continue
    kind = rng.uniform()
    if kind < 0.7:
      delta = -rng.uniform(20, 50)
    elif kind < 0.85:
      delta = rng.uniform(20, 50)
    else:
      delta = rng.choice([-1, 1]) * rng.uniform(8, 18)
    if low_contrast:
      delta *= 0.4
    fuzzy = grid.edge * rng.uniform(1.0, 3.0)  # some margins are ill-defined
    value = np.float32(liver_hu + delta) + np.float32(rng.uniform(2, 6)) * \
        _smooth_field(rng, grid, box, length=max(4.0, radius / 2))
    if delta < 0 and radius > 10 and rng.uniform() < 0.5:
      value = value + np.float32(25.0) * _alpha(np.abs(d + 2.0) - 2.0, grid.edge)  # rim
    if radius > 20 and rng.uniform() < 0.5:
      value = value - np.float32(20.0) * _alpha(d + 0.5 * min(radii), 2 * fuzzy)   # necrosis
    inside = d < 0
    if at_edge and rng.uniform() < 0.5:  # bulges past the liver outline, which follows it
      liver[box] |= inside
      weight = _alpha(d, fuzzy)
    else:
      inside &= liver[box]
      weight = _alpha(d, fuzzy) * _alpha(liver_d[box], grid.edge)
    _paint(hu, box, weight, value)
    tumour[box] |= inside
  return tumour


def _gallbladder(rng, grid: _Grid, hu, body: _Body, liver, tumour) -> None:
  """Fluid under the liver (80% of cases), cut out of the liver label."""
  box, d = _ellipsoid(grid, (body.cx + rng.uniform(20, 40),
                             body.cy + body.b_cavity * rng.uniform(0.1, 0.3),
                             rng.uniform(-45, -25)),
                      (rng.uniform(12, 18), rng.uniform(15, 25), rng.uniform(25, 35)),
                      _rotation(rng))
  if box is None or rng.uniform() >= 0.8:
    return
  d = np.maximum(d, body.cavity_d[box] + 2.0)
  outside_tumour = ~tumour[box]
  _paint(hu, box, _alpha(d, grid.edge) * outside_tumour, rng.uniform(0, 20))
  liver[box] &= ~((d < 0) & outside_tumour)


def _store_orientation(rng, hu, labels, affine, shape):
  """Half the cases stored LPS (as DICOM converters write), a quarter with slices downwards."""
  lps = rng.uniform() < 0.5
  flips = (lps, lps, bool(rng.uniform() < 0.25))
  affine = affine.copy()
  for axis, flip in enumerate(flips):
    if flip:
      hu, labels = np.flip(hu, axis), np.flip(labels, axis)
      affine[:3, 3] += affine[:3, axis] * (shape[axis] - 1)
      affine[:3, axis] *= -1
  return np.ascontiguousarray(hu), np.ascontiguousarray(labels), affine


def _liver_window(liver: np.ndarray, crop: int) -> tuple[int, int]:
  """In-plane start (x, y) of a crop x crop window centred on the liver's bounding box."""
  starts = []
  for axis in (0, 1):
    extent = np.flatnonzero(liver.any(axis=tuple(a for a in range(3) if a != axis)))
    centre = (extent[0] + extent[-1]) // 2 if extent.size else liver.shape[axis] // 2
    starts.append(int(np.clip(centre - crop // 2, 0, liver.shape[axis] - crop)))
  return starts[0], starts[1]


def make_case(rng: np.random.Generator, size: int, slices: int | None = None, *,
              crop: int = 0, tumour_rate: float = 2.5, voxel_noise: bool = False,
              low_contrast_rate: float = LOW_CONTRAST_RATE):
  """Draws one synthetic abdominal CT with its liver / tumour labels.

  Args:
    rng: the only source of randomness.
    size: in-plane array size (voxels per side, >= 16). In-plane spacing is 0.6-0.9 mm
      times 512 / size, so a 64 x 64 case covers the same body as a 512 x 512 one.
    slices: number of slices; then the slice thickness is the scanned length
      (150-240 mm) / slices. None draws a thickness of 1-5 mm and derives the count.
    crop: 0, or an in-plane size < size: the case is drawn at `size` and only a crop x crop
      window centred on the liver's bounding box is kept (a liver region of interest, at
      the spacing of `size`); the affine moves with it.
    tumour_rate: lesions per case with tumour are 1 + Poisson(tumour_rate), at most
      4 tumour_rate (the default 2.5 gives 1-10).
    voxel_noise: False draws the noise's standard deviation (10-20 HU, 15-25 in
      low-contrast cases) whatever the voxel size. True gives those levels to a
      0.75 x 0.75 x 5 mm voxel and scales them by sqrt(that volume / the voxel's volume),
      as a scanner's quantum noise averages down over a larger voxel: a case drawn on a
      coarse grid then has the noise of a real scan resampled to that grid rather than
      that of a thin-slice, fine-pixel one. The random draws are the same either way.
    low_contrast_rate: the share of low-contrast cases (tumours at 0.4 of their contrast,
      noise of 15-25 HU instead of 10-20). Each case draws whether it is one whatever the
      rate, so a case differs between two rates only in that flag and what follows
      from it.

  Returns:
    hu: (S, S, Z) int16 Hounsfield units, in file order; S = crop or size.
    labels: (S, S, Z) uint8, 0 background, 1 liver, 2 tumour (only inside liver).
    affine: (4, 4) float64 voxel -> world (RAS, mm); RAS or LPS order, slices up or down.
  """
  if size < MIN_SIZE:
    raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
  if crop and not MIN_SIZE <= crop <= size:
    raise ValueError(f"crop must be 0 or in [{MIN_SIZE}, size={size}], got {crop}")
  if not 0 < tumour_rate < 100:
    raise ValueError(f"tumour_rate must be in (0, 100), got {tumour_rate}")
  if not 0 <= low_contrast_rate <= 1:
    raise ValueError(f"low_contrast_rate must be in [0, 1], got {low_contrast_rate}")
  grid, in_plane, thickness = _geometry(rng, size, slices)
  plain = rng.uniform() < 0.25          # no contrast agent
  low_contrast = rng.uniform() < low_contrast_rate    # faint tumours, more noise
  liver_hu = rng.uniform(50, 65) if plain else rng.uniform(80, 105)

  # Painted back to front: each structure overwrites what lies under it.
  hu = np.full(grid.shape, -1000.0, np.float32)
  body = _body(rng, grid, hu, plain)
  _spine_and_ribs(rng, grid, hu, body)
  keep_out = _vessels_and_kidneys(rng, grid, hu, body, plain)
  liver_d, liver_box, hilum = _liver_shape(rng, grid, body, keep_out)
  _spleen_and_stomach(rng, grid, hu, body, liver_hu)
  _paint_liver(rng, grid, hu, liver_d, liver_box, hilum, liver_hu, plain)
  liver = liver_d < 0
  tumour = _tumours(rng, grid, hu, liver, liver_d, liver_hu, in_plane, low_contrast,
                    tumour_rate)
  _gallbladder(rng, grid, hu, body, liver, tumour)

  sigma = rng.uniform(15, 25) if low_contrast else rng.uniform(10, 20)
  if voxel_noise:
    sigma *= np.sqrt(NOISE_VOXEL_MM3 / (in_plane * in_plane * thickness))
  hu += np.float32(sigma) * rng.standard_normal(grid.shape, dtype=np.float32)
  hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
  labels = liver.astype(np.uint8)
  labels[tumour & liver] = 2

  affine = np.diag([in_plane, in_plane, thickness, 1.0])
  x0 = y0 = 0
  if crop and crop < size:
    x0, y0 = _liver_window(labels > 0, crop)
    hu = np.ascontiguousarray(hu[x0:x0 + crop, y0:y0 + crop])
    labels = np.ascontiguousarray(labels[x0:x0 + crop, y0:y0 + crop])
  affine[:3, 3] = grid.xs[x0], grid.ys[y0], grid.zs[0]
  return _store_orientation(rng, hu, labels, affine, hu.shape)


def write_dataset(out, cases: int, size: int, seed: int = 0, slices: int | None = None,
                  progress: bool = True, crop: int = 0, tumour_rate: float = 2.5,
                  voxel_noise: bool = False, low_contrast_rate: float = LOW_CONTRAST_RATE
                  ) -> list[tuple[str, str]]:
  """Writes `cases` synthetic cases to `out` in the LiTS layout.

  Args:
    out: folder, created if missing; existing files of the same names are replaced.
    cases: number of cases (patients), named volume-0 .. volume-{cases-1}.
    size: in-plane array size (>= 16).
    seed: case i is drawn from `np.random.default_rng([seed, i])`.
    slices: slices per volume, None for 1-5 mm slices (see `make_case`).
    progress: show a tqdm bar over cases.
    crop, tumour_rate, voxel_noise, low_contrast_rate: see `make_case` (a liver-region
      crop; lesions per case; noise scaled with the voxel volume; share of low-contrast
      cases).

  Returns:
    (image path, label path) per case. Also writes `out/synthetic.json` with the settings.
  """
  if cases < 1:
    raise UserError(f"--cases must be >= 1, got {cases}")
  if size < MIN_SIZE:
    raise UserError(f"--size must be >= {MIN_SIZE}, got {size}")
  if slices is not None and slices < 1:
    raise UserError(f"--slices must be >= 1, got {slices}")
  if crop and not MIN_SIZE <= crop <= size:
    raise UserError(f"--crop must be 0 or in [{MIN_SIZE}, {size}] (the size), got {crop}")
  if not 0 < tumour_rate < 100:
    raise UserError(f"--tumour-rate must be in (0, 100), got {tumour_rate}")
  if not 0 <= low_contrast_rate <= 1:
    raise UserError(f"--low-contrast-rate must be in [0, 1], got {low_contrast_rate}")
  out = os.fspath(out)
  paths = []
  for i in tqdm.trange(cases, desc="synthetic CT", unit="case", disable=not progress):
    hu, labels, affine = make_case(np.random.default_rng([seed, i]), size, slices, crop=crop,
                                   tumour_rate=tumour_rate, voxel_noise=voxel_noise,
                                   low_contrast_rate=low_contrast_rate)
    image_path = os.path.join(out, f"volume-{i}.nii.gz")
    label_path = os.path.join(out, f"segmentation-{i}.nii.gz")
    nifti.write_image(image_path, hu, affine)
    nifti.write_image(label_path, labels, affine)
    paths.append((image_path, label_path))
  settings = {"generator": "munet_jax.data.synthetic", "cases": cases, "size": size,
              "slices": slices, "seed": seed, "crop": crop, "tumour_rate": tumour_rate,
              "voxel_noise": voxel_noise, "low_contrast_rate": low_contrast_rate}
  tmp = os.path.join(out, ".synthetic.json.tmp")
  with open(tmp, "w") as f:
    json.dump(settings, f, indent=2)
  os.replace(tmp, os.path.join(out, "synthetic.json"))
  return paths


def write_dataset_into_place(out, cases: int, size: int, seed: int = 0,
                             slices: int | None = None, progress: bool = True,
                             crop: int = 0, tumour_rate: float = 2.5,
                             voxel_noise: bool = False,
                             low_contrast_rate: float = LOW_CONTRAST_RATE
                             ) -> list[tuple[str, str]]:
  """`write_dataset` into a temporary folder beside `out`, renamed onto `out` when whole.

  What `train.py` uses when `data.root` holds no cases: a run killed half-way through
  leaves no `out` holding some of the cases, which a restart would take for the whole
  data set (and then train on other data than an uninterrupted run, or stop for want of
  cases). `out` should be missing or empty; when it holds other files, the cases are
  moved into it one by one, `synthetic.json` last.
  """
  out = os.path.abspath(os.fspath(out))
  parent, name = os.path.split(out)
  tmp = os.path.join(parent, f".{name}.synthetic-tmp")
  shutil.rmtree(tmp, ignore_errors=True)   # left by a run killed while writing it
  try:
    paths = write_dataset(tmp, cases, size, seed=seed, slices=slices, progress=progress,
                          crop=crop, tumour_rate=tumour_rate, voxel_noise=voxel_noise,
                          low_contrast_rate=low_contrast_rate)
  except (OSError, WriteError) as e:
    shutil.rmtree(tmp, ignore_errors=True)
    cause = e.__cause__ if isinstance(e, WriteError) else e
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(e)
    raise WriteError(f"{out}: cannot write the synthetic data set ({reason})") from e
  try:
    if os.path.isdir(out) and not os.listdir(out):
      os.rmdir(out)
    if not os.path.exists(out):
      os.rename(tmp, out)
    else:
      names = sorted(os.listdir(tmp), key=lambda n: n == "synthetic.json")
      for entry in names:
        os.replace(os.path.join(tmp, entry), os.path.join(out, entry))
      os.rmdir(tmp)
  except OSError as e:
    raise WriteError(f"{out}: cannot write the synthetic data set ({e.strerror or e})") from e
  return [(os.path.join(out, os.path.basename(i)), os.path.join(out, os.path.basename(l)))
          for i, l in paths]


if __name__ == "__main__":   # the `munet-synthetic` tool (munet_jax.cli.synthetic); the library never imports it
  import runpy
  runpy.run_module("munet_jax.cli.synthetic", run_name="__main__")
