"""The per-volume HU shift (`data.reference_hu`): its percentile, its shift, its arithmetic."""

import numpy as np
import pytest

from munet_jax.config import base_config
from munet_jax.preprocessing import intensity_shift, reference_intensity, shifted

# reference_intensity interpolates between two whole HU of magnitude < 2**15 in float64, as
# numpy does: one subtraction, one product and one sum, each within half an ulp of 2**15
# (3.6e-12). 1e-9 is far above that and far below the 1 HU that separates two answers.
TOL = 1e-9


def _reference(hu, window, percentile):
  """numpy's own percentile of the voxels as the store keeps them (whole HU, int16)."""
  v = np.asarray(hu, np.float64)
  v = np.clip(np.rint(v), -32768, 32767)
  v = v[(v >= np.ceil(window[0])) & (v <= np.floor(window[1]))]
  return None if v.size == 0 else float(np.percentile(v, percentile))


CASES = [
    # (seed, shape, dtype, low, high, window, percentile)
    (0, (20, 17, 9), np.int16, -1000, 1000, (-30, 250), 75.0),
    (1, (33, 8, 5), np.int16, -60, 300, (-30, 250), 0.0),
    (2, (33, 8, 5), np.int16, -60, 300, (-30, 250), 100.0),
    (3, (12, 12, 12), np.float32, -200.0, 400.0, (-30.5, 249.5), 37.5),
    (4, (7, 300, 2), np.float64, -1e5, 1e5, (-40000.0, 40000.0), 50.0),   # clipped to int16
    (5, (64, 64, 3), np.int32, 40, 60, (-30, 250), 75.0),                # many ties
    (6, (5, 5, 5), np.int16, 0, 2, (1, 1), 90.0),                         # one value
]


@pytest.mark.parametrize("seed,shape,dtype,low,high,window,percentile", CASES)
def test_reference_intensity_is_numpys_percentile(seed, shape, dtype, low, high, window,
                                                  percentile):
  rng = np.random.default_rng(seed)
  hu = (rng.uniform(low, high, shape) if np.dtype(dtype).kind == "f"
        else rng.integers(low, high, shape, endpoint=True)).astype(dtype)
  expected = _reference(hu, window, percentile)
  assert expected is not None
  got = reference_intensity(hu, window, percentile)
  assert abs(got - expected) <= TOL, (got, expected)
  # Any axis order (the store keeps (Z, X, Y), inference reads (X, Y, Z)).
  assert abs(reference_intensity(np.moveaxis(hu, -1, 0), window, percentile) - got) <= TOL


def test_a_large_volume_is_read_in_pieces_and_every_piece_counts():
  # 5.2 M voxels, more than one piece; brighter towards the last axis's end, so a piece
  # left out or counted twice moves the percentile.
  rng = np.random.default_rng(9)
  hu = rng.integers(-100, 100, (256, 256, 80)).astype(np.int16)
  hu += (3 * np.arange(80, dtype=np.int16))[None, None, :]
  expected = _reference(hu, (-30, 250), 75.0)
  assert abs(reference_intensity(hu, (-30, 250), 75.0) - expected) <= TOL
  assert abs(reference_intensity(hu[..., :64], (-30, 250), 75.0) - expected) > 1


def test_no_voxel_in_the_window_gives_none_and_no_shift():
  hu = np.full((4, 4, 4), -1000, np.int16)
  assert reference_intensity(hu, (-30, 250), 75.0) is None
  assert reference_intensity(hu, (0.2, 0.8), 75.0) is None     # no whole HU inside
  c = base_config()
  c.data.reference_hu = 100.0
  assert intensity_shift(hu, c) == 0


def test_the_shift_brings_the_percentile_to_the_reference():
  rng = np.random.default_rng(7)
  hu = rng.integers(20, 120, (30, 30, 10)).astype(np.int16)     # all inside (-30, 250)
  c = base_config()
  assert intensity_shift(hu, c) == 0                           # off: the paper's recipe
  c.data.reference_hu = 100.0
  p75 = _reference(hu, (-30, 250), 75.0)
  shift = intensity_shift(hu, c)
  assert shift == int(np.rint(100.0 - p75)) and shift != 0
  # Shifted (every voxel still inside the window), the volume needs no further shift.
  assert intensity_shift(shifted(hu, shift), c) == 0
  # Two scans of one anatomy at different brightness come out the same.
  brighter = shifted(hu, 37)
  np.testing.assert_array_equal(shifted(brighter, intensity_shift(brighter, c)),
                                shifted(hu, shift))


def test_shifted_keeps_the_dtype_and_clips_integers():
  hu = np.array([-32768, -5, 0, 32767], np.int16)
  np.testing.assert_array_equal(shifted(hu, 10), np.array([-32758, 5, 10, 32767], np.int16))
  np.testing.assert_array_equal(shifted(hu, -10), np.array([-32768, -15, -10, 32757], np.int16))
  assert shifted(hu, 10).dtype == np.int16
  f = np.array([1.5, -2.25], np.float32)
  assert shifted(f, 3).dtype == np.float32
  np.testing.assert_array_equal(shifted(f, 3), np.array([4.5, 0.75], np.float32))
  assert shifted(hu, 0) is hu
