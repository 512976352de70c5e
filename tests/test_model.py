"""The mU-Net module tree: shapes, wiring, layer and parameter counts, precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import munet_jax
from munet_jax.models import MUNet


def _shapes(model, x):
  """Variable shapes without compiling or running anything (counts need only shapes)."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def _count_prelu(params) -> int:
  flat = traverse_util.flatten_dict(params)
  return sum(1 for path in flat if path[-1] == "negative_slope")


def _param_count(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("shape", [(32, 32), (17, 23), (1, 1), (64, 40), (33, 7)])
def test_logits_have_the_input_size_for_any_height_and_width(tiny_config, tiny_variables, shape):
  variables = tiny_variables
  images = jnp.zeros((2, *shape, 1))
  logits = munet_jax.apply(variables, images, tiny_config)
  assert logits.shape == (2, *shape, tiny_config.model.num_classes)
  assert logits.dtype == jnp.float32


def test_munet_with_five_stages_has_the_papers_30_activations():
  model = MUNet(features=(2, 2, 2, 2, 2))
  variables = _shapes(model, jnp.zeros((1, 16, 16, 1)))
  # 10 encoder + 4 ODU + 4 skip + 4 decoder up-sampling + 8 decoder convolutions.
  assert _count_prelu(variables["params"]) == 30


def test_plain_unet_with_five_stages_has_22_activations():
  model = MUNet(features=(2, 2, 2, 2, 2), odu_residual=False, skip_conv=False)
  variables = _shapes(model, jnp.zeros((1, 16, 16, 1)))
  assert _count_prelu(variables["params"]) == 22


def _plain_unet_params(features, num_classes, in_channels=1):
  """Parameters of Fig. 1a, counted by hand: conv3x3 (+bias), BN scale+bias, one PReLU slope."""
  def block(c_in, c_out):
    return 9 * c_in * c_out + c_out + 2 * c_out + 1
  total, c_in = 0, in_channels
  for f in features:
    total += block(c_in, f) + block(f, f)
    c_in = f
  for s in reversed(range(len(features) - 1)):
    f, f_below = features[s], features[s + 1]
    total += 4 * f_below * f + f + 1               # TConv 2x2 stride 2 + PReLU
    total += block(2 * f, f) + block(f, f)
  return total + features[0] * num_classes + num_classes


def test_both_changes_off_gives_a_plain_unet_with_the_expected_parameter_count():
  features = (4, 8, 16, 32)
  model = MUNet(features=features, odu_residual=False, skip_conv=False, residual_learning=False)
  variables = _shapes(model, jnp.zeros((1, 16, 16, 1)))
  assert _param_count(variables["params"]) == _plain_unet_params(features, 3)


def test_table_one_widths_give_the_known_unet_size():
  # The conventional U-Net with 64..1024 widths and batch norm has 31,042,521 parameters.
  model = MUNet(odu_residual=False, skip_conv=False, residual_learning=False)
  shapes = _shapes(model, jnp.zeros((1, 16, 16, 1)))
  assert _param_count(shapes["params"]) == _plain_unet_params((64, 128, 256, 512, 1024), 3)


def test_mu_net_changes_add_one_tconv3x3_and_one_conv3x3_per_skip():
  features = (4, 8, 16, 32)
  kwargs = dict(features=features, residual_learning=False)
  plain = MUNet(odu_residual=False, skip_conv=False, **kwargs)
  full = MUNet(odu_residual=True, skip_conv=True, **kwargs)
  x = jnp.zeros((1, 16, 16, 1))
  n_plain = _param_count(_shapes(plain, x)["params"])
  n_full = _param_count(_shapes(full, x)["params"])
  odu = sum(9 * f * f + f + 1 for f in features[:-1])           # TConv3x3 + bias + PReLU
  skip = sum(9 * f * f + f + 2 * f + 1 for f in features[:-1])  # conv3x3 + bias + BN + PReLU
  assert n_full - n_plain == odu + skip


def _odu_zeroed(variables, bias=0.0):
  params = traverse_util.flatten_dict(jax.device_get(variables["params"]))
  for path in list(params):
    if "odu" in path:
      value = params[path]
      if path[-1] == "negative_slope":
        params[path] = np.zeros_like(value)
      elif path[-1] == "bias":
        params[path] = np.full_like(value, bias)
      else:
        params[path] = np.zeros_like(value)
  return {**variables, "params": traverse_util.unflatten_dict(params)}


def _skip_intermediates(model, variables, images):
  _, state = model.apply(variables, images, mutable=["intermediates"])
  return state["intermediates"]


def test_odu_with_zero_deconvolution_passes_x_unchanged_to_the_skip():
  model = MUNet(features=(4, 8, 16))
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
  variables = _odu_zeroed(model.init(jax.random.key(0), images))
  inter = _skip_intermediates(model, variables, images)
  for stage in ("skip_1", "skip_2"):
    before = inter[stage]["before_residual"][0]
    after = inter[stage]["after_residual"][0]
    np.testing.assert_array_equal(after, before)


def test_odu_subtracts_the_upsampled_map():
  # Zero kernel and a bias of 0.3: u = PReLU(0.3) = 0.3 everywhere, so r = x - 0.3.
  model = MUNet(features=(4, 8, 16))
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
  variables = _odu_zeroed(model.init(jax.random.key(0), images), bias=0.3)
  inter = _skip_intermediates(model, variables, images)
  before = inter["skip_1"]["before_residual"][0]
  after = inter["skip_1"]["after_residual"][0]
  np.testing.assert_allclose(after, before - 0.3, rtol=0, atol=1e-6)


def test_upsampled_map_has_the_skip_features_shape():
  model = MUNet(features=(4, 8, 16))
  images = jnp.ones((1, 16, 16, 1))
  inter = _skip_intermediates(model, model.init(jax.random.key(0), images), images)
  assert inter["skip_1"]["odu"]["upsampled"][0].shape == (1, 16, 16, 4)
  assert inter["skip_2"]["odu"]["upsampled"][0].shape == (1, 8, 8, 8)


def test_without_odu_the_skip_carries_x():
  model = MUNet(features=(4, 8, 16), odu_residual=False)
  images = jax.random.normal(jax.random.key(1), (1, 16, 16, 1))
  inter = _skip_intermediates(model, model.init(jax.random.key(0), images), images)
  np.testing.assert_array_equal(inter["skip_1"]["after_residual"][0],
                                inter["skip_1"]["before_residual"][0])
  assert "odu" not in inter["skip_1"]


def test_initialisation_follows_section_two_e():
  model = MUNet(features=(8, 16))
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  flat = traverse_util.flatten_dict(params)
  kernels = np.concatenate([np.ravel(v) for p, v in flat.items() if p[-1] == "kernel"])
  biases = [v for p, v in flat.items() if p[-1] == "bias" and "BatchNorm_0" not in p]
  assert abs(kernels.std() - 0.05 * 0.88) < 0.01  # truncated at 2 std: std shrinks by ~0.88
  assert np.abs(kernels).max() <= 0.1 + 1e-6
  assert all(np.all(b == np.float32(0.1)) for b in biases)


def test_jit_compiles_apply(tiny_config, tiny_variables):
  variables = tiny_variables
  fn = jax.jit(lambda v, x: munet_jax.apply(v, x, tiny_config))
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 1))
  np.testing.assert_allclose(fn(variables, x), munet_jax.apply(variables, x, tiny_config),
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32(tiny_config, tiny_variables):
  variables = tiny_variables
  x = jax.random.normal(jax.random.key(3), (2, 32, 32, 1))
  ref = munet_jax.apply(variables, x, tiny_config)
  tiny_config.model.dtype = "bfloat16"
  low = munet_jax.apply(variables, x, tiny_config)
  assert low.dtype == jnp.float32
  assert jax.tree_util.tree_leaves(variables["params"])[0].dtype == jnp.float32
  scale = float(jnp.abs(ref).max())
  assert float(jnp.abs(low - ref).max()) < 0.05 * scale
  assert not np.array_equal(np.asarray(low), np.asarray(ref))  # bf16 really was used


def test_train_mode_uses_dropout_and_needs_a_key(tiny_config, tiny_variables):
  variables = tiny_variables
  x = jax.random.normal(jax.random.key(3), (2, 32, 32, 1))
  with pytest.raises(ValueError, match="rng"):
    munet_jax.apply(variables, x, tiny_config, train=True)
  a = munet_jax.apply(variables, x, tiny_config, train=True, rng=jax.random.key(1))
  b = munet_jax.apply(variables, x, tiny_config, train=True, rng=jax.random.key(2))
  assert not np.allclose(a, b)


def test_masked_rows_do_not_change_batch_statistics():
  model = MUNet(features=(4, 8), dropout_rate=0.0)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  variables = model.init(jax.random.key(0), x)
  junk = 100.0 * jnp.ones((2, 8, 8, 1))
  padded = jnp.concatenate([x, junk])
  mask = jnp.array([True, True, True, False, False])
  out_ref, st_ref = model.apply(variables, x, train=True, mutable=["batch_stats"])
  out_pad, st_pad = model.apply(variables, padded, train=True, sample_mask=mask,
                                mutable=["batch_stats"])
  np.testing.assert_allclose(out_pad[:3], out_ref, rtol=1e-4, atol=1e-4)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         st_pad, st_ref)
