"""The mU-Net module tree: shapes, wiring, layer and parameter counts, precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
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
  assert _param_count(shapes["params"]) == 31_042_521
  assert _plain_unet_params((64, 128, 256, 512, 1024), 3) == 31_042_521


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


# Reformulations computed for speed (UpConv's sub-pixel form, max_pool_2x2) must be the
# same function as the plain layers, with the same gradients.

_U = 2.0 ** -24   # float32 unit roundoff


def _plain_transpose(x, kernel, bias):
  return jax.lax.conv_transpose(x, kernel, (2, 2), "SAME",
                                dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias


@pytest.mark.parametrize("k,c_in,c_out", [(3, 5, 4), (2, 6, 3)])
def test_subpixel_upconv_is_flax_conv_transpose_to_float32_rounding(k, c_in, c_out):
  from munet_jax.models.munet import UpConv
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, c_in))
  reference = nn.ConvTranspose(c_out, (k, k), strides=(2, 2), padding="SAME",
                               bias_init=nn.initializers.normal(1.0))
  variables = reference.init(jax.random.key(1), x)
  ours = UpConv(c_out, k, nn.initializers.lecun_normal(), nn.initializers.normal(1.0))
  # Same parameter names, shapes and initial values as the layer it replaces.
  assert _trees_equal(ours.init(jax.random.key(1), x), variables)
  p = variables["params"]
  g = jax.random.normal(jax.random.key(2), (2, 14, 12, c_out))
  y_ref, vjp_ref = jax.vjp(lambda x, w, b: reference.apply({"params": {"kernel": w, "bias": b}}, x),
                           x, p["kernel"], p["bias"])
  y, vjp = jax.vjp(lambda x, w, b: ours.apply({"params": {"kernel": w, "bias": b}}, x),
                   x, p["kernel"], p["bias"])
  # Both sum the same products in some order: each result is off the exact sum by at most
  # gamma_m * sum|terms| (gamma_m = m u / (1 - m u), m terms), so they differ by twice that.
  # sum|terms| is the plain layer evaluated on absolute values; m is bounded by the count
  # of outputs (for the kernel and bias gradients) or of kernel entries plus one.
  absolute = (jnp.abs(x), jnp.abs(p["kernel"]), jnp.abs(p["bias"]))
  y_abs, vjp_abs = jax.vjp(_plain_transpose, *absolute)
  m = max(g.size, p["kernel"].size + 1)
  gamma = m * _U / (1 - m * _U)
  assert np.all(np.abs(y - y_ref) <= 2 * gamma * y_abs)
  for ours_g, ref_g, bound in zip(vjp(g), vjp_ref(g), vjp_abs(jnp.abs(g))):
    assert ours_g.shape == ref_g.shape
    assert np.all(np.abs(ours_g - ref_g) <= 2 * gamma * bound)


def _trees_equal(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


@pytest.mark.parametrize("values", ["normal", "ties"])
def test_max_pool_2x2_is_nn_max_pool_with_the_same_gradient(values):
  from munet_jax.models.munet import max_pool_2x2
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 6, 3)) if values == "normal" else rng.integers(0, 2, (2, 8, 6, 3))
  x = jnp.asarray(x, jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, 4, 3, 3)), jnp.float32)
  y_ref, vjp_ref = jax.vjp(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), x)
  y, vjp = jax.vjp(max_pool_2x2, x)
  # A maximum is exact and the gradient only routes g: bitwise equal, ties included (a
  # window's gradient goes to its first maximum, as select-and-scatter sends it).
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])


@pytest.mark.parametrize("c_in", [1, 3])
def test_conv3x3_is_flax_conv_with_the_same_gradients(c_in):
  from munet_jax.models.munet import Conv3x3
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(2, 9, 7, c_in)))
    g = jnp.asarray(rng.normal(size=(2, 9, 7, 5)))
    theirs = nn.Conv(5, (3, 3), padding="SAME", dtype=jnp.float64,
                     bias_init=nn.initializers.normal(1.0))
    ours = Conv3x3(5, nn.initializers.lecun_normal(), nn.initializers.normal(1.0), jnp.float64)
    variables = theirs.init(jax.random.key(1), x)
    assert _trees_equal(ours.init(jax.random.key(1), x), variables)
    y, vjp = jax.vjp(lambda x, v: ours.apply(v, x), x, variables)
    y_ref, vjp_ref = jax.vjp(lambda x, v: theirs.apply(v, x), x, variables)
    # float64, nine or 9 * c_in products summed in another order: about 1e-15 of the
    # values; a wrong tap or shift is of their order.
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-12)
    for a, b in zip(jax.tree.leaves(vjp(g)), jax.tree.leaves(vjp_ref(g))):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


class _FlaxBatchNormPReLU(nn.Module):
  """The composition munet_jax's BatchNorm computes in one piece."""
  prelu: bool

  @nn.compact
  def __call__(self, x, mask=None):
    x = nn.BatchNorm(use_running_average=False, momentum=0.9, dtype=x.dtype,
                     name="BatchNorm_0")(x, mask=mask)
    return nn.PReLU(name="PReLU_0")(x) if self.prelu else x


class _OurBatchNormPReLU(nn.Module):
  prelu: bool

  @nn.compact
  def __call__(self, x, mask=None):
    from munet_jax.models.munet import BatchNorm, PReLUSlope
    slope = PReLUSlope(name="PReLU_0")() if self.prelu else None
    return BatchNorm(use_running_average=False, momentum=0.9, dtype=x.dtype,
                     name="BatchNorm_0")(x, mask=mask, negative_slope=slope)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("prelu", [False, True])
def test_batch_norm_prelu_is_flax_batch_norm_then_prelu_with_the_same_gradients(masked, prelu):
  rng = np.random.default_rng(0)
  x = rng.normal(0.5, 3.0, size=(5, 6, 7, 4))
  mask = None
  if masked:   # padding rows hold junk that must not reach the statistics
    x[3:] = 1e3
    mask = np.array([True, True, True, False, False]).reshape(5, 1, 1, 1)
  with jax.enable_x64(True):
    x = jnp.asarray(x)
    ours, theirs = _OurBatchNormPReLU(prelu), _FlaxBatchNormPReLU(prelu)
    variables = theirs.init(jax.random.key(0), x)
    assert _trees_equal(ours.init(jax.random.key(0), x), variables)
    params = {"BatchNorm_0": {"scale": jnp.asarray(rng.normal(1.0, 0.3, 4)),
                              "bias": jnp.asarray(rng.normal(size=4))}}
    if prelu:
      params["PReLU_0"] = {"negative_slope": jnp.asarray(0.2)}
    stats = {"BatchNorm_0": {"mean": jnp.asarray(rng.normal(size=4)),
                             "var": jnp.asarray(rng.uniform(0.5, 2, 4))}}

    def run(module, x, params):
      return module.apply({"params": params, "batch_stats": stats}, x, mask,
                          mutable=["batch_stats"])

    (y, new), vjp = jax.vjp(lambda x, p: run(ours, x, p), x, params)
    (y_ref, new_ref), vjp_ref = jax.vjp(lambda x, p: run(theirs, x, p), x, params)
    # float64, the same sums in another order: about 1e-13 of the values here; a wrong
    # count, a masked row in the statistics or a missing term is of the values' order.
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-9)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.allclose(a, b, rtol=1e-9, atol=0),
                                     new, new_ref))
    # Cotangents for the output and for the new running statistics (which depend on x).
    cotangent = (jnp.asarray(rng.normal(size=x.shape)),
                 jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), new))
    (g_x, g_p), (g_x_ref, g_p_ref) = vjp(cotangent), vjp_ref(cotangent)
    np.testing.assert_allclose(g_x, g_x_ref, rtol=0, atol=1e-9 * float(jnp.abs(g_x_ref).max()))
    flat, flat_ref = traverse_util.flatten_dict(g_p), traverse_util.flatten_dict(g_p_ref)
    assert flat.keys() == flat_ref.keys()
    for k in flat:
      np.testing.assert_allclose(flat[k], flat_ref[k], rtol=1e-9, err_msg="/".join(k))
    if masked:   # even an infinite padding row stays out (a select, not a product)
      _, inf_new = run(ours, x.at[4].set(jnp.inf), params)
      assert _trees_equal(inf_new, new)


def test_batch_norm_prelu_in_bfloat16_rounds_only_its_results():
  from munet_jax.models.munet import BatchNorm, PReLUSlope
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(3, 6, 5, 4)), jnp.bfloat16)
  g = jnp.asarray(rng.normal(size=x.shape), jnp.bfloat16)

  class Block(nn.Module):
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
      slope = PReLUSlope(0.2)()
      return BatchNorm(use_running_average=False, dtype=self.dtype)(x, negative_slope=slope)

  variables = Block(jnp.float32).init(jax.random.key(0), x)
  outs = {}
  for dtype, inp in ((jnp.bfloat16, x), (jnp.float32, x.astype(jnp.float32))):
    (z, _), vjp = jax.vjp(lambda v: Block(dtype).apply(v, inp, mutable=["batch_stats"]), variables)
    z_x, vjp_x = jax.vjp(lambda x: Block(dtype).apply(variables, x, mutable=["batch_stats"])[0], inp)
    outs[dtype] = (z, vjp_x(g.astype(z.dtype))[0])
  (z16, gx16), (z32, gx32) = outs[jnp.bfloat16], outs[jnp.float32]
  assert z16.dtype == gx16.dtype == jnp.bfloat16
  # The same float32 arithmetic on the same (bfloat16) input and cotangent; only the
  # results are rounded to bfloat16 (unit roundoff 2**-8), plus float32 noise of sums
  # the two programs may order differently.
  u = 2.0 ** -8
  for ours, ref in ((z16, z32), (gx16, gx32)):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.abs(ours - ref) <= u * np.abs(ref) + 1e-5 * np.abs(ref).max())


def test_batch_norm_evaluation_uses_the_running_statistics_as_flax_does():
  from munet_jax.models.munet import BatchNorm
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5, 5, 3)), jnp.float32)
  variables = {"params": {"scale": jnp.asarray(rng.normal(1.0, 0.3, 3), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=3), jnp.float32)},
               "batch_stats": {"mean": jnp.asarray(rng.normal(size=3), jnp.float32),
                               "var": jnp.asarray(rng.uniform(0.5, 2, 3), jnp.float32)}}
  ours = BatchNorm(use_running_average=True, dtype=jnp.float32).apply(variables, x)
  theirs = nn.BatchNorm(use_running_average=True, dtype=jnp.float32).apply(variables, x)
  np.testing.assert_array_equal(ours, theirs)   # the same operations in the same order


def test_reformulated_munet_has_the_same_parameters_and_computes_the_same_function():
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
  fast, plain = (MUNet(features=(4, 8, 16), dropout_rate=0.0, reformulated=r)
                 for r in (True, False))
  variables = fast.init(jax.random.key(0), x)
  assert _trees_equal(variables, plain.init(jax.random.key(0), x))
  # In float64 the two differ only by summation order, about 1e-13 of the values here;
  # any wrong tap or shift in a reformulation is of the order of the values themselves.
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    x64 = jnp.asarray(x, jnp.float64)
    labels = jax.random.randint(jax.random.key(2), (2, 16, 16), 0, 3)

    def loss(model, params):
      # The output layer's own result: the model casts its logits to float32.
      _, state = model.clone(dtype=jnp.float64).apply(
          {**v64, "params": params}, x64, train=True, mutable=["batch_stats", "intermediates"],
          capture_intermediates=lambda mdl, _: mdl.name == "output")
      logits = state["intermediates"]["output"]["__call__"][0]
      return jnp.mean((jax.nn.softmax(logits) - jax.nn.one_hot(labels, 3)) ** 2), logits

    (_, out_fast), g_fast = jax.jit(jax.value_and_grad(lambda p: loss(fast, p), has_aux=True))(
        v64["params"])
    (_, out_plain), g_plain = jax.jit(jax.value_and_grad(lambda p: loss(plain, p), has_aux=True))(
        v64["params"])
    assert out_fast.dtype == jnp.float64
    np.testing.assert_allclose(out_fast, out_plain, rtol=0, atol=1e-9 * float(jnp.abs(out_plain).max()))
    # Against the largest gradient: a bias before batch norm has an exact gradient of 0,
    # so its computed value is rounding noise of the other terms.
    flat_fast, flat_plain = (traverse_util.flatten_dict(g) for g in (g_fast, g_plain))
    scale = max(float(jnp.abs(v).max()) for v in flat_plain.values())
    for path, value in flat_plain.items():
      np.testing.assert_allclose(flat_fast[path], value, rtol=0, atol=1e-9 * scale,
                                 err_msg="/".join(path))


def test_remat_keeps_the_parameters_and_gives_the_same_gradients():
  x = jax.random.normal(jax.random.key(1), (3, 16, 16, 1))
  mask = jnp.array([True, True, False])
  plain, remat = (MUNet(features=(4, 8, 16), dropout_rate=0.2, remat=r) for r in (False, True))
  variables = plain.init(jax.random.key(0), x)
  assert _trees_equal(variables, remat.init(jax.random.key(0), x))

  def grads(model):
    def loss(params):
      out, _ = model.apply({**variables, "params": params}, x, train=True, sample_mask=mask,
                           mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)})
      return jnp.sum(out[:2] ** 2)
    return jax.jit(jax.grad(loss))(variables["params"])

  # Recomputing runs the same operations on the same inputs (dropout keys included), but
  # XLA may fuse and order the float32 sums differently: each sum here has at most
  # m = 3 * 16 * 16 terms, and two orders differ by at most 2 m u (u = 2^-24, ~9e-5) of
  # the sum of |terms|. 1e-4 of the largest gradient; a miswired stage is off by O(1).
  fast, ref = (traverse_util.flatten_dict(grads(m)) for m in (remat, plain))
  assert fast.keys() == ref.keys()
  scale = max(float(jnp.abs(v).max()) for v in ref.values())
  for path, value in ref.items():
    np.testing.assert_allclose(fast[path], value, rtol=0, atol=1e-4 * scale,
                               err_msg="/".join(path))
