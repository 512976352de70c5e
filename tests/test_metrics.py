"""munet_jax.metrics.segmentation_metrics: SPEC.md's definitions, medpy 0.5.2 agreement.

Most checks run many small cases per test (all within a few compiled shapes): every case
is compared with medpy (dc, 1 - jc, ravd, assd, hd; connectivity 1, voxel spacing) and
with an independent surface-distance computation from scipy (which also gives RMSD).
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from conftest import REAL_CT as REAL, needs_real_ct as needs_real
from munet_jax import metrics
from munet_jax.errors import UserError
from munet_jax.metrics import segmentation_metrics

KEYS = ("dsc", "voe", "rvd", "assd", "mssd", "rmsd", "hd95", "nsd")
SHAPES_2D = ((24, 32), (32, 20), (13, 29))
SHAPES_3D = ((16, 16, 16), (20, 12, 28), (30, 9, 14), (8, 24, 10))


# ------------------------------------------------------------------------ references


def medpy_metrics(pred, ref, spacing):
  return dict(dsc=medpy_binary.dc(pred, ref), voe=1.0 - medpy_binary.jc(pred, ref),
              rvd=medpy_binary.ravd(pred, ref),
              assd=medpy_binary.assd(pred, ref, voxelspacing=spacing, connectivity=1),
              mssd=medpy_binary.hd(pred, ref, voxelspacing=spacing, connectivity=1),
              hd95=medpy_binary.hd95(pred, ref, voxelspacing=spacing, connectivity=1))


def scipy_distances(pred, ref, spacing):
  """ASSD, MSSD, RMSD, HD95 and the pooled distances from the definitions, with scipy:
  surfaces by erosion with the face (cross) neighbourhood and the array's edge as
  background, exact float64 EDT."""
  cross = ndimage.generate_binary_structure(pred.ndim, 1)
  def surface(x):
    return x & ~ndimage.binary_erosion(x, structure=cross, border_value=0)
  s_pred, s_ref = surface(pred), surface(ref)
  d = np.concatenate([ndimage.distance_transform_edt(~s_ref, sampling=spacing)[s_pred],
                      ndimage.distance_transform_edt(~s_pred, sampling=spacing)[s_ref]])
  return dict(assd=d.mean(), mssd=d.max(), rmsd=math.sqrt(np.mean(d * d)),
              hd95=np.percentile(d, 95), distances=d)


def reference_nsd(d, tolerance):
  """The normalised surface Dice from the pooled distances of both directions."""
  return np.count_nonzero(d <= tolerance) / d.size


def separated_tolerance(d):
  """A tolerance near the median distance, halfway across the widest relative gap
  between neighbouring distinct distances there: every distance is then at least half
  that gap (far more than float32 rounding) from it, so the count has no ties."""
  values = np.unique(d)
  if values.size < 2:
    return float(values[0]) + 1.0
  lo, hi = values.size // 4, max(values.size // 4 + 1, 3 * values.size // 4)
  gaps = (values[lo + 1:hi + 1] - values[lo:hi]) / values[lo + 1:hi + 1]
  i = lo + int(np.argmax(gaps))
  return float(values[i] + values[i + 1]) / 2


def assert_agrees(pred, ref, spacing, label, method="host"):
  ref_d = scipy_distances(pred, ref, spacing)
  tolerance = separated_tolerance(ref_d["distances"])
  ours = segmentation_metrics(pred, ref, spacing, nsd_tolerance=tolerance, method=method)
  want = medpy_metrics(pred, ref, spacing)
  # Distances agree with float64 to 1e-6 relative (float64 throughout with "host",
  # float32 squares with "jax": see metrics.py), and so do their means, maxima and percentiles (interpolations between two of them).
  for key, value in list(want.items()) + [("rmsd", ref_d["rmsd"])]:
    assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-12), (label, key, ours, value)
  for key in ("assd", "mssd", "hd95"):
    assert ours[key] == pytest.approx(ref_d[key], rel=1e-6, abs=1e-12), (label, key)
  # No distance is within rounding of the tolerance: the count must be exact.
  assert ours["nsd"] == reference_nsd(ref_d["distances"], tolerance), (label, tolerance)


# ----------------------------------------------------------------------- case makers


def random_spacing(rng, ndim):
  kind = rng.integers(3)
  if kind == 0:
    return (1.0,) * ndim
  if kind == 1:
    return (float(rng.uniform(0.3, 3.0)),) * ndim
  return tuple(float(s) for s in np.exp(rng.uniform(np.log(0.2), np.log(5.0), ndim)))


def random_shape(rng):
  shapes = SHAPES_2D + SHAPES_3D
  return shapes[rng.integers(len(shapes))]


def blob(rng, shape, fill=None, sigma=None):
  field = ndimage.gaussian_filter(rng.standard_normal(shape),
                                  sigma if sigma is not None else rng.uniform(1.0, 3.0))
  return field > np.quantile(field, 1.0 - (fill if fill is not None else rng.uniform(0.1, 0.6)))


def ball(shape, centre, radius, spacing=None):
  spacing = spacing or (1.0,) * len(shape)
  grid = np.indices(shape, dtype=float)
  r2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing))
  return r2 <= radius ** 2


def nonempty(rng, mask):
  if not mask.any():
    mask[tuple(rng.integers(n) for n in mask.shape)] = True
  return mask


def case_blobs(rng):
  shape = random_shape(rng)
  ref = blob(rng, shape)
  if rng.random() < 0.5:
    pred = blob(rng, shape)                  # unrelated
  else:                                      # a noisy version of ref
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
    pred = np.where(np.abs(noise) > 0.25, ref, ~ref)
  return nonempty(rng, pred), nonempty(rng, ref)


def case_components(rng):
  shape = random_shape(rng)
  masks = []
  for _ in range(2):
    m = np.zeros(shape, bool)
    for _ in range(rng.integers(2, 6)):
      lo = [rng.integers(n) for n in shape]
      hi = [min(n, l + rng.integers(1, 6)) for l, n in zip(lo, shape)]
      m[tuple(slice(l, h) for l, h in zip(lo, hi))] = True
    masks.append(m)
  return masks[0], masks[1]


def case_edges(rng):
  """Objects on the array's edge: slabs along a face, corners, the whole array."""
  shape = random_shape(rng)
  kind = rng.integers(4)
  ref = blob(rng, shape, fill=0.4)
  axis, side = rng.integers(len(shape)), rng.integers(2)
  slab = [slice(None)] * len(shape)
  slab[axis] = slice(0, 3) if side == 0 else slice(-3, None)
  if kind == 0:
    ref[tuple(slab)] = True
    pred = blob(rng, shape, fill=0.4)
  elif kind == 1:                          # everything, against an object in a corner
    ref = np.ones(shape, bool)
    pred = np.zeros(shape, bool)
    pred[tuple(slice(0, rng.integers(1, n + 1)) for n in shape)] = True
  elif kind == 2:                          # the same slab, one of them thicker
    pred = np.zeros(shape, bool)
    pred[tuple(slab)] = True
    ref = pred.copy()
    grow = list(slab)
    grow[axis] = slice(0, 5) if side == 0 else slice(-5, None)
    ref[tuple(grow)] = True
  else:                                    # both fill the array but for a hole
    ref = np.ones(shape, bool)
    pred = np.ones(shape, bool)
    pred[tuple(rng.integers(n) for n in shape)] = False
  return nonempty(rng, pred), nonempty(rng, ref)


def case_thin(rng):
  """One-voxel-thin lines and plates, single voxels."""
  shape = random_shape(rng)
  def thin():
    m = np.zeros(shape, bool)
    kind = rng.integers(4)
    index = [rng.integers(n) for n in shape]
    if kind == 0:                          # a line along one axis
      axis = rng.integers(len(shape))
      index[axis] = slice(None)
      m[tuple(index)] = True
    elif kind == 1 and len(shape) == 3:    # a plate one voxel thick
      axis = rng.integers(3)
      m[(slice(None),) * axis + (index[axis],)] = True
    elif kind == 2:                        # a diagonal line (face neighbours apart)
      n = min(shape)
      start = rng.integers(0, n)
      for t in range(n - start):
        m[tuple(start + t for _ in shape)] = True
    else:                                  # a single voxel
      m[tuple(index)] = True
    return m
  return thin(), thin()


def case_nested(rng):
  """A shell with an object in its hole, against a similar nest or a part of one."""
  shape = SHAPES_3D[0] if rng.random() < 0.6 else SHAPES_2D[0]
  def nest(jitter):
    centre = [n / 2 - 0.5 + rng.uniform(-jitter, jitter) for n in shape]
    outer = rng.uniform(5.5, 7.5)
    hole = outer - rng.uniform(1.0, 2.5)
    inner = rng.uniform(0.5, hole - 1.5)
    return (ball(shape, centre, outer) & ~ball(shape, centre, hole),
            ball(shape, centre, inner))
  shell, core = nest(0.0)
  shell2, core2 = nest(1.0)
  kind = rng.integers(3)
  ref = shell | core
  pred = shell2 | core2 if kind == 0 else (shell2 if kind == 1 else core2)
  return nonempty(rng, pred), nonempty(rng, ref)


def case_far(rng):
  """Small objects far apart: long distances, boxes much larger than the objects."""
  shape = random_shape(rng)
  pred, ref = np.zeros(shape, bool), np.zeros(shape, bool)
  a = tuple(slice(0, int(rng.integers(1, 4))) for _ in shape)
  b = tuple(slice(n - int(rng.integers(1, 4)), n) for n in shape)
  pred[a] = True
  ref[b] = True
  if rng.random() < 0.5:
    ref[a] = True                          # and one shared
  return pred, ref


def case_islands(rng):
  """A fair prediction of a blob plus false-positive islands, one of them far away or
  many small ones (a poor prediction): a few long distances among many short ones."""
  shape = random_shape(rng)
  ref = nonempty(rng, blob(rng, shape, fill=rng.uniform(0.1, 0.3), sigma=2.0))
  pred = ref.copy()
  if rng.random() < 0.5:
    pred = ndimage.binary_dilation(ref) if rng.random() < 0.5 else ndimage.binary_erosion(ref)
  count = 1 if rng.random() < 0.4 else int(rng.integers(5, 30))
  for _ in range(count):
    corner = [int(rng.integers(n)) for n in shape]
    size = [int(rng.integers(1, 3)) for _ in shape]
    (pred if rng.random() < 0.8 else ref)[tuple(slice(c, c + k)
                                               for c, k in zip(corner, size))] = True
  return nonempty(rng, pred), ref


FAMILIES = {"blobs": case_blobs, "components": case_components, "edges": case_edges,
            "thin": case_thin, "nested": case_nested, "far": case_far,
            "islands": case_islands}
CASES_PER_FAMILY = 40   # 280 cases in all


def family_cases(family):
  rng = np.random.default_rng(list(FAMILIES).index(family))
  for i in range(CASES_PER_FAMILY):
    pred, ref = FAMILIES[family](rng)
    yield i, pred, ref, random_spacing(rng, pred.ndim)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("method", metrics.METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_agrees_with_medpy_and_scipy(family, method):
  ndims = set()
  for i, pred, ref, spacing in family_cases(family):
    ndims.add(pred.ndim)
    assert_agrees(pred, ref, spacing, (family, i, pred.shape, spacing), method)
  assert ndims == {2, 3}


@pytest.mark.parametrize("shell_voxels, threads", [(0, 1), (1, 3), (2, 5)])
def test_host_tree_and_slabs_agree_with_medpy(monkeypatch, shell_voxels, threads):
  # Shells of 0-2 voxels settle few targets: most distances then come from the k-d tree.
  # 1, 3 or 5 threads cut the erosion into 2, 6 or 10 slabs (fewer where a box is thin).
  monkeypatch.setattr(metrics, "_SHELL_VOXELS", shell_voxels)
  monkeypatch.setattr(metrics, "_threads", lambda: threads)
  for family in ("islands", "far", "blobs", "thin", "edges"):
    for i, pred, ref, spacing in family_cases(family):
      if i < 12:
        assert_agrees(pred, ref, spacing, ("tree", shell_voxels, threads, family, i))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 1.5), (0.7, 2.9, 0.31),
                                     (0.5, 5.0), (3.0, 0.01, 1.0)])
def test_shells_hold_every_offset_below_their_bound(spacing):
  # The shells settle a target by their first hit only if no offset left out is nearer:
  # every offset shorter than the bound is listed, nearest first, and the reach covers them.
  s = np.asarray(spacing)
  offsets, d2, reach = metrics._shell_offsets(s)
  bound = min(v * v * (r + 1) ** 2 for v, r in zip(s, reach))
  assert np.all(np.diff(d2) >= 0) and np.all(d2 < bound)
  np.testing.assert_allclose(d2, ((offsets * s) ** 2).sum(axis=1), rtol=1e-15)
  wide = np.stack(np.meshgrid(*[np.arange(-r - 3, r + 4) for r in reach], indexing="ij"),
                  axis=-1).reshape(-1, s.size)
  shorter = {tuple(o) for o in wide if ((o * s) ** 2).sum() < bound * (1 - 1e-9)}
  assert {tuple(o) for o in offsets} == shorter
  assert len(shorter) > 1


def test_chunked_sweep_agrees_with_medpy(monkeypatch):
  # Small chunks (8 planes) so these boxes span several chunks, as big volumes do: the
  # nearest surface along axis a is then found across chunk boundaries.
  # Axis 0 is the longest and the finest, so it is the chunked one.
  monkeypatch.setattr(metrics, "_MAX_CHUNK_PLANES", 8)
  rng = np.random.default_rng(7)
  for i in range(30):
    shape = ((40, 16, 16), (48, 9, 31), (64, 20, 12))[i % 3]
    pred, ref = nonempty(rng, blob(rng, shape, sigma=2.0)), nonempty(rng, blob(rng, shape))
    if i % 5 == 0:   # surfaces only in the first and last chunk along a
      pred[4:-4], ref[6:-6] = False, False
    spacing = tuple(rng.uniform(0.3, 2.0) * np.array([1.0, *rng.uniform(1.0, 3.0, 2)]))
    packed, _, sizes, planes = metrics._pack(ref, pred, spacing)
    assert sizes[0] == shape[0] and -(-sizes[0] // planes) >= 5
    assert_agrees(pred, ref, spacing, ("chunked", i), "jax")


@pytest.mark.parametrize("window, band", [(1, 8), (0, 32)])
def test_bands_searched_again_agree_with_medpy(monkeypatch, window, band):
  # A first window of 0 or 1 voxels settles few targets: nearly every distance then
  # comes from the bands searched again (8 or 32 planes along b, one band or several per
  # chunk), with their radii grown.
  monkeypatch.setattr(metrics, "_FIRST_WINDOW", window)
  monkeypatch.setattr(metrics, "_BAND", band)
  for family in ("islands", "far", "blobs", "thin"):
    for i, pred, ref, spacing in family_cases(family):
      if i < 12:
        assert_agrees(pred, ref, spacing, ("bands", window, band, family, i), "jax")


@pytest.mark.slow
def test_agrees_with_medpy_on_an_organ_sized_case():
  rng = np.random.default_rng(3)
  shape = (150, 120, 60)
  ref = ball(shape, (70, 60, 30), 38.0, (0.8, 0.8, 2.0)) & blob(rng, shape, fill=0.85, sigma=6)
  pred = ndimage.binary_dilation(ref, iterations=2) & blob(rng, shape, fill=0.9, sigma=4)
  pred[120:126, 10:14, 5:8] = True   # a false positive away from the organ
  assert_agrees(pred, ref, (0.8, 0.8, 2.0), "organ")


@needs_real
def test_real_ct_pair_matches_medpy_figures():
  nib = pytest.importorskip("nibabel")
  a = nib.load(os.path.join(REAL, "liver_mask_a.nii.gz"))
  b = nib.load(os.path.join(REAL, "liver_mask_b.nii.gz"))
  spacing = tuple(float(s) for s in a.header.get_zooms()[:3])
  ref, pred = np.asarray(a.dataobj) > 0, np.asarray(b.dataobj) > 0
  ours = segmentation_metrics(pred, ref, spacing)
  readme = dict(dsc=0.98136, voe=0.03661, rvd=0.01853, assd=0.53743, mssd=9.48683)
  for key, value in readme.items():     # the README's figures, rounded to 5 decimals
    assert ours[key] == pytest.approx(value, abs=5e-6), key
  assert_agrees(pred, ref, spacing, "real CT")


def test_both_empty():
  for shape in ((7, 9), (4, 5, 6), (0, 5)):
    empty = np.zeros(shape, bool)
    assert segmentation_metrics(empty, empty, (1.0,) * len(shape)) == dict(
        dsc=1.0, voe=0.0, rvd=0.0, assd=0.0, mssd=0.0, rmsd=0.0, hd95=0.0, nsd=1.0)
  # medpy 0.5.2 is undefined here: its dc divides numpy integers, giving NaN (not its
  # documented 1.0); its jc gives 1.0, as SPEC's VOE 0.
  empty = np.zeros((7, 9), bool)
  with np.errstate(invalid="ignore"):
    assert math.isnan(medpy_binary.dc(empty, empty))
  assert medpy_binary.jc(empty, empty) == 1.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_one_empty(ndim):
  shape = (6, 7, 5)[:ndim]
  spacing = (1.0, 2.0, 0.5)[:ndim]
  empty, some = np.zeros(shape, bool), np.zeros(shape, bool)
  some[(2,) * ndim] = True
  inf = math.inf
  assert segmentation_metrics(empty, some, spacing) == dict(
      dsc=0.0, voe=1.0, rvd=-1.0, assd=inf, mssd=inf, rmsd=inf, hd95=inf, nsd=0.0)
  assert segmentation_metrics(some, empty, spacing) == dict(
      dsc=0.0, voe=1.0, rvd=inf, assd=inf, mssd=inf, rmsd=inf, hd95=inf, nsd=0.0)
  # medpy agrees where it is defined, and raises for the distances.
  assert medpy_binary.dc(empty, some) == 0.0 and medpy_binary.ravd(empty, some) == -1.0
  with pytest.raises(RuntimeError):
    medpy_binary.assd(empty, some, spacing)


def test_hd95_pools_both_directions_as_medpy():
  # Pred is ref plus an island: from S(pred) to S(ref) a few island voxels are far, from
  # S(ref) to S(pred) all are 0. The pooled 95th percentile (medpy's hd95) and the larger
  # of the two directed ones (another common definition) differ here.
  ref = np.zeros((40, 30), bool)
  ref[5:35, 5:25] = True
  pred = ref.copy()
  pred[0:3, 27:30] = True
  d = scipy_distances(pred, ref, (1.0, 1.0))["distances"]
  surf_pred = metrics.surface(pred).sum()
  directed = max(np.percentile(d[:surf_pred], 95), np.percentile(d[surf_pred:], 95))
  pooled = np.percentile(d, 95)
  assert pooled != pytest.approx(directed, rel=1e-3)
  got = segmentation_metrics(pred, ref, (1.0, 1.0))["hd95"]
  assert got == pytest.approx(pooled, rel=1e-6)
  assert got == pytest.approx(medpy_binary.hd95(pred, ref, (1.0, 1.0), 1), rel=1e-6)


def test_nsd_counts_distances_equal_to_the_tolerance():
  # A box shifted by 4 voxels of 0.5 mm along axis 0: the moved faces are exactly 2 mm
  # from the other surface. With spacings and tolerances of few binary digits the float32
  # squares are exact, so the tie is decided exactly: d <= tolerance counts.
  ref = np.zeros((24, 16, 12), bool)
  ref[4:14, 3:12, 2:9] = True
  pred = np.roll(ref, 4, axis=0)
  spacing = (0.5, 0.75, 1.25)
  d = scipy_distances(pred, ref, spacing)["distances"]
  assert np.any(d == 2.0)
  at = segmentation_metrics(pred, ref, spacing, nsd_tolerance=2.0)["nsd"]
  below = segmentation_metrics(pred, ref, spacing, nsd_tolerance=np.nextafter(2.0, 0))["nsd"]
  assert at == reference_nsd(d, 2.0) and below == reference_nsd(d, np.nextafter(2.0, 0))
  assert at > below
  assert segmentation_metrics(pred, ref, spacing, nsd_tolerance=0.0)["nsd"] == \
      reference_nsd(d, 0.0) > 0


@pytest.mark.parametrize("tolerance", [-1.0, math.nan, math.inf, "a", None])
def test_bad_nsd_tolerance_is_a_value_error(tolerance):
  mask = np.ones((4, 5), bool)
  with pytest.raises(ValueError, match="nsd_tolerance"):
    segmentation_metrics(mask, mask, (1.0, 1.0), nsd_tolerance=tolerance)


def test_array_edge_counts_as_outside():
  # A full 5 x 6 array has the array's border as its surface. Against one voxel at (2, 2):
  # from there the border is 2 voxels away; the farthest border voxel is (4, 5) or
  # (0, 5): sqrt(2^2 + 3^2) voxels.
  ref = np.ones((5, 6), bool)
  pred = np.zeros((5, 6), bool)
  pred[2, 2] = True
  got = segmentation_metrics(pred, ref, (1.0, 1.0))
  assert got["mssd"] == pytest.approx(math.sqrt(13.0), rel=1e-7)
  border = metrics.surface(ref)
  assert border.sum() == 2 * 5 + 2 * 6 - 4 and not border[1:-1, 1:-1].any()
  # medpy 0.5.2 erodes with the array's edge as background too: no discrepancy here.
  assert medpy_binary.hd(pred, ref, (1.0, 1.0), 1) == pytest.approx(math.sqrt(13.0))


def test_shifted_box_has_the_shift_as_hausdorff_distance():
  ref = np.zeros((20, 18, 16), bool)
  ref[4:12, 5:14, 3:10] = True
  pred = np.roll(ref, 1, axis=0)
  got = segmentation_metrics(pred, ref, (2.5, 0.7, 0.9))
  assert got["mssd"] == pytest.approx(2.5, rel=1e-7)
  assert got["dsc"] == pytest.approx(2 * 7 / 16)
  assert got["rvd"] == 0.0


def test_surface_matches_scipy_erosion():
  rng = np.random.default_rng(11)
  for shape in SHAPES_2D + SHAPES_3D:
    mask = blob(rng, shape)
    mask[0] = True  # on the edge
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    want = mask & ~ndimage.binary_erosion(mask, structure=cross, border_value=0)
    np.testing.assert_array_equal(metrics.surface(mask), want)


@pytest.mark.parametrize("method", metrics.METHODS)
def test_extreme_anisotropy_stays_exact(method):
  rng = np.random.default_rng(5)
  for spacing in ((0.01, 10.0, 1.0), (1000.0, 0.5, 3.0), (0.003, 0.003, 7.0)):
    pred, ref = nonempty(rng, blob(rng, (20, 12, 28))), nonempty(rng, blob(rng, (20, 12, 28)))
    assert_agrees(pred, ref, spacing, spacing, method)


def test_permuting_axes_with_the_spacing_changes_nothing():
  rng = np.random.default_rng(2)
  pred, ref = blob(rng, (20, 12, 28)), blob(rng, (20, 12, 28))
  spacing = (0.7, 1.9, 3.1)
  base = segmentation_metrics(pred, ref, spacing)
  for order in ((2, 0, 1), (1, 2, 0), (2, 1, 0)):
    got = segmentation_metrics(pred.transpose(order), ref.transpose(order),
                               [spacing[i] for i in order])
    for key in KEYS:
      assert got[key] == pytest.approx(base[key], rel=1e-6), (order, key)


def test_accepts_jax_integer_and_strided_arrays():
  rng = np.random.default_rng(4)
  pred, ref = blob(rng, (24, 32)), blob(rng, (24, 32))
  want = segmentation_metrics(pred, ref, (0.5, 2.0))
  assert tuple(want) == KEYS == metrics.METRIC_NAMES
  assert all(type(v) is float for v in want.values())
  for p, r, s in ((jnp.asarray(pred), jnp.asarray(ref), jnp.asarray([0.5, 2.0])),
                  (pred.astype(np.uint8), ref.astype(np.int32), np.array([0.5, 2.0])),
                  (np.asfortranarray(pred), ref.copy(order="F"), [0.5, 2.0])):
    assert segmentation_metrics(p, r, s) == want
  wide_p, wide_r = np.zeros((24, 64), bool), np.zeros((24, 64), bool)
  wide_p[:, ::2], wide_r[:, ::2] = pred, ref
  assert segmentation_metrics(wide_p[:, ::2], wide_r[:, ::2], (0.5, 2.0)) == want


@pytest.mark.parametrize("pred, ref, spacing, message", [
    (np.zeros((4, 5), bool), np.zeros((5, 4), bool), (1, 1), "differ in shape"),
    (np.zeros(5, bool), np.zeros(5, bool), (1,), "2-D or 3-D"),
    (np.zeros((2, 3, 4, 5), bool), np.zeros((2, 3, 4, 5), bool), (1, 1, 1, 1), "2-D or 3-D"),
    (np.zeros((4, 5), bool), np.zeros((4, 5), bool), (1, 1, 1), "one value per axis"),
    (np.zeros((4, 5, 6), bool), np.zeros((4, 5, 6), bool), (1, 1), "one value per axis"),
    (np.zeros((4, 5), bool), np.zeros((4, 5), bool), 1.0, "one value per axis"),
    (np.zeros((4, 5), bool), np.zeros((4, 5), bool), (1, 0), "positive"),
    (np.zeros((4, 5), bool), np.zeros((4, 5), bool), (1, -2), "positive"),
    (np.zeros((4, 5), bool), np.zeros((4, 5), bool), (1, float("nan")), "positive"),
    (np.zeros((4, 5), bool), np.zeros((4, 5), bool), (1, float("inf")), "positive"),
    (np.zeros((4, 5), bool), np.zeros((4, 5), bool), ("a", 1), "spacing"),
    (np.zeros((4, 5), float), np.zeros((4, 5), bool), (1, 1), "boolean"),
])
def test_bad_arguments_are_value_errors(pred, ref, spacing, message):
  with pytest.raises(ValueError, match=message) as info:
    segmentation_metrics(pred, ref, spacing)
  assert isinstance(info.value, UserError)   # one line and exit status 2 in the tools


def test_unknown_method_is_a_value_error():
  mask = np.ones((4, 5), bool)
  with pytest.raises(metrics.MetricsArgumentError, match="method must be one of"):
    segmentation_metrics(mask, mask, (1, 1), method="gpu")


@pytest.mark.parametrize("group", [
    # (shape, spacing): the spacings keep axis 0 first (the finest or, among equals, the
    # longest), so the boxes differ in size only.
    [((20, 10, 20), (0.7, 0.7, 0.7)), ((25, 12, 30), (1.3, 1.3, 2.5)),
     ((31, 15, 18), (2.0, 2.0, 2.0)), ((18, 3, 17), (0.5, 0.6, 0.6))],
    [((100, 70, 90), (1.0, 1.0, 1.0)), ((120, 66, 85), (0.8, 0.9, 0.8)),
     ((96, 80, 90), (1.5, 1.5, 1.5))],
], ids=["small", "medium"])
def test_one_compilation_per_bucket(group):
  rng = np.random.default_rng(9)
  keys = set()
  compiled = metrics._kernel._cache_size()
  for shape, spacing in group:
    pred, ref = rng.random(shape) < 0.5, rng.random(shape) < 0.5
    pred[0, 0, 0] = ref[-1, -1, -1] = True          # the box is the whole array
    packed, _, _, planes = metrics._pack(ref, pred, spacing)
    keys.add((packed.shape, planes, False, metrics._FIRST_WINDOW, metrics._BAND))
    assert_agrees(pred, ref, spacing, shape, "jax")
  assert len(keys) == 1
  # At most one new program (none when an earlier test of this process compiled the bucket).
  assert metrics._kernel._cache_size() - compiled <= 1


def test_host_memory_is_linear_in_the_box_and_the_surfaces():
  # Peak numpy memory of method "host" (tracemalloc sees numpy's buffers): per voxel of
  # the padded joint box, 1 byte of shell lookups plus at most 1 byte of the erosion's and
  # the overlap count's slab temporaries; per surface voxel, the largest shell block (32
  # offsets: 8-byte indices, 1-byte codes and flags, about 300 bytes) and the indices,
  # distances and k-d tree (under 100 bytes). 3 and 400 leave room over both.
  import tracemalloc
  n = 128
  g = np.indices((n, n, n), dtype=np.float32) - n / 2
  ball_ref = (g ** 2).sum(axis=0) < (0.4 * n) ** 2
  ball_pred = ((g - 1.5) ** 2).sum(axis=0) < (0.41 * n) ** 2
  del g
  corners_ref, corners_pred = np.zeros((n, n, n), bool), np.zeros((n, n, n), bool)
  corners_ref[1:6, 1:6, 1:6] = True
  corners_pred[-7:-2, -6:-1, -6:-1] = True
  # Big surfaces in the box; then a box of little else (the per-voxel terms dominate).
  for pred, ref in ((ball_pred, ball_ref), (corners_pred, corners_ref)):
    pred[2:4, 2:4, 2:4] = True           # an island at the corner: the box is the array
    surface_voxels = int(metrics.surface(ref).sum() + metrics.surface(pred).sum())
    tracemalloc.start()
    try:
      segmentation_metrics(pred, ref, (1.0, 1.0, 1.0), method="host")
      _, peak = tracemalloc.get_traced_memory()
    finally:
      tracemalloc.stop()
    box_voxels = math.prod(n + 2 * r for r in metrics._shell_offsets(np.ones(3))[2])
    assert peak < 3 * box_voxels + 400 * surface_voxels, (surface_voxels, peak)


def test_memory_grows_linearly_with_the_box():
  # Compiled temporaries and outputs for boxes 128 and 512 planes long, in chunks of 64
  # planes: a constant for the chunk's work, plus bookkeeping well under a byte per box
  # voxel, and the output's float32 distance per box voxel.
  sizes = []
  for length in (128, 512):
    packed = jnp.zeros((length + 2, 64, 64), jnp.uint8)
    with jax.enable_x64(True):
      compiled = metrics._kernel.lower(packed, jnp.ones(3, jnp.float64),
                                       jnp.asarray([length, 64, 64], jnp.int32),
                                       planes=64, flat=False).compile()
    memory = compiled.memory_analysis()
    sizes.append((memory.temp_size_in_bytes, memory.output_size_in_bytes))
  added_voxels = (512 - 128) * 64 * 64
  assert sizes[1][0] - sizes[0][0] < 0.5 * added_voxels
  assert sizes[1][1] - sizes[0][1] == 4 * added_voxels
  chunk_voxels = 2 * 64 * 64 * 64   # both directions
  assert sizes[0][0] < 96 * chunk_voxels
