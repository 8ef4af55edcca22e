"""hc_jax's four regression CNNs in Keras 3, for speed comparisons only.

  python benchmarks/keras_models.py [--models=cnn_263k,cnn_1m,vgg16,resnet50]

Each builder mirrors the Flax model of the same name in `hc_jax.models` layer
for layer (same convolutions, BatchNorm placement, pools, head), so that a
training step does the same arithmetic in both frameworks. Run as a script it
builds each model at its benchmark input size and prints its parameter count
next to the Flax one.

Known differences, none of which changes the layer shapes:
  * Keras' `ResNet50` is v1 (stride 2 on the first 1x1 convolution of a
    block) where hc_jax's is v1.5 (stride on the 3x3 one), so Keras' 3x3
    convolutions in the first block of stages 3-5 run at a quarter of the
    resolution: about 3.9 against 4.1 GFLOPs per 224x224 image in the
    forward pass. Its convolutions also have biases (26,560 numbers), which
    BatchNorm cancels and hc_jax leaves out.
  * Initialisers (Keras: Glorot uniform; Flax: LeCun normal) differ; they do
    not affect speed.

TensorFlow is imported only inside the functions, so importing this module is
cheap; building a model imports Keras (on its TensorFlow backend).
"""

import argparse
import os

os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# Input side of each model in the benchmarks (the configs' image_size).
SIZES = {'cnn_263k': 128, 'cnn_1m': 128, 'vgg16': 224, 'resnet50': 224}


def _custom_cnn(image_size: int, conv_features, dense_features, name: str):
  """The paper's custom CNNs: Conv -> ReLU -> BN -> pool blocks, Dense head.

  Args:
    image_size: side of the square single-channel input.
    conv_features: filters of each 3x3 'same' convolution.
    dense_features: units of the Dense layers after the first Dense(16)
      block, each with ReLU.
    name: model name.

  Returns:
    An uncompiled `keras.Model` with output `[batch, 1]`.
  """
  import keras  # pylint: disable=import-outside-toplevel
  from keras import layers  # pylint: disable=import-outside-toplevel
  inputs = keras.Input((image_size, image_size, 1))
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


def cnn_263k(image_size: int = 128):
  """`hc_jax.models.CNN263K` in Keras: 263,633 trainable parameters at 128."""
  return _custom_cnn(image_size, (8, 16), (8,), 'cnn_263k')


def cnn_1m(image_size: int = 128):
  """`hc_jax.models.CNN1M` in Keras: 286,529 trainable parameters at 128."""
  return _custom_cnn(image_size, (16, 32, 64), (32, 8), 'cnn_1m')


def vgg16(image_size: int = 224):
  """`hc_jax.models.VGG16` in Keras: `keras.applications.VGG16` + GAP head.

  Global average pooling -> Dense(256) -> ReLU -> Dropout(0.5) -> Dense(1):
  14,845,121 trainable parameters at any input size.
  """
  import keras  # pylint: disable=import-outside-toplevel
  from keras import layers  # pylint: disable=import-outside-toplevel
  backbone = keras.applications.VGG16(
      weights=None, include_top=False, input_shape=(image_size, image_size, 1),
      pooling='avg')
  x = layers.Dense(256, activation='relu', name='head_hidden')(backbone.output)
  x = layers.Dropout(0.5, name='dropout')(x)
  outputs = layers.Dense(1, name='head')(x)
  return keras.Model(backbone.input, outputs, name='vgg16')


def resnet50(image_size: int = 224):
  """`keras.applications.ResNet50` (v1) with global average pool + Dense(1).

  23,530,369 trainable parameters at any input size: hc_jax's 23,503,809 plus
  26,560 convolution biases.
  """
  import keras  # pylint: disable=import-outside-toplevel
  from keras import layers  # pylint: disable=import-outside-toplevel
  backbone = keras.applications.ResNet50(
      weights=None, include_top=False, input_shape=(image_size, image_size, 1),
      pooling='avg')
  outputs = layers.Dense(1, name='head')(backbone.output)
  return keras.Model(backbone.input, outputs, name='resnet50')


MODELS = {'cnn_263k': cnn_263k, 'cnn_1m': cnn_1m, 'vgg16': vgg16,
          'resnet50': resnet50}


def create_model(name: str, image_size: int):
  """Builds the Keras twin of the hc_jax model registered under `name`.

  Args:
    name: a key of `MODELS` (the same names as `hc_jax.models.MODELS`).
    image_size: side of the square single-channel input.

  Returns:
    An uncompiled `keras.Model`, output `[batch, 1]`.

  Raises:
    ValueError: for an unknown name.
  """
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; known models: '
                     f'{", ".join(sorted(MODELS))}.')
  return MODELS[name](image_size)


def trainable_params(model) -> int:
  """Number of trainable scalars (what Flax keeps in 'params')."""
  return sum(int(w.numpy().size) for w in model.trainable_weights)


def conv_bias_params(model) -> int:
  """Number of convolution-bias scalars (in Keras' ResNet50, not hc_jax's)."""
  import keras  # pylint: disable=import-outside-toplevel
  return sum(int(layer.bias.numpy().size) for layer in model.layers
             if isinstance(layer, keras.layers.Conv2D) and layer.use_bias)


def flax_params(name: str, image_size: int) -> int:
  """Parameter count of `hc_jax.models.create_model(name)` at `image_size`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from hc_jax import models  # pylint: disable=import-outside-toplevel
  model = models.create_model(name)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 1)),
      train=False))
  return models.count_params(variables['params'])


def compare_params(name: str, image_size: int) -> tuple[int, int, int]:
  """Parameter counts: (Keras trainable, Keras conv biases, hc_jax).

  Only ResNet50 has extra biases; for the others the middle number is 0 and
  the two counts should be equal.
  """
  model = create_model(name, image_size)
  extra = conv_bias_params(model) if name == 'resnet50' else 0
  return trainable_params(model), extra, flax_params(name, image_size)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default=','.join(MODELS))
  args = parser.parse_args()
  mismatches = 0
  for name in args.models.split(','):
    size = SIZES[name]
    keras_count, extra, flax_count = compare_params(name, size)
    agree = keras_count - extra == flax_count
    mismatches += not agree
    note = f' (incl. {extra:,} conv biases)' if extra else ''
    print(f'{name} {size}x{size}: Keras {keras_count:,} trainable{note}, '
          f'hc_jax {flax_count:,}: {"match" if agree else "MISMATCH"}',
          flush=True)
  if mismatches:
    raise SystemExit(f'{mismatches} model(s) do not match hc_jax.models.')


if __name__ == '__main__':
  main()
