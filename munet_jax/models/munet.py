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
    x = nn.Conv(self.features, (3, 3), padding="SAME", dtype=self.dtype,
                kernel_init=_kernel_init(self.init_std),
                bias_init=nn.initializers.constant(self.bias_init))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     dtype=self.dtype)(x, mask=mask)
    x = nn.PReLU()(x)
    if self.use_dropout:
      x = RowwiseDropout(self.dropout_rate)(x, deterministic=not train)
    return x


class EncoderStage(nn.Module):
  """Two ConvBlocks; with residual learning, a shortcut around them (1x1 when widths differ)."""
  features: int
  residual: bool
  block: functools.partial

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
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

  @nn.compact
  def __call__(self, x, pooled):
    u = nn.ConvTranspose(x.shape[-1], (3, 3), strides=(2, 2), padding="SAME", dtype=self.dtype,
                         kernel_init=_kernel_init(self.init_std),
                         bias_init=nn.initializers.constant(self.bias_init))(pooled)
    u = nn.PReLU()(u)
    self.sow("intermediates", "upsampled", u)
    return x - u


class SkipConnection(nn.Module):
  """Skip path of stage s: optional ODU residual, then optional Conv3x3 + BN + PReLU (Table I)."""
  odu_residual: bool
  skip_conv: bool
  block: functools.partial

  @nn.compact
  def __call__(self, x, pooled, *, train: bool, mask=None):
    self.sow("intermediates", "before_residual", x)
    r = x
    if self.odu_residual:
      r = ObjectDependentUpsampling(self.block.keywords["init_std"], self.block.keywords["bias_init"],
                                    self.block.keywords["dtype"], name="odu")(x, pooled)
    self.sow("intermediates", "after_residual", r)
    if self.skip_conv:
      r = self.block(x.shape[-1], use_dropout=False, name="conv")(r, train=train, mask=mask)
    return r


class DecoderStage(nn.Module):
  """TConv2x2/2 + PReLU (halves the width), concatenate the skip, two ConvBlocks."""
  features: int
  block: functools.partial

  @nn.compact
  def __call__(self, x, skip, *, train: bool, mask=None):
    kw = self.block.keywords
    x = nn.ConvTranspose(self.features, (2, 2), strides=(2, 2), padding="SAME", dtype=kw["dtype"],
                         kernel_init=_kernel_init(kw["init_std"]),
                         bias_init=nn.initializers.constant(kw["bias_init"]))(x)
    x = nn.PReLU()(x)
    x = jnp.concatenate([skip, x.astype(skip.dtype)], axis=-1)
    x = self.block(self.features)(x, train=train, mask=mask)
    return self.block(self.features)(x, train=train, mask=mask)


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
    multiple = 2 ** (len(self.features) - 1)
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    x = images.astype(self.dtype)
    if pad_h or pad_w:
      x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                      (0, 0)), mode="edge")
    mask = None if sample_mask is None else sample_mask.reshape(n, 1, 1, 1)

    block = functools.partial(ConvBlock, dropout_rate=self.dropout_rate,
                              bn_momentum=self.bn_momentum, init_std=self.init_std,
                              bias_init=self.bias_init, dtype=self.dtype)
    skips = []
    for s, width in enumerate(self.features):
      x = EncoderStage(width, self.residual_learning, block, name=f"encoder_{s + 1}")(
          x, train=train, mask=mask)
      if s == len(self.features) - 1:
        break
      pooled = nn.max_pool(x, (2, 2), strides=(2, 2))
      skips.append(SkipConnection(self.odu_residual, self.skip_conv, block, name=f"skip_{s + 1}")(
          x, pooled, train=train, mask=mask))
      x = pooled

    for s in reversed(range(len(skips))):
      x = DecoderStage(self.features[s], block, name=f"decoder_{s + 1}")(
          x, skips[s], train=train, mask=mask)

    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                     kernel_init=_kernel_init(self.init_std),
                     bias_init=nn.initializers.constant(self.bias_init), name="output")(x)
    logits = logits[:, pad_h // 2:pad_h // 2 + h, pad_w // 2:pad_w // 2 + w, :]
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32))   # float64 stays


def from_config(config) -> MUNet:
  """The model a config describes (its `model` section)."""
  m = config.model
  return MUNet(num_classes=m.num_classes, features=tuple(m.features),
               dropout_rate=m.dropout_rate, bn_momentum=m.bn_momentum,
               odu_residual=m.odu_residual, skip_conv=m.skip_conv,
               residual_learning=m.residual_learning, init_std=m.init_std,
               bias_init=m.bias_init, dtype=jnp.dtype(m.dtype))
