"""The paper's regression CNNs: its two small custom CNNs ("263K" and "1M",
both `PaperCNN`) and two standard backbones (VGG16, ResNet50) with a one-unit
regression head (Zhang et al., MIDL 2020). `hc_jax.models` registers them.
"""

import functools
from typing import Any, ClassVar, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp

from hc_jax.nets import kinds
from hc_jax.nets import layers as layers_lib

ModuleDef = Any

# Compute dtypes a config may ask for (`config.dtype`).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _check_images(images: jax.Array) -> None:
  """Raises ValueError unless `images` is a batch `[batch, height, width, c]`.

  An unbatched or channel-less array would otherwise be silently misread by
  `nn.Conv` (e.g. `[batch, height, width]` as one image with `width` channels).
  """
  if images.ndim != 4:
    raise ValueError(
        f'Expected images of shape [batch, height, width, 1], got {images.shape}.'
    )


def _regression_output(x: jax.Array) -> jax.Array:
  """Turns the `[batch, 1]` output of the last Dense into a float32 `[batch]`."""
  return jnp.asarray(x[..., 0], jnp.float32)


class PaperCNN(nn.Module):
  """The paper's custom regression CNN, with its widths as attributes.

  For each width in `conv_features`: a 3x3 'SAME' convolution -> ReLU -> BN
  -> 2x2/2 max pool. Then Flatten, and for each width in `dense_features` a
  Dense -> ReLU, the first followed by BN -> Dropout(0.5). Then Dense(1),
  linear. BatchNorm has Keras' defaults (momentum 0.99, epsilon 1e-3), as the
  paper's networks were built in Keras.

  Layers are named `conv1`, `conv1_bn`, ..., `dense1`, `dense1_bn`,
  `dense2`, ..., `head`. The parameter count depends on the input size
  through the Flatten (see `CNN263K` and `CNN1M`).

  Attributes:
    conv_features: Output channels of each convolution block.
    dense_features: Units of each hidden Dense layer; at least one.
    layers: 'plain' or 'fast' (see `hc_jax.nets.layers`).
    dtype: Compute dtype; parameters, the head and the output stay float32.
  """

  output_kind: ClassVar[kinds.Kind] = kinds.HC  # One normalised HC per image.

  conv_features: Sequence[int]
  dense_features: Sequence[int]
  layers: str = 'plain'
  dtype: Any = jnp.float32

  def smallest_input(self) -> int:
    """The smallest height and width it takes: each block halves them, and
    the last must leave at least one pixel."""
    return 2 ** len(self.conv_features)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Predicts one value per image.

    Args:
      x: Images, `[batch, height, width, 1]`.
      train: Whether to use batch statistics and dropout.

    Returns:
      Predictions, float32 `[batch]`.
    """
    _check_images(x)
    layers = layers_lib.Layers(self.layers, self.dtype)
    for i, features in enumerate(self.conv_features, start=1):
      x = nn.relu(layers.conv(features, name=f'conv{i}')(x))
      x = layers.batch_norm(train, 0.99, 1e-3, name=f'conv{i}_bn')(x)
      x = layers.max_pool(x)
    x = x.reshape((x.shape[0], -1))
    for i, features in enumerate(self.dense_features, start=1):
      x = nn.relu(layers.dense(features, name=f'dense{i}')(x))
      if i == 1:
        x = layers.batch_norm(train, 0.99, 1e-3, name='dense1_bn')(x)
        x = nn.Dropout(0.5, deterministic=not train)(x)
    x = layers.dense(1, dtype=jnp.float32, name='head')(x)
    return _regression_output(x)


class CNN263K(PaperCNN):
  """The paper's small regression CNN ("263K" parameters).

  Conv(8), Conv(16); Dense(16) -> BN -> Dropout(0.5), Dense(8); Dense(1).

  At 128x128 (the paper's input size) the flattened features are
  32 * 32 * 16 = 16,384 and the model has 263,633 parameters (262,160 of them
  in the Dense(16)), plus 80 BatchNorm running statistics; Keras would report
  263,713 in total. 'SAME' padding is what matches the paper's name: with
  'VALID' padding the features would be 30 * 30 * 16 = 14,400 and the count
  about 232K.
  """

  conv_features: Sequence[int] = (8, 16)
  dense_features: Sequence[int] = (16, 8)


class CNN1M(PaperCNN):
  """The paper's larger regression CNN ("1M" parameters).

  Conv(16), Conv(32), Conv(64); Dense(16) -> BN -> Dropout(0.5), Dense(32),
  Dense(8); Dense(1).

  The layers are as drawn in the paper; the parameter count depends on the
  input size through the Flatten:
    * 128x128 input (the paper's stated input size, which our configs use):
      16 * 16 * 64 = 16,384 features, 286,529 parameters (about 0.29M).
    * 256x256 input: 32 * 32 * 64 = 65,536 features, 1,072,961 parameters
      (about 1.07M) - the count that the paper's name "1M" matches.
  BatchNorm running statistics (256 values) are not counted.
  """

  conv_features: Sequence[int] = (16, 32, 64)
  dense_features: Sequence[int] = (16, 32, 8)


# VGG16's convolution stack: number of filters per 3x3 conv, 'M' a 2x2 pool.
VGG16_LAYERS = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M',
                512, 512, 512, 'M', 512, 512, 512, 'M')


class VGG16(nn.Module):
  """VGG16 convolution stack with a global-average-pool regression head.

  The thirteen 3x3 'SAME' convolutions with ReLU and five 2x2/2 max pools are
  the standard VGG16 ones (named like Keras': `block1_conv1`, ...). The head is
  global average pooling -> Dense(256) -> ReLU -> Dropout(0.5) -> Dense(1),
  in float32. Global average pooling instead of VGG's Flatten + two
  Dense(4096) keeps the model usable at any input size of at least 32x32 and
  keeps the head small (131,585 parameters) for a few hundred training images.

  With one input channel the model has 14,845,121 parameters at any input
  size (14,713,536 in the convolutions); `batch_norm=True` adds 8,448.

  Attributes:
    batch_norm: Whether to put BatchNorm (Flax defaults: momentum 0.99,
      epsilon 1e-5) between each convolution and its ReLU, as in `vgg16_bn`.
    layers: 'plain' or 'fast' (see `hc_jax.nets.layers`).
    dtype: Compute dtype of the convolution stack.
  """

  output_kind: ClassVar[kinds.Kind] = kinds.HC  # One normalised HC per image.

  batch_norm: bool = False
  layers: str = 'plain'
  dtype: Any = jnp.float32

  def smallest_input(self) -> int:
    """The smallest height and width it takes: five 2x2 pools."""
    return 32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Predicts one value per image.

    Args:
      x: Images, `[batch, height, width, 1]`, height and width at least 32.
      train: Whether to use batch statistics and dropout.

    Returns:
      Predictions, float32 `[batch]`.
    """
    _check_images(x)
    layers = layers_lib.Layers(self.layers, self.dtype)
    block, conv_in_block = 1, 1
    for layer in VGG16_LAYERS:
      if layer == 'M':
        x = layers.max_pool(x)
        block, conv_in_block = block + 1, 1
        continue
      name = f'block{block}_conv{conv_in_block}'
      x = layers.conv(layer, name=name)(x)
      if self.batch_norm:
        x = layers.batch_norm(train, 0.99, 1e-5, name=f'{name}_bn')(x)
      x = nn.relu(x)
      conv_in_block += 1
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.relu(layers.dense(256, dtype=jnp.float32, name='head_hidden')(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    x = layers.dense(1, dtype=jnp.float32, name='head')(x)
    return _regression_output(x)


class BottleneckBlock(nn.Module):
  """ResNet bottleneck block: 1x1, 3x3, 1x1 convolutions.

  The stride is on the 3x3 convolution (v1.5) or, with `v1=True`, on the
  first 1x1 convolution (v1, as in Keras' ResNet50).

  Sub-layers are named like Keras' ResNet50 (`1_conv`, `1_bn`, ..., with the
  projection shortcut `0_conv`, `0_bn`), so that joining a parameter path with
  '_' gives the Keras layer name, e.g. `conv2_block1` / `1_conv` ->
  `conv2_block1_1_conv`.

  Attributes:
    filters: Width of the bottleneck; the block outputs `4 * filters` channels.
    conv: Convolution module factory (bias-free, compute dtype bound).
    norm: BatchNorm module factory (train mode and dtype bound).
    strides: Strides of the block: of its 3x3 convolution (or, with `v1`, of
      its first 1x1 convolution) and of the projection shortcut.
    v1: Whether to put the stride on the first 1x1 convolution.
  """

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: tuple[int, int] = (1, 1)
  v1: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block.

    Args:
      x: Feature maps, `[batch, height, width, channels]`.

    Returns:
      Feature maps, `[batch, height / stride, width / stride, 4 * filters]`.
    """
    residual = x
    strides_1x1, strides_3x3 = ((self.strides, (1, 1)) if self.v1
                                else ((1, 1), self.strides))
    y = self.conv(self.filters, (1, 1), strides_1x1, name='1_conv')(x)
    y = nn.relu(self.norm(name='1_bn')(y))
    y = self.conv(self.filters, (3, 3), strides_3x3, name='2_conv')(y)
    y = nn.relu(self.norm(name='2_bn')(y))
    y = self.conv(self.filters * 4, (1, 1), name='3_conv')(y)
    # Zero-initialised scale: each block starts as the identity (Goyal et al.).
    y = self.norm(scale_init=nn.initializers.zeros_init(), name='3_bn')(y)
    if residual.shape != y.shape:
      residual = self.conv(
          self.filters * 4, (1, 1), self.strides, name='0_conv')(residual)
      residual = self.norm(name='0_bn')(residual)
    return nn.relu(residual + y)


class ResNet50(nn.Module):
  """ResNet50 (v1.5) with a one-unit regression head.

  As in Flax's `examples/imagenet/models.py`: a 7x7/2 stem convolution, BN,
  ReLU and a 3x3/2 max pool; bottleneck stages of [3, 4, 6, 3] blocks with the
  stride on the 3x3 convolution (v1.5); bias-free convolutions; BatchNorm with
  momentum 0.9 and epsilon 1e-5; global average pooling; Dense(1).

  Layer names follow Keras' `ResNet50` (`conv1_conv`, `conv1_bn`,
  `conv2_block1/1_conv`, ...) to ease importing its ImageNet weights. Keras'
  convolutions have biases where these do not: a bias just before BatchNorm
  cancels in training and folds into the running mean in evaluation
  (`mean - bias`). Keras' ResNet50 is v1 (stride on the first 1x1
  convolution) with BatchNorm epsilon 1.001e-5; the kernel shapes are the
  same, and `keras_v1=True` makes the model compute what Keras' does with the
  same weights (see `hc_jax.nets.pretrained`). The stem pool pads one pixel on each
  side, like Keras' `ZeroPadding2D(1)` before its pool.

  With one input channel the model has 23,503,809 parameters at any input size.

  Attributes:
    dtype: Compute dtype (e.g. `jnp.bfloat16`); parameters stay float32 and the
      output is always float32.
    stage_sizes: Number of bottleneck blocks per stage.
    keras_v1: Whether to place the strides (on the first 1x1 convolution of a
      block) and set the BatchNorm epsilon (1.001e-5) like Keras' ResNet50, for
      its pretrained weights. Same parameters either way.
    layers: 'plain' or 'fast' (see `hc_jax.nets.layers`).
  """

  output_kind: ClassVar[kinds.Kind] = kinds.HC  # One normalised HC per image.

  dtype: Any = jnp.float32
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  keras_v1: bool = False
  layers: str = 'plain'

  def smallest_input(self) -> int:
    """The smallest height and width it takes: an overall stride of 32."""
    return 32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Predicts one value per image.

    Args:
      x: Images, `[batch, height, width, 1]`.
      train: Whether to use batch statistics.

    Returns:
      Predictions, float32 `[batch]`.
    """
    _check_images(x)
    layers = layers_lib.Layers(self.layers, self.dtype)
    conv = functools.partial(layers.conv, use_bias=False)
    norm = functools.partial(layers.batch_norm, train, 0.9,
                             1.001e-5 if self.keras_v1 else 1e-5)
    x = conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name='conv1_conv')(x)
    x = nn.relu(norm(name='conv1_bn')(x))
    x = layers.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = (2, 2) if stage > 0 and block == 0 else (1, 1)
        x = BottleneckBlock(
            64 * 2**stage, conv=conv, norm=norm, strides=strides,
            v1=self.keras_v1, name=f'conv{stage + 2}_block{block + 1}')(x)
    # The pooled features and the linear head in float32 whatever the compute
    # dtype: a bfloat16 output would be rounded to 2**-8 of the target scale
    # (about 2 px of HC).
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = layers.dense(1, dtype=jnp.float32, name='head')(x)
    return _regression_output(x)
