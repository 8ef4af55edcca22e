"""HCNet: small from-scratch CNNs for head circumference, fast on a CPU.

A stack of convolution blocks (3x3 'SAME' convolution -> BatchNorm -> ReLU ->
2x2/2 max pool), by default of 16, 32, 64, 128 and 128 channels, then a head:

* 'flatten': Flatten -> Dense(`hidden`) -> ReLU -> Dropout(`dropout`) ->
  Dense(out). No BatchNorm in the head. The parameter count depends on the
  input size through the Flatten.
* 'gap': global average pooling -> Dense(out); any input size, the same
  parameters.

`dilated=True` gives the last block's convolution a dilation of 2 (a 5x5
receptive field with 3x3 weights), widening the view of the deepest features
at no cost in parameters.

Two variants, registered in `hc_jax.models.MODELS`:

* `HCNet` ('hcnet'): one output per image, the normalised HC (HC in px of
  the original image over the run's normaliser, the largest training HC).
  With `bounded=True` (the default) the output is
  `BOUND_LOW + (BOUND_HIGH - BOUND_LOW) * sigmoid(z)`, so no input can make it
  leave [0.05, 1.25] of the normaliser. On HC18 the normalised HC of the
  training images lies in 0.25-1.0 (1786.5 px the largest), and a 1.1 zoom
  of the augmentation moves it to at most 1.1: the upper bound keeps 1.1 off
  the flat end of the sigmoid, the lower one is 5x below the smallest head.
  An unbounded linear head can answer far outside (the paper's heads gave a
  negative HC on a real scan).
* `HCNetEllipse` ('hcnet_ellipse'): six raw outputs per image, decoded by
  `hc_jax.nets.ellipse_head.decode` into an ellipse in model-input pixels, from
  which the HC is computed in the graph (see `hc_jax.nets.ellipse_head`).

Both take `[batch, height, width, 1]` images of any height and width that
survive the pools (at least 32 for five blocks); 128x192 keeps HC18's
800x540 aspect. The convolutions, BatchNorms, pools and denses come from
`hc_jax.nets.layers.Layers`, so 'fast' uses the CPU-tuned layers. BatchNorm has
momentum 0.99 and epsilon 1e-3 (Keras' defaults, as the paper's CNNs).
"""

from typing import Any, ClassVar, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp

from hc_jax.nets import kinds
from hc_jax.nets import layers as layers_lib

HEADS = ('flatten', 'gap')
# The bounded label output lies in [BOUND_LOW, BOUND_HIGH] x the normaliser.
BOUND_LOW = 0.05
BOUND_HIGH = 1.25
# Raw outputs of the ellipse variant: cx, cy, a, b, cos 2θ, sin 2θ.
ELLIPSE_OUTPUTS = 6


class HCNetError(ValueError):
  """A model setting or an input the network cannot take."""


class Backbone(nn.Module):
  """The convolution blocks and the head, with `outputs` linear units.

  Attributes:
    outputs: Units of the last Dense layer (float32, no activation).
    widths: Output channels of each convolution block.
    head: 'flatten' or 'gap'.
    hidden: Units of the flatten head's hidden Dense layer.
    dropout: Dropout rate of the flatten head.
    dilated: Whether the last block's convolution has dilation 2.
    layers: 'plain' or 'fast' (see `hc_jax.nets.layers`).
    dtype: Compute dtype; parameters, the head and the output stay float32.
  """

  outputs: int
  widths: Sequence[int] = (16, 32, 64, 128, 128)
  head: str = 'flatten'
  hidden: int = 64
  dropout: float = 0.3
  dilated: bool = False
  layers: str = 'plain'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Returns float32 `[batch, outputs]` for images `[batch, H, W, 1]`."""
    if self.head not in HEADS:
      raise HCNetError(f'head must be one of {", ".join(HEADS)}; got '
                       f'{self.head!r}')
    if x.ndim != 4:
      raise HCNetError('expected images of shape [batch, height, width, 1], '
                       f'got {x.shape}')
    smallest = 2 ** len(self.widths)
    if min(x.shape[1:3]) < smallest:
      raise HCNetError(f'{len(self.widths)} blocks need an input of at least '
                       f'{smallest}x{smallest} px, got {x.shape[1]}x'
                       f'{x.shape[2]}')
    layers = layers_lib.Layers(self.layers, self.dtype)
    last = len(self.widths)
    for i, width in enumerate(self.widths, start=1):
      dilation = (2, 2) if self.dilated and i == last else (1, 1)
      # No bias: the BatchNorm right after would cancel it.
      x = layers.conv(width, use_bias=False, kernel_dilation=dilation,
                      name=f'conv{i}')(x)
      x = layers.batch_norm(train, 0.99, 1e-3, name=f'conv{i}_bn')(x)
      x = layers.max_pool(nn.relu(x))
    x = x.astype(jnp.float32)
    if self.head == 'gap':
      x = jnp.mean(x, axis=(1, 2))
    else:
      x = x.reshape((x.shape[0], -1))
      x = nn.relu(layers.dense(self.hidden, dtype=jnp.float32,
                               name='hidden')(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return layers.dense(self.outputs, dtype=jnp.float32, name='head')(x)


class _HCNetFields(nn.Module):
  """The fields both HCNets share (see `Backbone`)."""

  widths: Sequence[int] = (16, 32, 64, 128, 128)
  head: str = 'flatten'
  hidden: int = 64
  dropout: float = 0.3
  dilated: bool = False
  layers: str = 'plain'
  dtype: Any = jnp.float32

  def smallest_input(self) -> int:
    """The smallest height and width it takes: each block halves them, and
    the last must leave at least one pixel (`Backbone` checks it too)."""
    return 2 ** len(self.widths)


def _backbone(model: _HCNetFields, outputs: int) -> Backbone:
  """The model's `Backbone` with `outputs` values per image (call it inside
  the model's compact `__call__`)."""
  return Backbone(outputs, model.widths, model.head, model.hidden,
                  model.dropout, model.dilated, model.layers, model.dtype,
                  name='backbone')


class HCNet(_HCNetFields):
  """The label-only HCNet: the normalised HC of each image.

  Attributes:
    widths, head, hidden, dropout, dilated, layers, dtype: as for `Backbone`.
    bounded: Whether the output is squashed into [BOUND_LOW, BOUND_HIGH].
  """

  output_kind: ClassVar[kinds.Kind] = kinds.HC
  bounded: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Predicts the normalised HC.

    Args:
      x: Images, `[batch, height, width, 1]`.
      train: Whether to use batch statistics and dropout.

    Returns:
      float32 `[batch]`.
    """
    z = _backbone(self, 1)(x, train)[:, 0]
    if self.bounded:
      return BOUND_LOW + (BOUND_HIGH - BOUND_LOW) * jax.nn.sigmoid(z)
    return z


class HCNetEllipse(_HCNetFields):
  """The ellipse HCNet: six raw values per image for `ellipse_head.decode`.

  Any raw values decode to a valid ellipse; the model declares its kind,
  'ellipse', and `hc_jax.training.train` computes the HC from the ellipse.

  Attributes:
    widths, head, hidden, dropout, dilated, layers, dtype: as for `Backbone`.
  """

  output_kind: ClassVar[kinds.Kind] = kinds.ELLIPSE

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Predicts the raw ellipse values.

    Args:
      x: Images, `[batch, height, width, 1]`.
      train: Whether to use batch statistics and dropout.

    Returns:
      float32 `[batch, 6]`: raw centre x, centre y, semi-axis a, semi-axis b,
      cos 2θ, sin 2θ (see `hc_jax.nets.ellipse_head.decode`).
    """
    return _backbone(self, ELLIPSE_OUTPUTS)(x, train)
