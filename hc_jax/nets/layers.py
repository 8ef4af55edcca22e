"""The one place where the models get their convolutions, norms, pools, denses.

Every model in `hc_jax.models` has a `layers` attribute, 'plain' or 'fast',
and builds all its layers through `Layers(layers, dtype)`:

* 'plain': Flax's own layers (`nn.Conv`, `nn.BatchNorm`, `nn.max_pool`,
  `nn.Dense`), what a GPU or TPU runs best (cuDNN, the TPU's convolutions).
* 'fast': the drop-ins of `hc_jax.nets.fast_layers`, tuned for XLA:CPU. They have
  the same variables (names, shapes, initialisers) and compute the same values
  and gradients up to float rounding, so a checkpoint trained with one loads
  into the other.

'auto' is not a layer set but a choice made once, by `resolve`: 'fast' on a CPU
backend, 'plain' on any other. `models.from_config` and `models.create_model`
resolve it, so a built model always says which layers it uses.
"""

import dataclasses
from typing import Any, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp

from hc_jax.nets import fast_layers

# The layer sets a model can be built with, and what `resolve` also accepts.
LAYER_SETS = ('plain', 'fast')
CHOICES = ('auto', *LAYER_SETS)


def resolve(layers: str) -> str:
  """Turns a layer-set setting into a concrete layer set.

  Args:
    layers: 'plain', 'fast', or 'auto' ('fast' on a CPU backend, where the
      fast layers are quicker; 'plain' on a GPU or TPU).

  Returns:
    'plain' or 'fast'.

  Raises:
    ValueError: If `layers` is none of `CHOICES`.
  """
  if layers == 'auto':
    return 'fast' if jax.default_backend() == 'cpu' else 'plain'
  if layers not in LAYER_SETS:
    raise ValueError(f'Unknown layers {layers!r}; choose one of: '
                     f'{", ".join(CHOICES)}.')
  return layers


@dataclasses.dataclass(frozen=True)
class Layers:
  """Builds a model's layers from one layer set, in one compute dtype.

  Call the builders inside a model's `@nn.compact` method: the modules they
  return become its submodules (pass `name=` to name them).

  Attributes:
    kind: 'plain' or 'fast' (see the module docstring); not 'auto', which
      `resolve` turns into one of them.
    dtype: Compute dtype of the convolutions, BatchNorms and Dense layers
      (parameters stay float32); a layer may override it, e.g. a float32 head.
  """

  kind: str = 'plain'
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.kind not in LAYER_SETS:
      hint = (" (models.create_model and models.from_config resolve 'auto')"
              if self.kind == 'auto' else '')
      raise ValueError(f'Unknown layers {self.kind!r}; a model takes one of: '
                       f'{", ".join(LAYER_SETS)}{hint}.')

  @property
  def fast(self) -> bool:
    """Whether these are the CPU-tuned layers of `hc_jax.nets.fast_layers`."""
    return self.kind == 'fast'

  def conv(self, features: int, kernel_size: Sequence[int] = (3, 3),
           strides: Sequence[int] = (1, 1), padding: Any = 'SAME',
           **kwargs) -> nn.Module:
    """An `nn.Conv` (NHWC), with the fast primitive for the 'fast' set.

    Args:
      features: Number of output channels.
      kernel_size: Kernel height and width.
      strides: Strides along height and width.
      padding: 'SAME', 'VALID' or explicit `((top, bottom), (left, right))`.
      **kwargs: Further `nn.Conv` arguments, e.g. `use_bias`, `name`, `dtype`.

    Returns:
      The convolution module; the same variables for either layer set.
    """
    kwargs.setdefault('dtype', self.dtype)
    if self.fast:
      kwargs['conv_general_dilated'] = fast_layers.conv_general_dilated
    return nn.Conv(features, tuple(kernel_size), tuple(strides),
                   padding=padding, **kwargs)

  def batch_norm(self, train: bool, momentum: float, epsilon: float,
                 **kwargs) -> nn.Module:
    """BatchNorm over the last axis: `nn.BatchNorm` or `fast_layers.BatchNorm`.

    Args:
      train: Whether to normalise with batch statistics (and update the running
        ones) rather than with the running statistics.
      momentum: Decay of the running averages.
      epsilon: Added to the variance.
      **kwargs: Further module arguments, e.g. `scale_init`, `name`, `dtype`.

    Returns:
      The BatchNorm module; the same variables for either layer set.
    """
    kwargs.setdefault('dtype', self.dtype)
    batch_norm = fast_layers.BatchNorm if self.fast else nn.BatchNorm
    return batch_norm(use_running_average=not train, momentum=momentum,
                      epsilon=epsilon, **kwargs)

  def dense(self, features: int, **kwargs) -> nn.Module:
    """An `nn.Dense` (the same for both layer sets).

    Args:
      features: Number of output units.
      **kwargs: Further `nn.Dense` arguments, e.g. `name`, `dtype`.

    Returns:
      The Dense module.
    """
    kwargs.setdefault('dtype', self.dtype)
    return nn.Dense(features, **kwargs)

  def max_pool(self, x: jax.Array, window: Sequence[int] = (2, 2),
               strides: Sequence[int] | None = None,
               padding: Any = 'VALID') -> jax.Array:
    """Max pooling of NHWC feature maps, `nn.max_pool`'s values and gradients.

    The 'fast' set computes the 2x2/2 'VALID' pool (Keras' `MaxPooling2D()`)
    with `fast_layers.max_pool_2x2`; other pools are `nn.max_pool` in both.

    Args:
      x: Feature maps, `[batch, height, width, channels]`.
      window: Pooling window height and width.
      strides: Strides; None for the window size.
      padding: 'VALID', 'SAME' or explicit `((top, bottom), (left, right))`.

    Returns:
      The pooled feature maps (an odd remainder dropped with 'VALID').
    """
    window = tuple(window)
    strides = window if strides is None else tuple(strides)
    if self.fast and window == strides == (2, 2) and padding == 'VALID':
      return fast_layers.max_pool_2x2(x)
    return nn.max_pool(x, window, strides=strides, padding=padding)
