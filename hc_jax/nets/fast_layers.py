"""Drop-in layers that compute what Flax's do, faster on a CPU.

Each keeps the variable names, shapes and initialisers of the Flax layer it
replaces, so checkpoints and parameter counts do not change, and
`tests/test_fast_layers.py` checks values and gradients against the plain
layer. Models get them through `hc_jax.nets.layers.Layers('fast')`, never directly.

* `max_pool_2x2`: 2x2/2 max pooling as a reshape and a max, with a
  hand-written backward pass (`nn.max_pool`'s gradients, ties included).
* `BatchNorm`: `nn.BatchNorm` whose training-mode backward pass is the
  closed-form one (a `jax.custom_vjp`) instead of autodiff through the mean,
  the variance and the normalisation: fewer passes over the activations.
* `conv_general_dilated`: for `nn.Conv(conv_general_dilated=...)`, which keeps
  `nn.Conv`'s variables and arithmetic and swaps only the primitive: 1x1
  convolutions become matrix products, convolutions of one-channel images
  shifted multiply-adds, narrow convolutions (at most 16 channels in and out)
  are computed with their output channels padded to `NARROW_PADDED_FEATURES`
  (forward pass and input gradient), and large convolutions get their kernel
  gradient from im2col and a matrix product.
"""

import functools
import math
import operator
from typing import Any

from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp

Initializer = Any


def _pool_windows(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H//2, 2, W//2, 2, C], an odd last row/column dropped."""
  batch, height, width, channels = x.shape
  x = x[:, :height // 2 * 2, :width // 2 * 2, :]
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 and no padding (Keras' `MaxPooling2D()`).

  Written as a reshape and a max, with a hand-written backward pass that sends
  each window's gradient to its first maximum, as `nn.max_pool` (XLA's
  select-and-scatter) and Keras do, ties included. The same values and
  gradients as `nn.max_pool`, and on the CPU over 10x faster with its
  backward pass. (Plain autodiff through the reshaped max shares tied
  gradients by dividing by the tie count, which is slower and gave NaNs with
  `jax_disable_most_optimizations`.)

  Args:
    x: Feature maps, `[batch, height, width, channels]`. An odd height or width
      is floored, as in Keras.

  Returns:
    Pooled feature maps, `[batch, height // 2, width // 2, channels]`.
  """
  return _pool_windows(x).max(axis=(2, 4))


def _max_pool_2x2_forward(x):
  windows = _pool_windows(x)
  return windows.max(axis=(2, 4)), (x.shape, windows)


def _max_pool_2x2_backward(residuals, pooled_grad):
  shape, windows = residuals
  batch, rows, _, cols, _, channels = windows.shape
  flat = windows.transpose(0, 1, 3, 5, 2, 4).reshape(
      batch, rows, cols, channels, 4)
  first_max = jnp.argmax(flat, axis=-1)
  grad = jnp.where(first_max[..., None] == jnp.arange(4),
                   pooled_grad[..., None], jnp.zeros((), pooled_grad.dtype))
  grad = grad.reshape(batch, rows, cols, channels, 2, 2).transpose(
      0, 1, 4, 2, 5, 3).reshape(batch, rows * 2, cols * 2, channels)
  grad = jnp.pad(grad, ((0, 0), (0, shape[1] - rows * 2),
                        (0, shape[2] - cols * 2), (0, 0)))
  return (grad,)


max_pool_2x2.defvjp(_max_pool_2x2_forward, _max_pool_2x2_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Normalises `x` with its batch statistics over all but the last axis.

  Computes in float32 whatever the dtype of `x`, as `nn.BatchNorm` does; the
  variance is `E[x^2] - E[x]^2` clipped at zero (Flax's fast variance).

  Args:
    x: activations, `[..., features]`.
    scale: `[features]`.
    bias: `[features]`.
    epsilon: added to the variance.

  Returns:
    (normalised float32 activations `(x - mean) / sqrt(var + epsilon) * scale
    + bias`, batch mean, batch variance).
  """
  return _batch_norm_forward(x, scale, bias, epsilon)[0]


def _float32_or_wider(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _batch_norm_forward(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  x32 = _float32_or_wider(x)
  mean = x32.mean(axes)
  var = jnp.maximum(0.0, (x32 * x32).mean(axes) - mean * mean)
  inv = lax.rsqrt(var + epsilon)
  y = (x32 - mean) * (inv * scale) + bias
  return (y, mean, var), (x, mean, inv, scale)


def _batch_norm_backward(epsilon, residuals, cotangents):
  """Closed-form gradient: two reductions and one elementwise pass over x."""
  del epsilon
  x, mean, inv, scale = residuals
  dy, dmean, dvar = cotangents
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  centred = _float32_or_wider(x) - mean
  dy = dy.astype(centred.dtype)
  dbias = dy.sum(axes)
  dscale = (dy * centred).sum(axes) * inv
  # Through the normalisation, the batch mean and the batch variance ...
  dx = (scale * inv) * (dy - dbias / count - centred * (inv * dscale / count))
  # ... plus the cotangents of the returned statistics (zero in training,
  # where they only feed the running averages).
  dx = dx + dmean / count + centred * (2.0 * dvar / count)
  return dx.astype(x.dtype), dscale, dbias


batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_backward)


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over the last axis, with a closed-form backward pass.

  The same variables ('params': `scale`, `bias`; 'batch_stats': `mean`,
  `var`), initialisers and arithmetic as `nn.BatchNorm` with its defaults
  (fast variance, float32 statistics, no `axis_name`); the running averages
  are not updated while initialising, as there.

  Attributes:
    use_running_average: normalise with the running statistics (evaluation)
      rather than the batch's (training, which also updates them).
    momentum: decay of the running averages.
    epsilon: added to the variance.
    dtype: dtype of the output; None for float32 (or wider, like `x`).
    scale_init: initialiser of `scale`.
    bias_init: initialiser of `bias`.
  """

  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  scale_init: Initializer = nn.initializers.ones
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises `x`, `[..., features]`; returns the same shape."""
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean',
                            lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable('batch_stats', 'var',
                           lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param('scale', self.scale_init, features, jnp.float32)
    bias = self.param('bias', self.bias_init, features, jnp.float32)
    if self.use_running_average:
      y = ((_float32_or_wider(x) - ra_mean.value)
           * (lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias)
    else:
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
      if not self.is_initializing():
        ra_mean.value = (self.momentum * ra_mean.value
                         + (1 - self.momentum) * mean)
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(self.dtype or y.dtype)


_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _explicit_padding(padding, in_shape, kernel_shape, strides):
  """Padding as ((top, bottom), (left, right)), as `lax` resolves it."""
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(in_shape, kernel_shape, strides, padding))
  return tuple(tuple(pair) for pair in padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _single_channel_conv(x, kernel, strides, padding, precision):
  """Convolution of one-channel images as kh * kw shifted multiply-adds."""
  del precision  # Elementwise products and sums are exact float ops.
  taps = kernel.reshape(-1, kernel.shape[-1])  # [kh * kw, features].
  windows = _windows(x, kernel.shape[:2], strides, padding)
  return functools.reduce(operator.add, (
      window * tap for window, tap in zip(windows, taps)))


def _single_channel_conv_forward(x, kernel, strides, padding, precision):
  return (_single_channel_conv(x, kernel, strides, padding, precision),
          (x, kernel))


def _single_channel_conv_backward(strides, padding, precision, residuals, dy):
  """The backward pass of the plain convolution."""
  x, kernel = residuals
  conv = lambda x, kernel: lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=_NHWC,
      precision=precision)
  return jax.vjp(conv, x, kernel)[1](dy)


_single_channel_conv.defvjp(_single_channel_conv_forward,
                            _single_channel_conv_backward)


# XLA's CPU convolution computes the kernel gradient slowly once the work
# (batch * output pixels * input channels * output channels) is large: 2-4x
# slower than im2col + one matrix product for VGG16's layers at batch 8, and
# faster below this size (ResNet50's 3x3 layers, the custom CNNs).
IM2COL_KERNEL_GRAD_MIN_WORK = 5 * 10**8
# Largest im2col patch matrix built; beyond it the kernel gradient is one
# matrix product per kernel tap instead (slower, but without the big copy).
IM2COL_MAX_BYTES = 2**30


def _windows(x, kernel_shape, strides, padding):
  """The shifted, strided views of padded `x`, one per kernel tap."""
  (kh, kw), (sh, sw) = kernel_shape, strides
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out_h = (x.shape[1] - kh) // sh + 1
  out_w = (x.shape[2] - kw) // sw + 1
  return [x[:, row:row + (out_h - 1) * sh + 1:sh,
            col:col + (out_w - 1) * sw + 1:sw, :]
          for row in range(kh) for col in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_im2col_kernel_grad(x, kernel, strides, padding, precision):
  """An NHWC/HWIO convolution whose kernel gradient is a matrix product."""
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=_NHWC, precision=precision)


def _conv_im2col_forward(x, kernel, strides, padding, precision):
  return (_conv_im2col_kernel_grad(x, kernel, strides, padding, precision),
          (x, kernel))


def _conv_im2col_backward(strides, padding, precision, residuals, dy):
  x, kernel = residuals
  dx = jax.vjp(lambda x: lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=_NHWC,
      precision=precision), x)[1](dy)[0]
  windows = _windows(x, kernel.shape[:2], strides, padding)
  over_pixels = (((0, 1, 2), (0, 1, 2)), ((), ()))
  patch_bytes = len(windows) * windows[0].size * windows[0].dtype.itemsize
  if patch_bytes <= IM2COL_MAX_BYTES:
    patches = jnp.concatenate(windows, axis=-1)  # [N, H', W', kh * kw * C].
    dkernel = lax.dot_general(patches, dy, over_pixels, precision=precision)
  else:
    dkernel = jnp.stack([lax.dot_general(w, dy, over_pixels,
                                         precision=precision)
                         for w in windows])
  return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


_conv_im2col_kernel_grad.defvjp(_conv_im2col_forward, _conv_im2col_backward)


# XLA:CPU hands a convolution to its fast library (YNNPACK) only when it has
# more than 16 input or output channels; narrower ones run on a generic
# convolution several times slower per FLOP (hcnet_mask's full-resolution 8-
# and 16-channel layers: about 40 % of its training step). Computed with the
# kernel's output channels zero-padded to this many and the padding sliced
# off, the same convolution takes YNNPACK's path: 1.5-2x faster for the
# forward pass and the input gradient despite the extra output channels
# (docs/benchmarks.md). The kernel gradient stays XLA's own: through
# YNNPACK, with the whole image as its window, it is slower.
NARROW_MAX_FEATURES = 16
NARROW_PADDED_FEATURES = NARROW_MAX_FEATURES + 1


def _conv_padded_features(x, kernel, padding, precision):
  """A stride-1 NHWC/HWIO convolution with the kernel's output channels
  zero-padded to `NARROW_PADDED_FEATURES` and sliced off after: the same
  values. (Padding the input channels instead, which needs no slice, was no
  faster.)"""
  features = kernel.shape[-1]
  extra = max(NARROW_PADDED_FEATURES - features, 0)
  kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, 0), (0, extra)))
  y = lax.conv_general_dilated(x, kernel, (1, 1), padding,
                               dimension_numbers=_NHWC, precision=precision)
  return y[..., :features]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _narrow_conv(x, kernel, padding, precision):
  """A stride-1 convolution of at most `NARROW_MAX_FEATURES` channels in and
  out, through the library path (`_conv_padded_features`)."""
  return _conv_padded_features(x, kernel, padding, precision)


def _narrow_conv_forward(x, kernel, padding, precision):
  return _narrow_conv(x, kernel, padding, precision), (x, kernel)


def _narrow_conv_backward(padding, precision, residuals, dy):
  """The input gradient as the transposed convolution (the kernel flipped,
  its channel axes swapped, the padding complemented), padded as the forward
  pass; the kernel gradient as the plain convolution's."""
  x, kernel = residuals
  taps = kernel.shape[:2]
  flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
  transposed = tuple((size - 1 - low, size - 1 - high)
                     for size, (low, high) in zip(taps, padding))
  dx = _conv_padded_features(dy, flipped, transposed, precision)
  dkernel = jax.vjp(lambda kernel: lax.conv_general_dilated(
      x, kernel, (1, 1), padding, dimension_numbers=_NHWC,
      precision=precision), kernel)[1](dy)[0]
  return dx, dkernel


_narrow_conv.defvjp(_narrow_conv_forward, _narrow_conv_backward)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, precision=None, **kwargs):
  """`lax.conv_general_dilated` with faster CPU paths for special cases.

  Pass it to `nn.Conv(conv_general_dilated=...)`. For NHWC images and HWIO
  kernels, without dilation or feature groups:

  * a 1x1 convolution (any stride, 'SAME' or 'VALID') is a strided slice and
    one `lax.dot_general` over the channels. On the CPU the matrix product
    and its gradients are faster than XLA's convolution (kernel gradient
    1.3-6x), which needs transposed copies of the activations.
  * a one-input-channel convolution with stride 1 and at most 3x3 taps is
    `kh * kw` shifted multiply-adds, which XLA fuses into one loop (about 3x
    faster than XLA's convolution for the first 3x3 layer of the CNNs and
    VGG16); its backward pass is the convolution's own. (ResNet50's 7x7/2
    stem was slower this way, so it stays a convolution.)
  * a narrow convolution (stride 1, at most `NARROW_MAX_FEATURES` channels in
    and out, padding no wider than the kernel) runs its forward pass and
    input gradient with the output channels zero-padded to
    `NARROW_PADDED_FEATURES`, which XLA:CPU hands to YNNPACK (1.5-2x faster
    than its generic convolution for hcnet_mask's 8- and 16-channel layers);
    the kernel gradient is XLA's own.
  * a large convolution (`IM2COL_KERNEL_GRAD_MIN_WORK`) keeps XLA's forward
    pass and input gradient, but its kernel gradient is im2col patches times
    the output gradient, one matrix product: 2-4x faster than XLA's for
    VGG16's layers.

  Everything else goes to `lax.conv_general_dilated` unchanged.

  Args:
    lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
    dimension_numbers, feature_group_count, precision, **kwargs: as for
      `lax.conv_general_dilated`.

  Returns:
    What `lax.conv_general_dilated` returns, up to float rounding.
  """
  plain = lambda: lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)
  special = (
      lhs.ndim == 4 and not kwargs and feature_group_count == 1
      and all(d == 1 for d in (lhs_dilation or (1, 1)))
      and all(d == 1 for d in (rhs_dilation or (1, 1)))
      and dimension_numbers is not None
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                     dimension_numbers) == _NHWC)
  if not special:
    return plain()
  strides = tuple(window_strides)
  pads = _explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], strides)
  if rhs.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0)):
    sliced = lhs[:, ::strides[0], ::strides[1], :]
    return lax.dot_general(sliced, rhs[0, 0], (((3,), (0,)), ((), ())),
                           precision=precision)
  taps = rhs.shape[0] * rhs.shape[1]
  if lhs.shape[3] == 1 and strides == (1, 1) and taps <= 9:
    return _single_channel_conv(lhs, rhs, strides, pads, precision)
  if (strides == (1, 1)
      and max(lhs.shape[3], rhs.shape[3]) <= NARROW_MAX_FEATURES
      and all(low <= size - 1 and high <= size - 1
              for size, (low, high) in zip(rhs.shape[:2], pads))):
    return _narrow_conv(lhs, rhs, pads, precision)
  out_pixels = math.prod(
      (size + low + high - taps_along) // stride + 1
      for size, (low, high), taps_along, stride in zip(
          lhs.shape[1:3], pads, rhs.shape[:2], strides))
  work = lhs.shape[0] * out_pixels * rhs.shape[2] * rhs.shape[3]
  if work >= IM2COL_KERNEL_GRAD_MIN_WORK:
    return _conv_im2col_kernel_grad(lhs, rhs, strides, pads, precision)
  return plain()
