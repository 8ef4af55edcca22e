"""Drop-in layers that compute what Flax's do, faster on a CPU.

Each layer keeps the variable names, shapes and initialisers of the Flax layer
it replaces, so checkpoints and parameter counts do not change, and
`tests/test_fast_layers.py` checks values and gradients against the plain
layer. `hc_jax.models` switches them in through its layer factories.

* `BatchNorm`: `nn.BatchNorm` whose training-mode backward pass is the
  closed-form one (a `jax.custom_vjp`) instead of autodiff through the mean,
  the variance and the normalisation: fewer passes over the activations.
* `SingleChannelConv3x3`: a 3x3 'SAME' convolution of a one-channel image as
  nine shifted multiply-adds, which XLA fuses into one loop; on the CPU this
  is much faster than its convolution for one input channel. The backward
  pass is the convolution's own (`jax.vjp` of `lax.conv_general_dilated`).
"""

import functools
from typing import Any

from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp

Initializer = Any


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


def _conv_3x3_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The plain convolution (what `nn.Conv(padding='SAME')` computes)."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@jax.custom_vjp
def single_channel_conv_3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 'SAME' convolution of one-channel images, as shifted multiply-adds.

  Args:
    x: images, `[batch, height, width, 1]`.
    kernel: `[3, 3, 1, features]`.

  Returns:
    `[batch, height, width, features]`, equal (up to float rounding) to
    `lax.conv_general_dilated(x, kernel, (1, 1), 'SAME')` in NHWC/HWIO.
  """
  _, height, width, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = None
  for row in range(3):
    for col in range(3):
      term = padded[:, row:row + height, col:col + width, :] * kernel[row, col, 0]
      out = term if out is None else out + term
  return out


def _single_channel_conv_forward(x, kernel):
  return single_channel_conv_3x3(x, kernel), (x, kernel)


def _single_channel_conv_backward(residuals, dy):
  x, kernel = residuals
  return jax.vjp(_conv_3x3_same, x, kernel)[1](dy)


single_channel_conv_3x3.defvjp(_single_channel_conv_forward,
                               _single_channel_conv_backward)


class SingleChannelConv3x3(nn.Module):
  """`nn.Conv(features, (3, 3), padding='SAME')` for one-channel input.

  Same variables (`kernel` `[3, 3, 1, features]`, `bias`) and initialisers
  as `nn.Conv`'s defaults, so it initialises to the same values under the same
  name and key.

  Attributes:
    features: number of output channels.
    kernel_init: initialiser of `kernel`.
    bias_init: initialiser of `bias`.
  """

  features: int
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Convolves `x`, `[batch, height, width, 1]`; returns `[..., features]`."""
    if x.ndim != 4 or x.shape[-1] != 1:
      raise ValueError(f'Expected one-channel images [batch, height, width, '
                       f'1], got shape {x.shape}.')
    kernel = self.param('kernel', self.kernel_init, (3, 3, 1, self.features),
                        jnp.float32)
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    return single_channel_conv_3x3(x, kernel) + bias
