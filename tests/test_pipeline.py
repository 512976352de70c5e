"""Training batches: content, padding, sharding over processes, resume, sampling, augmentation.

The test volumes encode each slice's identity in its voxels (HU = 100 * volume + z on
a ring of the slice), so a delivered row can be traced to the stored slice it came from.
"""

import json
import os

import numpy as np
import pytest

from conftest import make_tiny_config
from munet_jax import preprocess
from munet_jax.data import discovery, nifti, pipeline, store
from munet_jax.errors import UserError

S = 24
# (X, Y, Z) per volume: cropped in X, padded in Y, exact, ...
SHAPES = [(28, 20, 7), (24, 24, 5), (18, 30, 6)]


def _make_volume(v, shape):
  x, y, z = shape
  hu = np.full(shape, -50, np.int16)
  hu += (100 * v + np.arange(z, dtype=np.int16))[None, None, :]
  labels = np.zeros(shape, np.uint8)
  cx, cy = x // 2, y // 2
  labels[cx - 4:cx + 4, cy - 4:cy + 4, 1:z - 1] = 1          # liver on inner slices
  labels[cx - 1:cx + 2, cy - 1:cy + 2, 2:3] = 2              # tumour on slice 2 only
  hu[labels == 1] = 300 + 100 * v
  hu[labels == 2] = 900 + 100 * v
  hu += (100 * v + np.arange(z, dtype=np.int16))[None, None, :] * (labels > 0)
  return hu, labels


@pytest.fixture(scope="module")
def train_store(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("pipe") / "data")
  for v, shape in enumerate(SHAPES):
    hu, labels = _make_volume(v, shape)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    nifti.write_image(os.path.join(root, f"volume-{v}.nii.gz"), hu, affine)
    nifti.write_image(os.path.join(root, f"segmentation-{v}.nii.gz"), labels, affine)
  cache = store.default_cache_dir(root)
  store.prepare_store(discovery.find_cases(root), cache)
  return store.open_store(cache)


def _config(**data):
  c = make_tiny_config()
  c.data.image_size = S
  c.data.num_workers = 0
  c.data.prefetch = 2
  for k, v in data.items():
    if k.startswith("augment_"):
      c.data.augment[k[len("augment_"):]] = v
    else:
      c.data[k] = v
  return c


def _iterator(st, config, batch=5, padded=6, p=0, n=1, start=0, **kw):
  return pipeline.make_train_iterator(st, config, global_batch=batch, padded_batch=padded,
                                      process_index=p, process_count=n, start_step=start, **kw)


def _take(it, steps):
  try:
    return [next(it) for _ in range(steps)]
  finally:
    it.close()


def _expected_slice(st, volume, z):
  """The stored slice centre-cropped / padded to S x S, by hand."""
  hu, labels = st.volume(st.names[volume])
  out_hu = np.full((S, S), pipeline.PAD_HU, np.int16)
  out_lab = np.zeros((S, S), np.int32)
  nx, ny = hu.shape[1:]
  def cut(n):
    if n >= S:
      a = (n - S) // 2
      return slice(a, a + S), slice(0, S)
    a = (S - n) // 2
    return slice(0, n), slice(a, a + n)
  (sx, dx), (sy, dy) = cut(nx), cut(ny)
  out_hu[dx, dy] = hu[z, sx, sy]
  out_lab[dx, dy] = labels[z, sx, sy]
  return out_hu, out_lab


def _identity(st, image_row):
  """(volume, z) of a delivered row, read from its background voxels (HU = 100 v + z - 50)."""
  values, counts = np.unique(image_row[image_row != pipeline.PAD_HU], return_counts=True)
  code = int(values[np.argmax(counts)]) + 50
  return code // 100, code % 100


def test_batch_shapes_dtypes_and_padding_rows(train_store):
  [b] = _take(_iterator(train_store, _config()), 1)
  assert b["image"].shape == (6, S, S, 1) and b["image"].dtype == np.int16
  assert b["label"].shape == (6, S, S) and b["label"].dtype == np.int32
  np.testing.assert_array_equal(b["mask"], [True] * 5 + [False])
  assert (b["image"][5] == pipeline.PAD_HU).all() and (b["label"][5] == 0).all()


def test_rows_are_the_stored_slices_cropped_or_padded(train_store):
  batches = _take(_iterator(train_store, _config()), 4)
  seen = set()
  for b in batches:
    for r in range(5):
      v, z = _identity(train_store, b["image"][r, ..., 0])
      hu, lab = _expected_slice(train_store, v, z)
      np.testing.assert_array_equal(b["image"][r, ..., 0], hu)
      np.testing.assert_array_equal(b["label"][r], lab)
      seen.add(v)
  assert seen == {0, 1, 2}


def test_all_sampling_draws_every_slice_once_per_epoch(train_store):
  n = train_store.num_slices                       # 18 slices; batches of 5 cross epochs
  rows = [_identity(train_store, b["image"][r, ..., 0])
          for b in _take(_iterator(train_store, _config()), 8) for r in range(5)]
  everything = {(v, z) for v, shape in enumerate(SHAPES) for z in range(shape[2])}
  assert len(everything) == n
  assert sorted(rows[:n]) == sorted(everything)
  assert sorted(rows[n:2 * n]) == sorted(everything)
  assert rows[:n] != rows[n:2 * n]                 # reshuffled each epoch


def test_batches_do_not_depend_on_the_number_of_processes(train_store):
  config = _config()
  single = _take(_iterator(train_store, config, padded=6), 3)
  for count in (2, 3):
    parts = [_take(_iterator(train_store, config, padded=6, p=p, n=count), 3)
             for p in range(count)]
    for step in range(3):
      for key in ("image", "label", "mask"):
        joined = np.concatenate([parts[p][step][key] for p in range(count)])
        np.testing.assert_array_equal(joined, single[step][key])
  # More padding (e.g. 8 devices) only appends rows.
  wider = _take(_iterator(train_store, config, padded=8), 3)
  for a, b in zip(single, wider):
    np.testing.assert_array_equal(a["image"][:5], b["image"][:5])
    assert not b["mask"][5:].any()


def test_process_holding_only_padding_rows(train_store):
  [b] = _take(_iterator(train_store, _config(), batch=3, padded=6, p=2, n=3), 1)
  assert not b["mask"].any() and (b["label"] == 0).all()


def test_resume_by_state_and_by_start_step(train_store):
  config = _config()
  straight = _take(_iterator(train_store, config), 7)
  it = _iterator(train_store, config)
  _take(it, 4)
  state = json.loads(json.dumps(it.get_state()))     # through a checkpoint's JSON
  assert state["step"] == 4
  restored = _iterator(train_store, config)
  restored.set_state(state)
  started = _iterator(train_store, config, start=4)
  for a, b, c in zip(straight[4:], _take(restored, 3), _take(started, 3)):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["image"], c["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_set_state_rejects_a_damaged_state(train_store):
  it = _iterator(train_store, _config())
  with pytest.raises(UserError, match="step"):
    it.set_state({"version": 1})


def _our_shared_memory():
  """This process's pipeline segments in /dev/shm (Linux); None where it cannot be seen."""
  if not os.path.isdir("/dev/shm"):
    return None
  return [f for f in os.listdir("/dev/shm") if f.startswith(f"munet-{os.getpid()}-")]


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume_exactly(train_store):
  in_process = _take(_iterator(train_store, _config(num_workers=0)), 8)
  it = _iterator(train_store, _config(num_workers=2))
  try:
    first = [next(it) for _ in range(5)]
    state = it.get_state()
    assert _our_shared_memory() != []     # the workers' slots exist while running
  finally:
    it.close()
  assert _our_shared_memory() in ([], None)   # and are freed by close
  resumed = _iterator(train_store, _config(num_workers=2))
  resumed.set_state(state)
  rest = _take(resumed, 3)
  for a, b in zip(in_process, first + rest):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(a[key], b[key])
      assert type(b[key]) is np.ndarray     # copied out of the shared slots


def test_liver_sampling_draws_only_liver_slices(train_store):
  liver = {(v, z) for v, shape in enumerate(SHAPES) for z in range(1, shape[2] - 1)}
  rows = [_identity(train_store, b["image"][r, ..., 0])
          for b in _take(_iterator(train_store, _config(sampling="liver")), 6)
          for r in range(5)]
  assert set(rows) <= liver
  assert sorted(rows[:len(liver)]) == sorted(liver)


def test_tumor_oversampling_draws_more_tumour_slices(train_store):
  def tumour_share(config):
    rows = [_identity(train_store, b["image"][r, ..., 0])
            for b in _take(_iterator(train_store, config), 40) for r in range(5)]
    return np.mean([z == 2 for _, z in rows])
  plain = tumour_share(_config(sampling="all"))
  over = tumour_share(_config(sampling="tumour_oversample", tumour_oversample=0.5))
  assert abs(plain - 3 / 18) < 0.02          # whole epochs: exactly 3 of 18 slices
  assert abs(over - (0.5 + 0.5 * 3 / 18)) < 0.03


def test_liver_sampling_without_liver_is_an_error(tmp_path):
  root = str(tmp_path / "d")
  affine = np.diag([1.0, 1.0, 1.0, 1.0])
  nifti.write_image(os.path.join(root, "volume-0.nii.gz"), np.zeros((4, 4, 3), np.int16), affine)
  nifti.write_image(os.path.join(root, "segmentation-0.nii.gz"), np.zeros((4, 4, 3), np.uint8),
                    affine)
  st = store.prepare_store(discovery.find_cases(root), tmp_path / "cache")
  with pytest.raises(UserError, match="data.sampling"):
    _iterator(st, _config(sampling="liver"))
  [b] = _take(_iterator(st, _config(sampling="tumour_oversample", tumour_oversample=0.3)), 1)
  assert b["mask"].sum() == 5                 # no tumour anywhere: plain sampling


def test_float32_output_is_munet_preprocess(train_store):
  config = _config()
  [hu] = _take(_iterator(train_store, config), 1)
  [pre] = _take(_iterator(train_store, config, preprocessed=True), 1)
  assert pre["image"].dtype == np.float32
  np.testing.assert_array_equal(pre["image"], preprocess(hu["image"], config))
  np.testing.assert_array_equal(pre["label"], hu["label"])


def _augment_config(intensity=0.0):
  return _config(augment_enabled=True, augment_intensity=intensity,
                 augment_rotate_degrees=20.0, augment_scale=0.15)


def test_augmentation_is_deterministic_per_step_and_row(train_store):
  plain = _take(_iterator(train_store, _config()), 3)
  first = _take(_iterator(train_store, _augment_config(0.05)), 3)
  second = _take(_iterator(train_store, _augment_config(0.05)), 3)
  halves = [_take(_iterator(train_store, _augment_config(0.05), p=p, n=2), 3) for p in range(2)]
  changed = 0
  for step in range(3):
    for key in ("image", "label"):
      np.testing.assert_array_equal(first[step][key], second[step][key])
      joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
      np.testing.assert_array_equal(joined, first[step][key])
    changed += int((first[step]["image"] != plain[step]["image"]).any(axis=(1, 2, 3)).sum())
  assert changed == 15                       # every real row is transformed


def test_augmented_labels_stay_on_the_image(train_store):
  """Where bilinear image values are unblended (all 4 neighbours one tissue), the
  nearest-neighbour label must be exactly that tissue's."""
  plain = _take(_iterator(train_store, _config()), 4)
  augmented = _take(_iterator(train_store, _augment_config(0.0)), 4)
  jittered = _take(_iterator(train_store, _augment_config(0.05)), 4)
  exact = total = moved = 0
  for b_plain, b_aug, b_jit in zip(plain, augmented, jittered):
    np.testing.assert_array_equal(b_aug["label"], b_jit["label"])  # intensity: image only
    for r in range(5):
      v, z = _identity(train_store, b_plain["image"][r, ..., 0])
      image, label = b_aug["image"][r, ..., 0], b_aug["label"][r]
      moved += int(not np.array_equal(label, b_plain["label"][r]))
      levels = {-50 + 100 * v + z: 0, pipeline.PAD_HU: 0,
                300 + 200 * v + z: 1, 900 + 200 * v + z: 2}
      for value, want in levels.items():
        at = image == value
        np.testing.assert_array_equal(label[at], want)
        exact += int(at.sum())
      total += image.size
  assert exact > 0.8 * total and moved >= 10


def test_arguments_are_checked(train_store):
  with pytest.raises(ValueError):
    _iterator(train_store, _config(), batch=5, padded=4)
  with pytest.raises(ValueError):
    _iterator(train_store, _config(), batch=5, padded=6, p=0, n=4)
  with pytest.raises(UserError, match="no training volumes"):
    _iterator(store.SliceStore(train_store.cache_dir, []), _config())


def test_foreground_windows_hold_the_tumour_then_the_liver_and_reach_both_ends():
  label = np.zeros((40, 30), np.uint8)
  label[10:20, 5:25] = 1
  label[37, 2] = 2                                   # one tumour voxel near a corner
  starts = set()
  for k in range(200):
    (sx, dx), (sy, dy) = pipeline.foreground_place(label, 16, np.random.default_rng(k))
    assert sx.stop - sx.start == sy.stop - sy.start == 16 and dx == dy == slice(0, 16)
    assert label[sx, sy][37 - sx.start, 2 - sy.start] == 2
    starts.add((sx.start, sy.start))
  # Every window holding the voxel: x start 22..24, y start 0..2, all nine drawn.
  assert starts == {(x, y) for x in range(22, 25) for y in range(0, 3)}
  label[37, 2] = 0
  for k in range(50):
    (sx, _), (sy, _) = pipeline.foreground_place(label, 16, np.random.default_rng(k))
    assert (label[sx, sy] == 1).any()
  empty = np.zeros((40, 8), np.uint8)                # y shorter than the window: padded
  (sx, dx), (sy, dy) = pipeline.foreground_place(empty, 16, np.random.default_rng(0))
  assert (sy, dy) == (slice(0, 8), slice(4, 12)) and 0 <= sx.start <= 24


def test_a_tumour_share_below_one_places_some_windows_around_the_liver():
  label = np.zeros((40, 30), np.uint8)
  label[0:12, 0:30] = 1
  label[37, 2] = 2                  # no 16 x 16 window holds both the voxel and the liver
  holds = []
  for k in range(400):
    rng = np.random.default_rng(k)
    (sx, _), (sy, _) = pipeline.foreground_place(label, 16, rng, tumour_share=0.5)
    window = label[sx, sy]
    assert (window == 2).any() != (window == 1).any()   # one or the other, never neither
    holds.append((window == 2).any())
    # A share of 1 draws exactly the windows of the plain call.
    one = pipeline.foreground_place(label, 16, np.random.default_rng(k), tumour_share=1.0)
    assert one == pipeline.foreground_place(label, 16, np.random.default_rng(k))
  # The count around the tumour is Binomial(400, 1/2), sd 10: within 6 sd of 200.
  assert 140 <= sum(holds) <= 260
  for k in range(50):
    (sx, _), (sy, _) = pipeline.foreground_place(label, 16, np.random.default_rng(k),
                                                 tumour_share=0.0)
    assert (label[sx, sy] == 1).any() and not (label[sx, sy] == 2).any()


def test_foreground_crops_are_deterministic_and_hold_the_tumour(train_store):
  config = _config(train_crop="foreground", image_size=12, sampling="tumour_oversample",
                   tumour_oversample=0.9)
  a = _take(_iterator(train_store, config), 3)
  b = _take(_iterator(train_store, config), 3)
  tumour_rows = 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
    for r in range(5):
      v, z = _identity(train_store, x["image"][r, ..., 0])
      if z == 2:                                     # the slice with the tumour
        tumour_rows += 1
        assert (x["label"][r] == 2).any()
  assert tumour_rows > 0


def test_a_reference_hu_shifts_each_volumes_rows_by_its_own_shift(train_store):
  """data.reference_hu: every row is its stored slice plus its volume's shift."""
  from munet_jax.preprocessing import intensity_shift, shifted
  on = _config(reference_hu=500.0, reference_window=(-1000.0, 3000.0))
  shifts = [intensity_shift(train_store.case(name).hu, on) for name in train_store.names]
  assert len(set(shifts)) == len(shifts) and 0 not in shifts   # a check that can fail
  plain = _take(_iterator(train_store, _config()), 4)
  moved = _take(_iterator(train_store, on), 4)
  seen = set()
  for a, b in zip(plain, moved):
    np.testing.assert_array_equal(a["label"], b["label"])
    for row in range(5):
      volume, _ = _identity(train_store, a["image"][row, ..., 0])
      seen.add(volume)
      pad = a["image"][row, ..., 0] == pipeline.PAD_HU
      expected = np.where(pad, pipeline.PAD_HU, shifted(a["image"][row, ..., 0], shifts[volume]))
      np.testing.assert_array_equal(b["image"][row, ..., 0], expected)
  assert seen == set(range(len(SHAPES)))
