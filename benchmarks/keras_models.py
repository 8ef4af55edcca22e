"""hc_jax's regression CNNs in Keras 3, for speed comparisons only.

  python benchmarks/keras_models.py
      [--models=cnn_263k,cnn_1m,vgg16,resnet50,hcnet,hcnet_ellipse]

Each builder mirrors the Flax model of the same name in `hc_jax.models` layer
for layer (same convolutions, BatchNorm placement, pools, head), so that a
training step does the same arithmetic in both frameworks. Run as a script it
builds each model at its benchmark input size and prints its parameter count
next to the Flax one.

The paper's four CNNs take square inputs of the side in `SIZES`. hc_jax's own
`hcnet` and `hcnet_ellipse` are built as their config files build them
(`CONFIGS`): the input `(height, width)` is the config's
(`hc_jax.data.cache.input_shape`) and the architecture its `model_options`
(`model_options`), so the twins follow the configs when these change. The
`hcnet` twin ends in the same bounded output as `hc_jax.nets.hcnet.HCNet`,
`BOUND_LOW + (BOUND_HIGH - BOUND_LOW) * sigmoid(z)`; `hcnet_ellipse` returns
its six raw ellipse values (decoding them is hc_jax's, see
`hc_jax.nets.ellipse_head`).

Known differences, none of which changes the layer shapes:
  * Keras' `ResNet50` is v1 (stride 2 on the first 1x1 convolution of a
    block) where hc_jax's is v1.5 (stride on the 3x3 one), so Keras' 3x3
    convolutions in the first block of stages 3-5 run at a quarter of the
    resolution: about 3.9 against 4.1 GFLOPs per 224x224 image in the
    forward pass. Its convolutions also have biases (26,560 numbers), which
    BatchNorm cancels and hc_jax leaves out.
  * Initialisers (Keras: Glorot uniform; Flax: LeCun normal) differ; they do
    not affect speed.
  * The Keras models return `[batch, outputs]`; hc_jax's label models return
    `[batch]`.

TensorFlow is imported only inside the functions, so importing this module is
cheap (it reads the two hcnet configs: ml_collections and NumPy); building a
model imports Keras (on its TensorFlow backend).
"""

import argparse
import importlib
import os
import sys

os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `configs` is imported from the checkout.
  sys.path.insert(0, REPO)

from hc_jax.data import cache as cache_lib  # pylint: disable=wrong-import-position

# The config file (in configs/) that sets each of hc_jax's own models.
CONFIGS = {'hcnet': 'hcnet_label', 'hcnet_ellipse': 'hcnet_ellipse',
           'hcnet_mask': 'hcnet_mask'}


def load_config(name: str):
  """The `ml_collections` config of `configs/<CONFIGS[name]>.py`."""
  return importlib.import_module(f'configs.{CONFIGS[name]}').get_config()


def model_options(name: str) -> dict:
  """The config's `model_options` of a model in `CONFIGS`; {} for others."""
  if name not in CONFIGS:
    return {}
  options = load_config(name).model_options.to_dict()
  return {key: tuple(value) if isinstance(value, list) else value
          for key, value in options.items()}


# Input of each model in the benchmarks: the side of a square one (the
# paper's configs' image_size), or (height, width) from hc_jax's configs.
SIZES = {'cnn_263k': 128, 'cnn_1m': 128, 'vgg16': 224, 'resnet50': 224,
         **{name: cache_lib.input_shape(load_config(name)) for name in CONFIGS}}


def as_hw(image_size) -> tuple[int, int]:
  """`(height, width)` of an input given as one side or as (height, width)."""
  if not isinstance(image_size, (tuple, list)):
    return int(image_size), int(image_size)
  height, width = image_size
  return int(height), int(width)


def hw_label(image_size) -> str:
  """'HxW' of an input size, e.g. '128x192'."""
  return '{}x{}'.format(*as_hw(image_size))


def _custom_cnn(image_size, conv_features, dense_features, name: str):
  """The paper's custom CNNs: Conv -> ReLU -> BN -> pool blocks, Dense head.

  Args:
    image_size: the single-channel input's side, or (height, width).
    conv_features: filters of each 3x3 'same' convolution.
    dense_features: units of the Dense layers after the first Dense(16)
      block, each with ReLU.
    name: model name.

  Returns:
    An uncompiled `keras.Model` with output `[batch, 1]`.
  """
  import keras  # pylint: disable=import-outside-toplevel
  from keras import layers  # pylint: disable=import-outside-toplevel
  inputs = keras.Input((*as_hw(image_size), 1))
  x = inputs
  for i, features in enumerate(conv_features, start=1):
    x = layers.Conv2D(features, 3, padding='same', activation='relu',
                      name=f'conv{i}')(x)
    x = layers.BatchNormalization(name=f'conv{i}_bn')(x)  # 0.99, 1e-3.
    x = layers.MaxPooling2D(name=f'pool{i}')(x)
  x = layers.Flatten(name='flatten')(x)
  x = layers.Dense(16, activation='relu', name='dense1')(x)
  x = layers.BatchNormalization(name='dense1_bn')(x)
  x = layers.Dropout(0.5, name='dropout')(x)
  for i, units in enumerate(dense_features, start=2):
    x = layers.Dense(units, activation='relu', name=f'dense{i}')(x)
  outputs = layers.Dense(1, name='head')(x)
  return keras.Model(inputs, outputs, name=name)


def cnn_263k(image_size=128):
  """`hc_jax.models.CNN263K` in Keras: 263,633 trainable parameters at 128."""
  return _custom_cnn(image_size, (8, 16), (8,), 'cnn_263k')


def cnn_1m(image_size=128):
  """`hc_jax.models.CNN1M` in Keras: 286,529 trainable parameters at 128."""
  return _custom_cnn(image_size, (16, 32, 64), (32, 8), 'cnn_1m')


def vgg16(image_size=224):
  """`hc_jax.models.VGG16` in Keras: `keras.applications.VGG16` + GAP head.

  Global average pooling -> Dense(256) -> ReLU -> Dropout(0.5) -> Dense(1):
  14,845,121 trainable parameters at any input size.
  """
  import keras  # pylint: disable=import-outside-toplevel
  from keras import layers  # pylint: disable=import-outside-toplevel
  backbone = keras.applications.VGG16(
      weights=None, include_top=False, input_shape=(*as_hw(image_size), 1),
      pooling='avg')
  x = layers.Dense(256, activation='relu', name='head_hidden')(backbone.output)
  x = layers.Dropout(0.5, name='dropout')(x)
  outputs = layers.Dense(1, name='head')(x)
  return keras.Model(backbone.input, outputs, name='vgg16')


def resnet50(image_size=224):
  """`keras.applications.ResNet50` (v1) with global average pool + Dense(1).

  23,530,369 trainable parameters at any input size: hc_jax's 23,503,809 plus
  26,560 convolution biases.
  """
  import keras  # pylint: disable=import-outside-toplevel
  from keras import layers  # pylint: disable=import-outside-toplevel
  backbone = keras.applications.ResNet50(
      weights=None, include_top=False, input_shape=(*as_hw(image_size), 1),
      pooling='avg')
  outputs = layers.Dense(1, name='head')(backbone.output)
  return keras.Model(backbone.input, outputs, name='resnet50')


def _hcnet_backbone(image_size, outputs: int, widths, head: str, hidden: int,
                    dropout: float, dilated: bool):
  """`hc_jax.nets.hcnet.Backbone`: Conv -> BN -> ReLU -> pool blocks and a head.

  Args:
    image_size: the single-channel input's side, or (height, width).
    outputs: units of the last Dense layer (linear).
    widths: filters of each block's 3x3 'same' convolution (no bias).
    head: 'flatten' (Flatten -> Dense(hidden) -> ReLU -> Dropout) or 'gap'
      (global average pooling), each then Dense(outputs).
    hidden: units of the flatten head's hidden Dense layer.
    dropout: dropout rate of the flatten head.
    dilated: whether the last block's convolution has dilation 2.

  Returns:
    (inputs, outputs) Keras tensors; outputs `[batch, outputs]`.
  """
  import keras  # pylint: disable=import-outside-toplevel
  from keras import layers  # pylint: disable=import-outside-toplevel
  if head not in ('flatten', 'gap'):
    raise ValueError(f"head must be 'flatten' or 'gap'; got {head!r}")
  inputs = keras.Input((*as_hw(image_size), 1))
  x = inputs
  for i, width in enumerate(widths, start=1):
    dilation = 2 if dilated and i == len(widths) else 1
    x = layers.Conv2D(width, 3, padding='same', dilation_rate=dilation,
                      use_bias=False, name=f'conv{i}')(x)
    x = layers.BatchNormalization(momentum=0.99, epsilon=1e-3,
                                  name=f'conv{i}_bn')(x)
    x = layers.ReLU(name=f'conv{i}_relu')(x)
    x = layers.MaxPooling2D(name=f'pool{i}')(x)
  if head == 'gap':
    x = layers.GlobalAveragePooling2D(name='gap')(x)
  else:
    x = layers.Flatten(name='flatten')(x)
    x = layers.Dense(hidden, activation='relu', name='hidden')(x)
    x = layers.Dropout(dropout, name='dropout')(x)
  return inputs, layers.Dense(outputs, name='head')(x)


def bound_output(z):
  """`hc_jax.nets.hcnet.HCNet`'s output bound: low + (high - low) sigmoid(z)."""
  import keras  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from hc_jax.nets import hcnet as hcnet_lib
  return hcnet_lib.BOUND_LOW + (
      hcnet_lib.BOUND_HIGH - hcnet_lib.BOUND_LOW) * keras.ops.sigmoid(z)


def hcnet(image_size=None, widths=(16, 32, 64, 128, 128),
          head: str = 'flatten', hidden: int = 64, dropout: float = 0.3,
          dilated: bool = False, bounded: bool = True):
  """`hc_jax.nets.hcnet.HCNet` in Keras: the normalised HC, `[batch, 1]`.

  The input is `SIZES['hcnet']` unless `image_size` is given; the other
  defaults are HCNet's (`create_model('hcnet')` takes the config's
  `model_options` instead): 376,305 trainable parameters at 128x128,
  441,841 at 128x192. The output is bounded as HCNet's (`bound_output`)
  unless `bounded=False`.
  """
  import keras  # pylint: disable=import-outside-toplevel
  image_size = SIZES['hcnet'] if image_size is None else image_size
  inputs, outputs = _hcnet_backbone(image_size, 1, widths, head, hidden,
                                    dropout, dilated)
  if bounded:
    outputs = keras.layers.Activation(bound_output, name='bounded')(outputs)
  return keras.Model(inputs, outputs, name='hcnet')


def hcnet_ellipse(image_size=None, widths=(16, 32, 64, 128, 128),
                  head: str = 'flatten', hidden: int = 64,
                  dropout: float = 0.3, dilated: bool = False):
  """`hc_jax.nets.hcnet.HCNetEllipse` in Keras: six raw values, `[batch, 6]`.

  The input is `SIZES['hcnet_ellipse']` unless `image_size` is given; with
  HCNetEllipse's defaults, 376,630 trainable parameters at 128x128, 442,166
  at 128x192.
  """
  import keras  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from hc_jax.nets import hcnet as hcnet_lib
  image_size = SIZES['hcnet_ellipse'] if image_size is None else image_size
  inputs, outputs = _hcnet_backbone(image_size, hcnet_lib.ELLIPSE_OUTPUTS,
                                    widths, head, hidden, dropout, dilated)
  return keras.Model(inputs, outputs, name='hcnet_ellipse')


def hcnet_mask(image_size=None, widths=(8, 16, 32, 64, 64), stride: int = 2,
               margin: int = 8, attention: bool = False, **head_only):
  """`hc_jax.nets.hcnet_mask.HCNetMask` in Keras: the mask logits `[B, r, c, 1]`.

  The same layers in the same order (zero padding by `margin` and up to a
  multiple of 2^(levels-1), two Conv(no bias) -> BN -> ReLU per level, 2x2
  max pools, a bottleneck with a dilated second convolution and a Dense of
  the spatial mean added, nearest 2x upsampling, skip concatenations, a 1x1
  convolution to one logit), so the same parameter count. The moments, the
  ellipse and the HC after the logits are hc_jax's, not the twin's: the
  Keras twin's loss is BCE alone, which is less work than hc_jax's step
  (target rendering, BCE, Dice, moments, HC loss). `head_only` takes the
  Flax model's fields that act after the logits (`moments`,
  `window_radius`) and ignores them; `attention` must be False.
  """
  import keras  # pylint: disable=import-outside-toplevel
  from keras import layers  # pylint: disable=import-outside-toplevel
  unknown = set(head_only) - {'moments', 'window_radius', 'attention_heads'}
  if unknown:
    raise TypeError(f'unexpected options {sorted(unknown)}')
  if attention:
    raise ValueError('the Keras twin has no attention block')
  height, width = as_hw(SIZES['hcnet_mask'] if image_size is None
                        else image_size)
  levels = len(widths)
  unit = 2 ** (levels - 1)
  pad_h, pad_w = -(height + 2 * margin) % unit, -(width + 2 * margin) % unit
  inputs = keras.Input((height, width, 1))
  x = layers.ZeroPadding2D(((margin, margin + pad_h),
                            (margin, margin + pad_w)))(inputs)

  def block(x, channels, name, dilation=1):
    for i, rate in enumerate((1, dilation)):
      x = layers.Conv2D(channels, 3, padding='same', dilation_rate=rate,
                        use_bias=False, name=f'{name}_conv{i}')(x)
      x = layers.BatchNormalization(momentum=0.99, epsilon=1e-3,
                                    name=f'{name}_bn{i}')(x)
      x = layers.ReLU()(x)
    return x

  skips = []
  for i, channels in enumerate(widths[:-1]):
    x = block(x, channels, f'down{i}')
    skips.append(x)
    x = layers.MaxPooling2D()(x)
  x = block(x, widths[-1], 'bottleneck', dilation=2)
  context = layers.Dense(widths[-1], name='context')(
      layers.GlobalAveragePooling2D()(x))
  x = layers.Add()([x, layers.Reshape((1, 1, widths[-1]))(context)])
  level = levels - 1
  while 2 ** (level - 1) >= stride:
    level -= 1
    x = layers.UpSampling2D(2, interpolation='nearest')(x)
    x = layers.Concatenate()([x, skips[level]])
    x = block(x, widths[level], f'up{level}')
  logits = layers.Conv2D(1, 1, name='logits')(x)
  cells = margin // stride
  rows = -(-height // stride) + 2 * cells
  cols = -(-width // stride) + 2 * cells
  logits = layers.Cropping2D(((0, logits.shape[1] - rows),
                              (0, logits.shape[2] - cols)))(logits)
  return keras.Model(inputs, logits, name='hcnet_mask')


MODELS = {'cnn_263k': cnn_263k, 'cnn_1m': cnn_1m, 'vgg16': vgg16,
          'resnet50': resnet50, 'hcnet': hcnet, 'hcnet_ellipse': hcnet_ellipse,
          'hcnet_mask': hcnet_mask}


def _check_name(name: str) -> None:
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; known models: '
                     f'{", ".join(sorted(MODELS))}.')


def create_model(name: str, image_size=None, **options):
  """Builds the Keras twin of the hc_jax model registered under `name`.

  Args:
    name: a key of `MODELS` (the same names as `hc_jax.models.MODELS`).
    image_size: the single-channel input's side, or (height, width); None
      for `SIZES[name]`.
    **options: for hcnet and hcnet_ellipse, fields of the Flax model that
      replace the config's (`model_options`): widths, head, hidden, dropout,
      dilated, and bounded for hcnet.

  Returns:
    An uncompiled `keras.Model`, output `[batch, outputs]`.

  Raises:
    ValueError: for an unknown name, or options a model does not take.
  """
  _check_name(name)
  options = {**model_options(name), **options}
  if options and name not in CONFIGS:
    raise ValueError(f'{name} takes no options; got {sorted(options)}')
  try:
    return MODELS[name](SIZES[name] if image_size is None else image_size,
                        **options)
  except TypeError as error:
    raise ValueError(f'bad options for {name}: {error}') from None


def trainable_params(model) -> int:
  """Number of trainable scalars (what Flax keeps in 'params')."""
  return sum(int(w.numpy().size) for w in model.trainable_weights)


def conv_bias_params(model) -> int:
  """Number of convolution-bias scalars (in Keras' ResNet50, not hc_jax's)."""
  import keras  # pylint: disable=import-outside-toplevel
  return sum(int(layer.bias.numpy().size) for layer in model.layers
             if isinstance(layer, keras.layers.Conv2D) and layer.use_bias)


def flax_model(name: str, layers: str = 'auto', **options):
  """`hc_jax.models.create_model(name)` with the twin's options.

  Args:
    name: a key of `MODELS`.
    layers: 'plain', 'fast' or 'auto' (see `hc_jax.nets.layers`).
    **options: as for `create_model`, replacing the config's.

  Returns:
    The unbound Flax module.
  """
  from hc_jax import models  # pylint: disable=import-outside-toplevel
  _check_name(name)
  return models.create_model(name, layers=layers,
                             **{**model_options(name), **options})


def flax_params(name: str, image_size=None, **options) -> int:
  """Parameter count of `flax_model(name, **options)` at `image_size`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from hc_jax import models  # pylint: disable=import-outside-toplevel
  height, width = as_hw(SIZES[name] if image_size is None else image_size)
  model = flax_model(name, **options)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, height, width, 1)), train=False))
  return models.count_params(variables['params'])


def compare_params(name: str, image_size=None, **options
                   ) -> tuple[int, int, int]:
  """Parameter counts: (Keras trainable, Keras conv biases, hc_jax).

  Only ResNet50 has extra biases; for the others the middle number is 0 and
  the two counts should be equal. `image_size` and `options` are as for
  `create_model`.
  """
  model = create_model(name, image_size, **options)
  extra = conv_bias_params(model) if name == 'resnet50' else 0
  return (trainable_params(model), extra,
          flax_params(name, image_size, **options))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default=','.join(MODELS))
  args = parser.parse_args()
  mismatches = 0
  names = [name for name in args.models.split(',') if name]
  for name in names:
    if name not in MODELS:
      parser.error(f'unknown model {name!r}; choose from {", ".join(MODELS)}')
  for name in names:
    keras_count, extra, flax_count = compare_params(name)
    agree = keras_count - extra == flax_count
    mismatches += not agree
    note = f' (incl. {extra:,} conv biases)' if extra else ''
    print(f'{name} {hw_label(SIZES[name])}: Keras {keras_count:,} '
          f'trainable{note}, '
          f'hc_jax {flax_count:,}: {"match" if agree else "MISMATCH"}',
          flush=True)
  if mismatches:
    raise SystemExit(f'{mismatches} model(s) do not match hc_jax.models.')


if __name__ == '__main__':
  main()
