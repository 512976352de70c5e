"""mU-Net (Seo et al., IEEE TMI): a U-Net whose skip connections carry object-dependent features.

One module tree serves three networks, chosen by two switches (for ablations):
  odu_residual=False, skip_conv=False: the conventional U-Net (Fig. 1a),
  odu_residual=True,  skip_conv=False: U-Net with only the residual path,
  odu_residual=True,  skip_conv=True:  mU-Net (Fig. 1b, Table I).

Images are NHWC. Any height and width works: the input is edge-padded to a multiple of
2**(stages-1) and the logits are cropped back to the input's size.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _kernel_init(std: float):
  # Section II.E: truncated normal, mean 0, std 0.05.
  return nn.initializers.truncated_normal(stddev=std)


class RowwiseDropout(nn.Module):
  """Dropout whose mask for batch row i depends only on (key, i).

  The trainer pads a global batch (15 slices on 4 devices become 16); with one mask per
  row, the real rows see the same dropout whatever the padding, so training follows the
  same trajectory on any number of devices.
  """
  rate: float

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    key = self.make_rng("dropout")
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x.shape[0]))
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - self.rate, x.shape[1:]))(keys)
    return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """nn.max_pool(x, (2, 2), strides=(2, 2)) for even H and W, with the same gradient.

  XLA's CPU backend computes the pooling gradient (select-and-scatter) through index
  arrays and window reductions; a reshape and an elementwise mask are cheaper. As with
  select-and-scatter, a window's gradient goes to its first maximum in row-major order.

  Args:
    x: (N, H, W, C), H and W even.

  Returns:
    (N, H/2, W/2, C).
  """
  return _max_pool_fwd(x)[0]


def _windows(x):
  n, h, w, c = x.shape
  x = x.reshape(n, h // 2, 2, w // 2, 2, c)
  return [x[:, :, i, :, j] for i in (0, 1) for j in (0, 1)]   # row-major window order


def _max_pool_fwd(x):
  a, b, c, d = _windows(x)
  return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d)), x


def _max_pool_bwd(x, g):
  a, b, c, d = _windows(x)
  m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
  seen = a == m
  grads = [jnp.where(seen, g, 0)]
  for v in (b, c, d):
    first = (v == m) & ~seen
    grads.append(jnp.where(first, g, 0))
    seen = seen | first
  n, h, w, ch = g.shape
  dx = jnp.stack(grads, axis=3).reshape(n, h, w, 2, 2, ch).transpose(0, 1, 3, 2, 4, 5)
  return (dx.reshape(n, 2 * h, 2 * w, ch).astype(x.dtype),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


# Sub-pixel form of a stride-2 SAME transposed convolution (lax.conv_transpose, kernel not
# flipped, as flax uses it). Along one axis output 2p+a is a sum over input taps p-1+u of
# the padded input; _PHASE_TAPS[k][a][u] names the kernel row that tap uses (k means zero).
# k=3 (input padded by 1 before): y[2p] = k0 x[p-1] + k2 x[p], y[2p+1] = k1 x[p].
# k=2 (no padding): y[2p] = k1 x[p], y[2p+1] = k0 x[p].
_PHASE_TAPS = {3: np.array([[0, 2], [3, 1]]), 2: np.array([[1], [0]])}
_PHASE_PAD = {3: (1, 0), 2: (0, 0)}


def subpixel_conv_transpose(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`lax.conv_transpose(x, kernel, (2, 2), "SAME")` as a conv to 4*out channels + depth-to-space.

  XLA's CPU backend computes the weight gradient of a transposed convolution as a slow
  dilated convolution; the stride-1 form here has an ordinary one. Same sums of products
  (the k=3 form multiplies 7 of its 16 taps by zero).

  Args:
    x: (N, H, W, in).
    kernel: (k, k, in, out) with k in {2, 3}, as nn.ConvTranspose stores it.

  Returns:
    (N, 2H, 2W, out).
  """
  k, _, c_in, c_out = kernel.shape
  taps = _PHASE_TAPS[k]                                       # (phase, tap)
  padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))  # row/column k is zero
  # w[a, u, b, v] = padded[taps[a, u], taps[b, v]]: phase (a, b), tap (u, v).
  w = padded[taps[:, :, None, None], taps[None, None, :, :]]
  t = taps.shape[1]
  w = w.transpose(1, 3, 4, 0, 2, 5).reshape(t, t, c_in, 4 * c_out)   # channels (a, b, out)
  pad = _PHASE_PAD[k]
  y = jax.lax.conv_general_dilated(x, w, (1, 1), (pad, pad),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  n, h, wd, _ = y.shape
  y = y.reshape(n, h, wd, 2, 2, c_out).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(n, 2 * h, 2 * wd, c_out)


class UpConv(nn.Module):
  """nn.ConvTranspose(features, (k, k), strides=(2, 2), padding="SAME"): same parameters, same function.

  `subpixel` picks how it is computed: True by `subpixel_conv_transpose` (fast on the
  CPU), False by lax.conv_transpose exactly as flax does. Parameters: kernel
  (k, k, in, features), bias (features,), so checkpoints do not care which.
  """
  features: int
  kernel_size: int
  kernel_init: nn.initializers.Initializer
  bias_init: nn.initializers.Initializer
  dtype: jnp.dtype = jnp.float32
  subpixel: bool = True

  @nn.compact
  def __call__(self, x):
    """(N, H, W, in) -> (N, 2H, 2W, features)."""
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.subpixel:
      y = subpixel_conv_transpose(x, kernel)
    else:
      y = jax.lax.conv_transpose(x, kernel, (2, 2), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _plain_conv3x3(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMENSIONS)


@jax.custom_vjp
def conv3x3_one_channel(x, kernel):
  """`_plain_conv3x3` for one input channel, as nine shifted multiply-adds.

  XLA's CPU convolution is slow with a single input channel (about 7 ms against 1 ms
  for the nine taps, 8 x 128 x 128 to 8 channels); the backward pass is the
  convolution's own.

  Args:
    x: (N, H, W, 1). kernel: (3, 3, 1, C).

  Returns:
    (N, H, W, C).
  """
  n, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # lax.slice, not indexing: with symbolic sizes (the export's any-batch, any-size
  # trace) indexing becomes a gather.
  shifted = lambda i, j: jax.lax.slice(padded, (0, i, j, 0), (n, i + h, j + w, c))
  y = shifted(0, 0) * kernel[0, 0, 0]
  for i in range(3):
    for j in range(3):
      if i or j:
        y = y + shifted(i, j) * kernel[i, j, 0]
  return y


def _conv3x3_one_channel_fwd(x, kernel):
  return conv3x3_one_channel(x, kernel), (x, kernel)


def _conv3x3_one_channel_bwd(residuals, g):
  return jax.vjp(_plain_conv3x3, *residuals)[1](g)


conv3x3_one_channel.defvjp(_conv3x3_one_channel_fwd, _conv3x3_one_channel_bwd)


class Conv3x3(nn.Module):
  """nn.Conv(features, (3, 3), padding="SAME"): same parameters, same function; a
  single input channel (the network's first layer) goes through `conv3x3_one_channel`."""
  features: int
  kernel_init: nn.initializers.Initializer
  bias_init: nn.initializers.Initializer
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    conv = conv3x3_one_channel if x.shape[-1] == 1 else _plain_conv3x3
    return conv(x, kernel) + bias


def _row_statistics(x, keep):
  """Mean and (fast, clipped) variance over (N, H, W) of the rows where keep (N,) is set."""
  n, h, w, _ = x.shape
  keep = keep.reshape(n, 1)
  count = keep.sum().astype(x.dtype) * (h * w)
  # Each row's sums first, then a select over the rows (junk rows may even hold inf).
  total = jnp.where(keep, x.sum((1, 2)), 0).sum(0)
  total_sq = jnp.where(keep, (x * x).sum((1, 2)), 0).sum(0)
  mean = total / count
  msq = total_sq / count
  return mean, jnp.maximum(0.0, msq - mean * mean), msq - mean * mean, count


def _normalise_prelu(x, mean, var, scale, bias, slope, epsilon):
  mul = jax.lax.rsqrt(var + epsilon) * scale
  y = (x - mean) * mul + bias
  return jnp.where(y >= 0, y, slope * y), y, mul


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def batch_norm_prelu(x, keep, scale, bias, slope, epsilon):
  """PReLU(batch norm of x in training mode), and the batch's mean and variance.

  The same function as flax's nn.BatchNorm (fast variance, clipped at 0) followed by
  nn.PReLU, with a hand-written backward pass: the three sums it needs (of g, of g * x
  per channel, and the slope's) and one elementwise pass for the input's gradient,
  where differentiating the composition keeps more full-size intermediates.

  Args:
    x: (N, H, W, C), any float dtype.
    keep: (N,) bool, the rows the statistics are taken over.
    scale, bias: (C,), slope: () the PReLU's negative slope (1 for no PReLU), all in
      the dtype the statistics and z are computed in (float32 or float64).
    epsilon: added to the variance.

  Returns:
    (z, mean, var): z like x; mean, var (C,).
  """
  return _batch_norm_prelu_fwd(x, keep, scale, bias, slope, epsilon)[0]


def _batch_norm_prelu_fwd(x, keep, scale, bias, slope, epsilon):
  xs = x.astype(scale.dtype)   # x stays in its own dtype among the saved values
  mean, var, raw_var, count = _row_statistics(xs, keep)
  z, _, _ = _normalise_prelu(xs, mean, var, scale, bias, slope, epsilon)
  return (z, mean, var), (x, keep, scale, bias, slope, mean, var, raw_var, count)


def _batch_norm_prelu_bwd(epsilon, residuals, cotangents):
  x, keep, scale, bias, slope, mean, var, raw_var, count = residuals
  g, g_mean, g_var = cotangents
  x_dtype, x = x.dtype, x.astype(scale.dtype)
  _, y, mul = _normalise_prelu(x, mean, var, scale, bias, slope, epsilon)
  g_y = jnp.where(y >= 0, g, slope * g)
  g_slope = jnp.where(y >= 0, 0, g * y).sum()
  s1 = g_y.sum((0, 1, 2))                     # the bias's gradient
  s2 = (g_y * (x - mean)).sum((0, 1, 2))      # the gradient of mul
  rstd = jax.lax.rsqrt(var + epsilon)
  g_scale = s2 * rstd
  # Through mul = rsqrt(var + eps) * scale into var (which jnp.maximum passes where
  # positive, halves where 0, as JAX differentiates it), and through y and var into mean.
  g_var_total = g_var - 0.5 * s2 * scale * rstd ** 3
  g_var_total = g_var_total * jnp.where(raw_var > 0, 1.0, jnp.where(raw_var == 0, 0.5, 0.0))
  g_mean_total = g_mean - mul * s1 - 2 * mean * g_var_total
  # mean = sum(x)/count, var = sum(x^2)/count - mean^2 over the kept rows.
  weight = keep.reshape(-1, 1, 1, 1).astype(x.dtype)
  g_x = g_y * mul + weight * ((g_mean_total + 2 * g_var_total * x) / count)
  return g_x.astype(x_dtype), None, g_scale, s1, g_slope


batch_norm_prelu.defvjp(_batch_norm_prelu_fwd, _batch_norm_prelu_bwd)


class BatchNorm(nn.Module):
  """nn.BatchNorm over (N, H, W), optionally followed by a PReLU: same variables and function.

  flax's masked statistics broadcast the mask to the whole activation and keep masked
  full-size copies for the backward pass; with one mask value per batch row the sums
  are taken over each row first and selected after, on (N, C) arrays. In training the
  normalisation and the PReLU are one `batch_norm_prelu`. Statistics in float32
  (float64 stays), fast variance E[x^2] - E[x]^2 clipped at 0, running averages
  `momentum * old + (1 - momentum) * new`, as flax computes them.
  Variables: params scale, bias (C,); batch_stats mean, var (C,).
  """
  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, mask=None, negative_slope=None):
    """x: (N, H, W, C); mask: None or (N, 1, 1, 1) bool, False rows left out of the
    statistics; negative_slope: a PReLU's slope applied after, or None for none."""
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    out_dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    scale, bias = scale.astype(stat_dtype), bias.astype(stat_dtype)
    slope = jnp.asarray(1.0 if negative_slope is None else negative_slope, stat_dtype)
    if self.use_running_average:
      z, _, _ = _normalise_prelu(x.astype(stat_dtype), ra_mean.value, ra_var.value, scale,
                                 bias, slope, self.epsilon)
    else:
      keep = (jnp.ones(x.shape[0], bool) if mask is None
              else mask.reshape(x.shape[0]).astype(bool))
      z, mean, var = batch_norm_prelu(x, keep, scale, bias, slope, self.epsilon)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return z.astype(out_dtype)


class PReLUSlope(nn.Module):
  """The parameter of nn.PReLU alone (negative_slope, shape (), 0.01 at first), for
  layers that apply the PReLU themselves."""
  negative_slope_init: float = 0.01

  @nn.compact
  def __call__(self):
    return self.param("negative_slope", nn.initializers.constant(self.negative_slope_init),
                      (), jnp.float32)


class ConvBlock(nn.Module):
  """Conv3x3 -> batch norm -> PReLU -> dropout: the unit every stage repeats."""
  features: int
  dropout_rate: float
  bn_momentum: float
  init_std: float
  bias_init: float
  dtype: jnp.dtype = jnp.float32
  use_dropout: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    x = Conv3x3(self.features, _kernel_init(self.init_std),
                nn.initializers.constant(self.bias_init), self.dtype, name="Conv_0")(x)
    slope = PReLUSlope(name="PReLU_0")()
    x = BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                  dtype=self.dtype, name="BatchNorm_0")(x, mask=mask, negative_slope=slope)
    if self.use_dropout:
      x = RowwiseDropout(self.dropout_rate)(x, deterministic=not train)
    return x


class EncoderStage(nn.Module):
  """Two ConvBlocks; with residual learning, a shortcut around them (1x1 when widths differ)."""
  features: int
  residual: bool
  block: functools.partial

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    y = self.block(self.features)(x, train=train, mask=mask)
    y = self.block(self.features)(y, train=train, mask=mask)
    if not self.residual:
      return y
    shortcut = x
    if x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), use_bias=False, dtype=y.dtype,
                         kernel_init=_kernel_init(self.block.keywords["init_std"]),
                         name="projection")(x)
    return y + shortcut


class ObjectDependentUpsampling(nn.Module):
  """The residual path of Fig. 1b: u = PReLU(TConv3x3/2(maxpool(x))), returns r = x - u (Eq. 2-3)."""
  init_std: float
  bias_init: float
  dtype: jnp.dtype = jnp.float32
  subpixel: bool = True

  @nn.compact
  def __call__(self, x, pooled):
    # Named as the nn.ConvTranspose it replaces, so parameter paths stay as they were.
    u = UpConv(x.shape[-1], 3, _kernel_init(self.init_std),
               nn.initializers.constant(self.bias_init), self.dtype, self.subpixel,
               name="ConvTranspose_0")(pooled)
    u = nn.PReLU()(u)
    self.sow("intermediates", "upsampled", u)
    return x - u


class SkipConnection(nn.Module):
  """Skip path of stage s: optional ODU residual, then optional Conv3x3 + BN + PReLU (Table I)."""
  odu_residual: bool
  skip_conv: bool
  block: functools.partial
  subpixel: bool = True

  @nn.compact
  def __call__(self, x, pooled, *, train: bool, mask=None):
    self.sow("intermediates", "before_residual", x)
    r = x
    if self.odu_residual:
      # The 3x3 sub-pixel form multiplies 7 of 16 taps by zero: it pays for the weight
      # gradient in training, not in inference, where the plain forward is cheaper.
      r = ObjectDependentUpsampling(self.block.keywords["init_std"], self.block.keywords["bias_init"],
                                    self.block.keywords["dtype"], self.subpixel and train,
                                    name="odu")(x, pooled)
    self.sow("intermediates", "after_residual", r)
    if self.skip_conv:
      r = self.block(x.shape[-1], use_dropout=False, name="conv")(r, train=train, mask=mask)
    return r


class DecoderStage(nn.Module):
  """TConv2x2/2 + PReLU (halves the width), concatenate the skip, two ConvBlocks."""
  features: int
  block: functools.partial
  subpixel: bool = True

  @nn.compact
  def __call__(self, x, skip, *, train: bool, mask=None):
    kw = self.block.keywords
    x = UpConv(self.features, 2, _kernel_init(kw["init_std"]),
               nn.initializers.constant(kw["bias_init"]), kw["dtype"], self.subpixel,
               name="ConvTranspose_0")(x)
    x = nn.PReLU()(x)
    x = jnp.concatenate([skip, x.astype(skip.dtype)], axis=-1)
    x = self.block(self.features)(x, train=train, mask=mask)
    return self.block(self.features)(x, train=train, mask=mask)



def pooling_factor(stages: int) -> int:
  """2**(stages - 1): a network with `stages` stages takes slices whose sides divide by it."""
  return 2 ** (stages - 1)


def padding(stages: int, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """((top, bottom), (left, right)): the edge padding that brings an (h, w) slice to a
  multiple of `pooling_factor(stages)`."""
  multiple = pooling_factor(stages)
  ph, pw = (-h) % multiple, (-w) % multiple
  return (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)

class MUNet(nn.Module):
  """mU-Net. `features` holds one width per stage; stages 1..S-1 have skip connections."""
  num_classes: int = 3
  features: Sequence[int] = (64, 128, 256, 512, 1024)
  dropout_rate: float = 0.2
  bn_momentum: float = 0.9
  odu_residual: bool = True
  skip_conv: bool = True
  residual_learning: bool = True
  init_std: float = 0.05
  bias_init: float = 0.1
  dtype: jnp.dtype = jnp.float32
  # True: stride-2 transposed convolutions in sub-pixel form (UpConv) and 2x2 max pooling
  # by reshape (max_pool_2x2), which XLA's CPU backend differentiates much faster. False:
  # lax.conv_transpose and nn.max_pool. Same parameters and function either way (tested).
  reformulated: bool = True
  # Rematerialisation: the encoder stages keep only their inputs for the backward pass and
  # recompute the rest (less memory, about one more encoder forward per step).
  remat: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool = False, sample_mask=None):
    """Logits for a batch of preprocessed slices.

    Args:
      images: (N, H, W, 1) float, after `munet_jax.preprocess`.
      train: batch statistics and dropout when True.
      sample_mask: optional (N,) bool; False rows (batch padding) are left out of the
        batch-norm statistics. Their outputs are computed but meaningless.

    Returns:
      (N, H, W, num_classes) float32 logits.
    """
    n, h, w, _ = images.shape
    (top, bottom), (left, right) = padding(len(self.features), h, w)
    x = images.astype(self.dtype)
    if top or bottom or left or right:
      x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), mode="edge")
    mask = None if sample_mask is None else sample_mask.reshape(n, 1, 1, 1)

    block = functools.partial(ConvBlock, dropout_rate=self.dropout_rate,
                              bn_momentum=self.bn_momentum, init_std=self.init_std,
                              bias_init=self.bias_init, dtype=self.dtype)
    # `train` (argument 2, counting the module) decides the graph, so it stays static.
    encoder = nn.remat(EncoderStage, static_argnums=(2,)) if self.remat else EncoderStage
    skips = []
    for s, width in enumerate(self.features):
      x = encoder(width, self.residual_learning, block, name=f"encoder_{s + 1}")(
          x, train, mask)
      if s == len(self.features) - 1:
        break
      pooled = (max_pool_2x2(x) if self.reformulated
                else nn.max_pool(x, (2, 2), strides=(2, 2)))
      skips.append(SkipConnection(self.odu_residual, self.skip_conv, block,
                                  self.reformulated, name=f"skip_{s + 1}")(
          x, pooled, train=train, mask=mask))
      x = pooled

    for s in reversed(range(len(skips))):
      x = DecoderStage(self.features[s], block, self.reformulated,
                       name=f"decoder_{s + 1}")(
          x, skips[s], train=train, mask=mask)

    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                     kernel_init=_kernel_init(self.init_std),
                     bias_init=nn.initializers.constant(self.bias_init), name="output")(x)
    logits = logits[:, top:top + h, left:left + w, :]
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32))   # float64 stays


def from_config(config) -> MUNet:
  """The model a config describes (its `model` section)."""
  m = config.model
  return MUNet(num_classes=m.num_classes, features=tuple(m.features),
               dropout_rate=m.dropout_rate, bn_momentum=m.bn_momentum,
               odu_residual=m.odu_residual, skip_conv=m.skip_conv,
               residual_learning=m.residual_learning, init_std=m.init_std,
               bias_init=m.bias_init, dtype=jnp.dtype(m.dtype), remat=m.remat)
