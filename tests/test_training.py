"""Training pieces: losses, optimiser, the sharded step, checkpoints."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from munet_jax.config import base_config
from munet_jax.errors import UserError
from munet_jax import sharding
from munet_jax.training import losses
from munet_jax.checkpoints import Checkpointer, load_variables
from munet_jax.training.optimizer import create_optimizer, learning_rate_schedule
from munet_jax.training.state import (create_train_state, ema_stats_steps, make_train_step,
                                      variables_of)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _logits_for(labels, k=3, confidence=20.0):
  return confidence * jax.nn.one_hot(labels, k)


def test_mse_loss_is_mean_squared_error_of_softmax_probabilities():
  logits = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  labels = jax.random.randint(jax.random.key(1), (2, 4, 4), 0, 3)
  expected = np.mean((jax.nn.softmax(logits) - jax.nn.one_hot(labels, 3)) ** 2)
  got = losses.mse_loss(logits, labels, jnp.ones(2, bool))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_soft_dice_is_pooled_over_the_batch_per_class():
  labels = jnp.zeros((2, 4, 4), jnp.int32).at[0, :2, :2].set(1).at[1, 0, 0].set(2)
  logits = jax.random.normal(jax.random.key(2), (2, 4, 4, 3))
  probs = jax.nn.softmax(logits)
  expected = []
  for k in (1, 2):
    p, t = probs[..., k], (labels == k).astype(jnp.float32)
    expected.append(1 - (2 * jnp.sum(p * t) + 1) / (jnp.sum(p) + jnp.sum(t) + 1))
  got = losses.soft_dice_loss(logits, labels, jnp.ones(2, bool))
  np.testing.assert_allclose(got, np.mean(expected), rtol=1e-6)


def test_soft_dice_on_a_slice_without_tumour_costs_in_proportion_to_the_mass():
  # One slice with a large tumour predicted well, one without tumour with a little
  # tumour mass: pooled, the small false mass costs little.
  labels = jnp.zeros((2, 8, 8), jnp.int32).at[0, :4, :4].set(2)
  logits = 8.0 * jax.nn.one_hot(labels, 3)
  logits = logits.at[1, 0, 0].set(jnp.array([0.0, 0.0, 8.0]))   # one false tumour pixel
  got = float(losses.soft_dice_loss(logits, labels, jnp.ones(2, bool)))
  assert got < 0.05


@pytest.mark.parametrize("name", ["mse", "dice", "ce_dice"])
def test_losses_ignore_masked_rows(name):
  fn = losses.get_loss(name)
  logits = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
  labels = jax.random.randint(jax.random.key(1), (3, 8, 8), 0, 3)
  junk_logits = logits.at[2].set(100.0)
  mask = jnp.array([True, True, False])
  np.testing.assert_allclose(fn(junk_logits, labels, mask), fn(logits[:2], labels[:2],
                                                               jnp.ones(2, bool)), rtol=1e-6)


@pytest.mark.parametrize("name", ["mse", "dice", "ce_dice"])
def test_losses_are_near_zero_for_a_confident_correct_prediction(name):
  labels = jax.random.randint(jax.random.key(1), (2, 8, 8), 0, 3)
  perfect = losses.get_loss(name)(_logits_for(labels), labels, jnp.ones(2, bool))
  wrong = losses.get_loss(name)(_logits_for((labels + 1) % 3), labels, jnp.ones(2, bool))
  assert float(perfect) < 1e-3 < float(wrong)


def test_learning_rate_decays_by_0_9_every_5000_steps_staircase():
  schedule = learning_rate_schedule(base_config())
  for step, expected in [(0, 1e-4), (4999, 1e-4), (5000, 0.9e-4), (12000, 0.81e-4)]:
    np.testing.assert_allclose(schedule(step), expected, rtol=1e-6)


def _one_update(config, params, grads):
  tx = create_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_l2_weight_decay_enters_adams_gradient_and_spares_biases():
  c = base_config()
  params = {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.full((2,), 3.0)}
  grads = {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros((2,))}
  updates = _one_update(c, params, grads)
  # Adam normalises the L2 gradient 0.003 * w: the first step moves a kernel by -lr.
  np.testing.assert_allclose(updates["kernel"], -1e-4, rtol=1e-3)
  np.testing.assert_array_equal(updates["bias"], 0.0)


def test_decoupled_weight_decay_scales_with_the_weight():
  c = base_config()
  c.train.decoupled_weight_decay = True
  params = {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.full((2,), 3.0)}
  grads = {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros((2,))}
  updates = _one_update(c, params, grads)
  np.testing.assert_allclose(updates["kernel"], -1e-4 * 0.003 * 3.0, rtol=1e-4)
  np.testing.assert_array_equal(updates["bias"], 0.0)


def test_padded_batch_size_is_the_next_multiple_of_the_devices():
  assert [sharding.padded_batch_size(15, n) for n in (1, 2, 3, 4, 8)] == [15, 16, 15, 16, 16]


@pytest.fixture(scope="module")
def tiny_state():
  c = base_config()
  c.model.features = (4, 8)
  return c, create_train_state(c, jax.random.key(0))


def _batch(n=4, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return dict(image=rng.normal(size=(n, size, size, 1)).astype(np.float32),
              label=rng.integers(0, 3, (n, size, size)).astype(np.int32),
              mask=np.ones(n, bool))


def test_train_step_lowers_the_loss_on_a_fixed_batch(tiny_state):
  c, state = tiny_state
  c = base_config()
  c.model.features = (4, 8)
  c.train.learning_rate = 1e-2
  c.model.dropout_rate = 0.0
  state = create_train_state(c, jax.random.key(0))
  step = jax.jit(make_train_step(c))
  batch = _batch()
  first = None
  for _ in range(15):
    state, metrics = step(state, batch)
    first = first if first is not None else float(metrics["loss"])
  assert float(metrics["loss"]) < 0.9 * first
  assert int(state.step) == 15


def test_train_step_windows_integer_hounsfield_units_on_the_device(tiny_state):
  c, state = tiny_state
  rng = np.random.default_rng(1)
  hu = rng.integers(-1000, 1500, (4, 16, 16, 1)).astype(np.int16)
  batch = _batch()
  step = jax.jit(make_train_step(c))
  from munet_jax.preprocessing import preprocess
  _, from_hu = step(state, dict(batch, image=hu))
  _, from_float = step(state, dict(batch, image=preprocess(hu, c)))
  assert float(from_hu["loss"]) == pytest.approx(float(from_float["loss"]), rel=1e-6)


def test_checkpoint_round_trip_is_bitwise(tmp_path, tiny_state):
  c, state = tiny_state
  state, _ = jax.jit(make_train_step(c))(state, _batch())
  ckpt = Checkpointer(str(tmp_path), keep=2)
  ckpt.save(1, state, {"position": 7}, c)
  ckpt.wait()
  step, restored, data_state = ckpt.restore_latest(create_train_state(c, jax.random.key(5)))
  ckpt.close()
  assert step == 1 and data_state == {"position": 7}
  got, want = jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)
  assert len(got) == len(want)
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want))


def test_checkpoints_keep_the_last_k_and_the_best(tmp_path, tiny_state):
  c, state = tiny_state
  ckpt = Checkpointer(str(tmp_path), keep=2)
  for step, dsc in [(1, 0.5), (2, 0.9), (3, None), (4, 0.7), (5, None)]:
    ckpt.save(step, state, {}, c, metrics=None if dsc is None else {"liver_dsc": dsc})
    ckpt.wait()
  assert ckpt.steps() == [2, 4, 5]
  assert ckpt.best_step() == 2
  ckpt.close()


def test_a_resumed_run_ranks_checkpoints_saved_before_it_without_metrics(tmp_path, tiny_state):
  c, state = tiny_state
  first = Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2):
    first.save(step, state, {}, c)
    first.wait()
  first.close()
  resumed = Checkpointer(str(tmp_path), keep=2)   # reads steps 1 and 2 back from disk
  for step, dsc in [(3, 0.8), (4, None), (5, None)]:
    resumed.save(step, state, {}, c, metrics=None if dsc is None else {"liver_dsc": dsc})
    resumed.wait()
  assert resumed.steps() == [3, 4, 5]
  assert resumed.best_step() == 3
  resumed.close()


def test_load_returns_the_config_and_variables(tmp_path, tiny_state):
  c, state = tiny_state
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(3, state, {}, c)
  ckpt.close()
  config, variables, step = load_variables(str(tmp_path))
  assert step == 3 and tuple(config.model.features) == (4, 8)
  np.testing.assert_array_equal(variables["params"]["output"]["kernel"],
                                state.params["output"]["kernel"])


def test_the_weight_average_follows_its_recurrence_and_is_what_a_run_evaluates(tmp_path):
  c = base_config()
  c.model.features = (4, 8)
  c.train.learning_rate = 1e-2
  c.train.ema_decay = 0.9
  state = create_train_state(c, jax.random.key(0))
  init = state.params
  step = jax.jit(make_train_step(c))
  want = jax.tree_util.tree_map(lambda p: np.asarray(p, np.float64), init)
  scale = float(np.max(np.abs(init["output"]["kernel"])))
  for k in range(4):
    state, _ = step(state, _batch(seed=k))
    d = min(0.9, (2.0 + k) / (11.0 + k))   # n = k + 1 updates so far
    want = jax.tree_util.tree_map(lambda w, p: d * w + (1 - d) * np.asarray(p, np.float64),
                                  want, state.params)
    scale = max(scale, float(np.max(np.abs(state.params["output"]["kernel"]))))
  got = state.ema_params["output"]["kernel"]
  ref = want["output"]["kernel"]
  # a float32 recurrence of 4 steps, three roundings each (two products, a sum) of
  # values no larger than `scale`, plus the decay's own rounding
  tol = 4 * 4 * np.finfo(np.float32).eps * scale
  np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=tol)
  assert not np.allclose(np.asarray(got), np.asarray(state.params["output"]["kernel"]))
  # The averaged network's batch norm: fitted by a step with ema_stats, on that batch.
  batch = _batch(seed=9)
  fitted, _ = jax.jit(make_train_step(c, ema_stats=True))(state, batch)
  from munet_jax.models import from_config
  _, updates = from_config(c).apply(
      {"params": fitted.ema_params, "batch_stats": state.ema_batch_stats}, batch["image"],
      train=True, sample_mask=batch["mask"], mutable=["batch_stats"],
      rngs={"dropout": jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key),
                                          state.step)})
  # Means and variances of 4 x 16 x 16 values per channel, summed in another order
  # inside the jitted step: float32 sums of n terms round to n * eps of their scale.
  n = batch["image"].size
  for a, b in zip(jax.tree_util.tree_leaves(fitted.ema_batch_stats),
                  jax.tree_util.tree_leaves(updates["batch_stats"])):
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, rtol=0,
                               atol=n * np.finfo(np.float32).eps * float(np.max(np.abs(b))))
  # One program with a flag (what the trainer compiles) computes both steps, bitwise.
  flagged = jax.jit(make_train_step(c, ema_stats=None))
  for flag, fixed in ((True, fitted), (False, step(state, batch)[0])):
    got, _ = flagged(state, batch, np.bool_(flag))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(fixed)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  unfitted, _ = step(state, batch)   # without ema_stats they stay as they were
  for a, b in zip(jax.tree_util.tree_leaves(unfitted.ema_batch_stats),
                  jax.tree_util.tree_leaves(state.ema_batch_stats)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(fitted.ema_batch_stats),
      jax.tree_util.tree_leaves(fitted.batch_stats)))
  evaluated = variables_of(fitted)
  np.testing.assert_array_equal(np.asarray(evaluated["params"]["output"]["kernel"]),
                                np.asarray(fitted.ema_params["output"]["kernel"]))
  for a, b in zip(jax.tree_util.tree_leaves(evaluated["batch_stats"]),
                  jax.tree_util.tree_leaves(fitted.ema_batch_stats)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(5, fitted, {}, c)
  ckpt.close()
  _, variables, _ = load_variables(str(tmp_path))
  for a, b in zip(jax.tree_util.tree_leaves(variables),
                  jax.tree_util.tree_leaves(variables_of(fitted))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_averaged_batch_norm_is_fitted_in_the_steps_before_each_checkpoint():
  c = base_config()
  c.train.ema_decay = 0.99
  c.train.steps = 100
  c.train.ema_stats_steps = 3
  c.checkpoint.every_steps = 40
  c.train.eval_every_steps = 25
  fitted = [d for d in range(1, 101) if ema_stats_steps(d, c, validating=True)]
  assert fitted == [23, 24, 25, 38, 39, 40, 48, 49, 50, 73, 74, 75, 78, 79, 80, 98, 99, 100]
  fitted = [d for d in range(1, 101) if ema_stats_steps(d, c, validating=False)]
  assert fitted == [38, 39, 40, 78, 79, 80, 98, 99, 100]
  c.train.ema_decay = 0.0
  assert not any(ema_stats_steps(d, c, validating=True) for d in range(1, 101))


def test_without_an_average_the_state_holds_no_extra_arrays(tiny_state):
  c, state = tiny_state
  assert c.train.ema_decay == 0.0 and state.ema_params is None and state.ema_batch_stats is None
  leaves = jax.tree_util.tree_leaves(state)
  bare = jax.tree_util.tree_leaves((state.step, state.params, state.opt_state,
                                    state.batch_stats, state.dropout_key))
  assert len(leaves) == len(bare)
  np.testing.assert_array_equal(np.asarray(variables_of(state)["params"]["output"]["kernel"]),
                                np.asarray(state.params["output"]["kernel"]))


def test_load_which_best_without_metrics_warns_and_names_the_step(tmp_path, tiny_state, caplog):
  c, state = tiny_state
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(2, state, {}, c)
  ckpt.save(4, state, {}, c)
  ckpt.close()
  with caplog.at_level("WARNING"):
    _, _, step = load_variables(str(tmp_path), "best")
  assert step == 4
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and "using the newest (step 4)" in warnings[0], warnings
  with pytest.raises(UserError, match="which must be one of"):
    load_variables(str(tmp_path), "newest")


def test_reading_a_run_logs_nothing(tmp_path, tiny_state, caplog):
  c, state = tiny_state
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(1, state, {}, c, metrics={"liver_dsc": 0.5})
  ckpt.close()
  with caplog.at_level("INFO"):
    load_variables(str(tmp_path), "best")
  assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == []


@pytest.fixture(scope="module")
def device_trajectories(tmp_path_factory):
  """({run: losses}, {run: final weights}) of tests/helpers/device_trajectory.py: sound
  runs under "n" / "a->b", runs with padding counted as real under "broken:..."."""
  out = tmp_path_factory.mktemp("devices") / "finals.npz"
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                                   "--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "helpers",
                                                      "device_trajectory.py"), str(out)],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), dict(np.load(out))


def _runs(trajectories, finals, prefix):
  n = len(prefix)
  keep = [k for k in trajectories if k.startswith(prefix) and ":" not in k[n:]]
  return {k[n:]: trajectories[k] for k in keep}, {k[n:]: finals[k] for k in keep}


# Bounds for float64 runs (tests/helpers/device_trajectory.py says why float64). Device
# counts change only the order of sums of at most 15*16*16 terms, so each gradient moves
# by at most ~4e3 * 1.1e-16 of its terms' absolute sum (~1 here): ~5e-13. Adam can scale
# a gradient that is zero but for rounding by lr / eps = 1e-3 / 1e-8, so a weight moves
# by at most ~5e-8 a step, 2e-7 over 4 steps. Counting one padding row (loss weight 1/16,
# batch statistics shifted by its image of 50) moves weights by ~1 and the loss by ~1e-3.
PARAM_BOUND = 1e-6
LOSS_RTOL = 1e-6


def _departures(trajectories, finals):
  """The runs whose loss or final weights leave the one-device run's by more than the bounds."""
  reference = np.asarray(trajectories["1"])
  return sorted(n for n in trajectories
                if np.max(np.abs(np.asarray(trajectories[n]) - reference) / np.abs(reference))
                > LOSS_RTOL or np.abs(finals[n] - finals["1"]).max() > PARAM_BOUND)


@pytest.mark.slow
@pytest.mark.xdist_group("device_trajectories")   # one worker: the helper runs once
def test_same_trajectory_on_1_2_3_4_and_8_devices_and_resumed_on_another_count(device_trajectories):
  trajectories, finals = _runs(*device_trajectories, "")
  assert set(trajectories) == {"1", "2", "3", "4", "8", "4->1", "1->8", "8->3", "2->4"}
  assert _departures(trajectories, finals) == []


@pytest.mark.slow
@pytest.mark.xdist_group("device_trajectories")
def test_the_device_equivalence_bound_catches_a_padding_row_counted_as_real(device_trajectories):
  trajectories, finals = _runs(*device_trajectories, "broken:")
  # 15 rows pad to 16 on 2, 4 and 8 devices (not on 3); each resume touches one of them.
  assert _departures(trajectories, finals) == ["1->8", "2", "2->4", "4", "4->1", "8", "8->3"]


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_the_single_process_run(tmp_path):
  script = os.path.join(ROOT, "tests", "helpers", "multiprocess_trajectory.py")
  single = subprocess.run([sys.executable, script, str(tmp_path / "one.npz")],
                          capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-2000:]
  coordinator = f"localhost:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, script, str(tmp_path / f"two{i}.npz"), coordinator,
                             "2", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
  one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two0.npz")
  assert int(two["devices"]) == 2
  np.testing.assert_allclose(two["loss"], one["loss"], rtol=LOSS_RTOL)
  assert np.abs(two["params"] - one["params"]).max() < PARAM_BOUND   # float64: see above
