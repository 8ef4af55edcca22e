"""Regression CNNs that map a 2D ultrasound image to a head circumference.

The architectures follow Zhang et al., "Direct estimation of fetal head
circumference from ultrasound images based on regression CNN" (MIDL 2020):
the paper's two small custom CNNs ("263K" and "1M", both `PaperCNN`) and two
standard backbones (VGG16, ResNet50) with a one-unit regression head.

Every model takes a batch of single-channel images in NHWC layout,
`[batch, height, width, 1]` (height and width need not be equal), and returns
a float32 vector `[batch]`: one linear unit with no activation, so the output
is in whatever units the targets are in (normalised head circumference in
practice).

Every model class declares its output kind (`output_kind`, a
`hc_jax.nets.kinds.Kind`: HC, ellipse or mask), which says how its outputs
become a loss, an HC, an ellipse and a quality; `kind_of` reads it.

Every model declares its smallest input, `smallest_input()` (height and
width in px, `smallest_input(model)` here): a config asking for less is
refused before any data is prepared. Every model has two further
attributes:
* `layers`: 'plain' (Flax's layers) or 'fast' (`hc_jax.nets.fast_layers`, tuned
  for XLA:CPU; the same variables, values and gradients). All layers come from
  `hc_jax.nets.layers.Layers`; `create_model` and `from_config` turn 'auto' into
  'fast' on a CPU backend and 'plain' elsewhere.
* `dtype`: the compute dtype (float32 or bfloat16). Parameters, BatchNorm
  statistics, the regression head and the output stay float32.

BatchNorm uses batch statistics when `train=True` (apply with
`mutable=['batch_stats']`) and running statistics when `train=False`. Dropout
is active only when `train=True` and then needs a 'dropout' rng.

Models are looked up by their config name in `MODELS`; `create_model` does the
lookup with a clear error for an unknown name, and `from_config` builds the
model a training config asks for.
"""

import functools
import math
from typing import Any, Callable

from flax import linen as nn
import jax
import jax.numpy as jnp

from hc_jax.nets import hcnet
from hc_jax.nets import hcnet_mask
from hc_jax.nets import kinds
from hc_jax.nets import layers as layers_lib
# The paper's models, part of this package's API.
from hc_jax.nets.paper import CNN1M  # pylint: disable=unused-import
from hc_jax.nets.paper import CNN263K  # pylint: disable=unused-import
from hc_jax.nets.paper import DTYPES
from hc_jax.nets.paper import PaperCNN  # pylint: disable=unused-import
from hc_jax.nets.paper import ResNet50  # pylint: disable=unused-import
from hc_jax.nets.paper import VGG16  # pylint: disable=unused-import


MODELS: dict[str, Callable[..., nn.Module]] = {
    'cnn_263k': CNN263K,
    'cnn_1m': CNN1M,
    'vgg16': VGG16,
    'resnet50': ResNet50,
    'hcnet': hcnet.HCNet,  # hc_jax/nets/hcnet.py: the normalised HC, bounded.
    'hcnet_ellipse': hcnet.HCNetEllipse,  # An ellipse; nets/ellipse_head.py.
    'hcnet_mask': hcnet_mask.HCNetMask,  # A head mask; nets/mask_head.py.
    # The same, trained from HC values alone (configs/hcnet_mask_label.py).
    'hcnet_mask_label': hcnet_mask.HCNetMaskLabel,
}

# The names of the output kinds (`hc_jax.nets.kinds.KINDS`).
OUTPUT_KINDS = tuple(kinds.KINDS)


def kind_of(model: Any) -> kinds.Kind:
  """The declared output kind of a model (`hc_jax.nets.kinds`): of a `MODELS`
  name, class, module or config (its `model`).

  Raises:
    ValueError: for an unknown model, or a class that declares no kind.
  """
  if isinstance(model, str):
    name = model
  elif isinstance(model, type) or isinstance(model, nn.Module):
    name = None
  else:
    name = model.model
  cls = model if isinstance(model, type) else (
      type(model) if name is None else MODELS.get(name))
  if cls is None:
    raise ValueError(f'Unknown model {name!r}; known models: '
                     f'{", ".join(sorted(MODELS))}.')
  kind = getattr(cls, 'output_kind', None)
  if isinstance(kind, str) and kind in kinds.KINDS:
    kind = kinds.KINDS[kind]
  if not isinstance(kind, kinds.Kind):
    raise ValueError(f'model {cls.__name__} declares no output_kind (a '
                     f'hc_jax.nets.kinds.Kind, e.g. one of '
                     f'{", ".join(kinds.KINDS)})')
  return kind


def output_kind(model: Any) -> str:
  """The name of a model's declared output kind ('hc', 'ellipse', 'mask');
  `kind_of` gives the kind object."""
  return kind_of(model).name


def smallest_input(model: nn.Module) -> int:
  """The smallest height and width (px) a built model takes, as its class
  declares it (`smallest_input()`); `hc_jax.training.config_check` checks a
  config's input against it before any data is prepared."""
  declared = getattr(model, 'smallest_input', None)
  if declared is None:
    raise ValueError(f'model {type(model).__name__} declares no '
                     'smallest_input()')
  return int(declared())


def create_model(name: str, layers: str = 'auto', **kwargs) -> nn.Module:
  """Builds the model registered under a config name.

  Args:
    name: A key of `MODELS`, e.g. 'cnn_263k'.
    layers: 'plain', 'fast' or 'auto' ('fast' on a CPU backend, 'plain' on
      others); see `hc_jax.nets.layers`.
    **kwargs: Further module attributes, e.g. `batch_norm=True` for 'vgg16' or
      `dtype=jnp.bfloat16`.

  Returns:
    The unbound Flax module, its `layers` 'plain' or 'fast'.

  Raises:
    ValueError: If `name` is not a key of `MODELS` or `layers` is unknown.
  """
  if name not in MODELS:
    raise ValueError(
        f'Unknown model {name!r}; known models: {", ".join(sorted(MODELS))}.')
  return MODELS[name](layers=layers_lib.resolve(layers), **kwargs)


def from_config(config: Any) -> nn.Module:
  """Builds the model a training config asks for.

  Reads `config.model` (a key of `MODELS`), `config.dtype` ('float32' or
  'bfloat16'), `config.layers` ('auto' if absent; see `create_model`) and
  `config.init_from`: when it names pretrained weights, ResNet50 is built with
  `keras_v1=True`, as Keras' weights need (see `hc_jax.nets.pretrained`).

  Args:
    config: An `ml_collections.ConfigDict`, or any object with attribute
      access and `.get(key, default)`.

  Returns:
    The unbound Flax module.

  Raises:
    ValueError: For an unknown model, dtype or layer set.
  """
  dtype = config.get('dtype', 'float32')
  if dtype not in DTYPES:
    raise ValueError(f'Unknown dtype {dtype!r}; choose one of: '
                     f'{", ".join(DTYPES)}.')
  kwargs = {'dtype': DTYPES[dtype]}
  if config.model == 'resnet50' and config.get('init_from'):
    kwargs['keras_v1'] = True  # Keras' stride placement and epsilon.
  options = config.get('model_options') or {}
  if hasattr(options, 'to_dict'):  # An ml_collections.ConfigDict.
    options = options.to_dict()
  fields = MODELS[config.model].__dataclass_fields__ if (
      config.model in MODELS) else {}
  unknown = sorted(set(options) - set(fields) - {'parent', 'name'})
  if unknown:
    known = sorted(set(fields) - {'parent', 'name', 'layers', 'dtype'})
    raise ValueError(f'model_options {unknown} are not fields of '
                     f'{config.model!r}; it has {known}')
  for key, value in options.items():
    kwargs[key] = tuple(value) if isinstance(value, list) else value
  return create_model(config.model, layers=config.get('layers', 'auto'),
                      **kwargs)


def init_variables(model: nn.Module, images: Any, key: Any = None) -> Any:
  """A model's initial variables (eval mode) from one compiled call, not op
  by op; `key` defaults to `jax.random.key(0)`."""
  key = jax.random.key(0) if key is None else key
  return jax.jit(functools.partial(model.init, train=False))(key, images)


def count_params(params: Any) -> int:
  """Counts the scalars in a pytree of arrays.

  Args:
    params: A pytree of arrays or `jax.ShapeDtypeStruct`s, e.g.
      `variables['params']` or the output of `jax.eval_shape`.

  Returns:
    The total number of elements over all leaves.
  """
  return sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(params))
