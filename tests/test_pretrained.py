"""Tests for hc_jax.nets.pretrained: Keras ResNet50 weights in the Flax ResNet50.

No ImageNet file can be downloaded here, so the tests build Keras' own
`keras.applications.ResNet50` with random weights and random BatchNorm
statistics (and nonzero convolution biases, so that folding them matters),
save it in each file format, import it and check that the Flax model computes
what Keras does: Flax on a grey image, Keras on that image repeated into RGB.
"""

import functools

import jax
import numpy as np
import optax
import pytest

from configs import resnet_huber
from hc_jax import models
from hc_jax.nets import fast_layers
from hc_jax.nets import pretrained
from hc_jax.training import step as step_lib
from hc_jax.training import train

keras = pytest.importorskip('keras')
h5py = pytest.importorskip('h5py')

IMAGE_SIZE = 64


def _randomise(keras_model, rng):
  """Random conv biases and BatchNorm parameters/statistics (Keras' are 0/1)."""
  for layer in keras_model.layers:
    weights = layer.get_weights()
    if len(weights) == 2:  # Conv: keep the Glorot kernel, draw the bias.
      weights[1] = rng.normal(0, 0.1, weights[1].shape)
    elif len(weights) == 4:  # BatchNorm: gamma, beta, moving mean, variance.
      shape = weights[0].shape
      weights = [rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.1, shape),
                 rng.normal(0, 0.2, shape), rng.uniform(0.5, 2.0, shape)]
    if weights:
      layer.set_weights([np.asarray(w, np.float32) for w in weights])


def _write_legacy_h5(path, layer_weights):
  """Writes weights in the layout of keras.applications' ImageNet .h5 files."""
  with h5py.File(path, 'w') as file:
    file.attrs['layer_names'] = [name.encode() for name in layer_weights]
    for name, weights in layer_weights.items():
      group = file.create_group(name)
      weight_names = [f'{name}/w{i}:0' for i in range(len(weights))]
      group.attrs['weight_names'] = [n.encode() for n in weight_names]
      for weight_name, value in zip(weight_names, weights):
        group.create_dataset(weight_name, data=value)


@pytest.fixture(scope='module')
def keras_resnet(tmp_path_factory):
  """A random Keras ResNet50 saved four ways, its weights, images, features."""
  rng = np.random.default_rng(0)
  keras_model = keras.applications.ResNet50(
      weights=None, include_top=False, pooling='avg',
      input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
  _randomise(keras_model, rng)
  root = tmp_path_factory.mktemp('keras_resnet50')
  paths = {'keras': str(root / 'resnet50.keras'),
           'weights.h5': str(root / 'resnet50.weights.h5'),
           'h5': str(root / 'resnet50_notop.h5'),
           'model.h5': str(root / 'resnet50_model.h5')}
  keras_model.save(paths['keras'])
  keras_model.save_weights(paths['weights.h5'])
  keras_model.save(paths['model.h5'])  # Legacy whole-model HDF5.
  paths['partial.weights.h5'] = str(root / 'partial.weights.h5')
  keras.Model(keras_model.input, keras_model.get_layer(
      'conv4_block6_out').output).save_weights(paths['partial.weights.h5'])
  layer_weights = {layer.name: layer.get_weights()
                   for layer in keras_model.layers}
  _write_legacy_h5(paths['h5'], layer_weights)
  images = rng.normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
  features = np.asarray(keras_model(np.repeat(images, 3, axis=-1),
                                    training=False))
  return paths, layer_weights, images, features


@pytest.fixture(scope='module')
def config(keras_resnet):
  config = resnet_huber.get_config()
  config.image_size = IMAGE_SIZE
  config.init_from = keras_resnet[0]['keras']
  return config


@pytest.fixture(scope='module')
def fresh_state(config):
  """A real TrainState of the ResNet50 that `--config.init_from` trains."""
  model = step_lib.create_model(config)
  # Compiling the initialisation dominates; an unoptimised one is faster.
  flag = 'jax_disable_most_optimizations'
  previous = jax.config.read(flag)
  jax.config.update(flag, True)
  try:
    return step_lib.create_train_state(config, model, jax.random.key(0),
                                    optax.adam(1e-3))
  finally:
    jax.config.update(flag, previous)


@pytest.fixture(scope='module')
def imported_state(fresh_state, config):
  return pretrained.load_into(fresh_state, config.init_from, config.model)


def _features_and_predictions(state, images):
  """Globally pooled features before the head, and the predictions."""
  apply = jax.jit(functools.partial(
      state.apply_fn, train=False,
      capture_intermediates=lambda module, _: module.name == 'conv5_block3'))
  predictions, intermediates = apply(
      {'params': state.params, 'batch_stats': state.batch_stats}, images)
  feature_maps = intermediates['intermediates']['conv5_block3']['__call__'][0]
  return np.asarray(feature_maps).mean(axis=(1, 2)), np.asarray(predictions)


def test_init_from_builds_keras_v1_resnet(config):
  assert step_lib.create_model(config).keras_v1
  config = resnet_huber.get_config()
  assert not step_lib.create_model(config).keras_v1


def test_flax_resnet50_computes_what_keras_does(keras_resnet, imported_state):
  _, _, images, keras_features = keras_resnet
  features, predictions = _features_and_predictions(imported_state, images)
  scale = np.abs(keras_features).max()
  assert scale > 0.1  # Features that are not vanishing, so the check means something.
  np.testing.assert_allclose(features, keras_features, rtol=0,
                             atol=1e-4 * scale)
  # The head (left at its initialisation) sits on those features.
  head = imported_state.params['head']
  np.testing.assert_allclose(
      predictions, (keras_features @ head['kernel'] + head['bias'])[:, 0],
      rtol=1e-4, atol=1e-4 * scale)


def test_rgb_kernels_summed_and_biases_folded(keras_resnet, imported_state):
  _, layer_weights, _, _ = keras_resnet
  kernel, bias = layer_weights['conv1_conv']
  _, _, moving_mean, _ = layer_weights['conv1_bn']
  np.testing.assert_allclose(imported_state.params['conv1_conv']['kernel'],
                             kernel.sum(axis=2, keepdims=True), rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(imported_state.batch_stats['conv1_bn']['mean'],
                             moving_mean - bias, rtol=1e-6, atol=1e-7)
  block_kernel, _ = layer_weights['conv3_block1_0_conv']
  np.testing.assert_array_equal(
      imported_state.params['conv3_block1']['0_conv']['kernel'], block_kernel)


def test_head_and_optimiser_state_untouched(fresh_state, imported_state):
  jax.tree.map(np.testing.assert_array_equal, imported_state.params['head'],
               fresh_state.params['head'])
  jax.tree.map(np.testing.assert_array_equal, imported_state.opt_state,
               fresh_state.opt_state)
  assert not np.array_equal(imported_state.params['conv1_conv']['kernel'],
                            fresh_state.params['conv1_conv']['kernel'])


@pytest.mark.parametrize('file_format', ['h5', 'model.h5', 'weights.h5'])
def test_every_file_format_imports_the_same(keras_resnet, fresh_state,
                                            imported_state, file_format):
  paths = keras_resnet[0]
  state = pretrained.load_into(fresh_state, paths[file_format], 'resnet50')
  jax.tree.map(np.testing.assert_array_equal,
               (state.params, state.batch_stats),
               (imported_state.params, imported_state.batch_stats))


def test_handwritten_h5_is_what_keras_reads(keras_resnet):
  """The test's ImageNet-layout .h5 is a file Keras itself loads."""
  paths, layer_weights, _, _ = keras_resnet
  keras_model = keras.applications.ResNet50(
      weights=None, include_top=False, input_shape=(None, None, 3))
  keras_model.load_weights(paths['h5'])
  for name in ('conv1_conv', 'conv4_block6_3_bn'):
    for loaded, saved in zip(keras_model.get_layer(name).get_weights(),
                             layer_weights[name]):
      np.testing.assert_array_equal(loaded, saved)


def test_mismatched_file_lists_every_problem(keras_resnet, fresh_state,
                                             tmp_path):
  _, layer_weights, _, _ = keras_resnet
  bad = dict(layer_weights)
  del bad['conv5_block3_3_bn']
  bad['extra_dense'] = [np.zeros((4, 2), np.float32)]
  bad['predictions'] = [np.zeros((2048, 1000), np.float32)]  # Ignored.
  bad['conv2_block2_2_conv'] = [np.zeros((3, 3, 64, 32), np.float32),
                                np.zeros((32,), np.float32)]
  path = str(tmp_path / 'bad.h5')
  _write_legacy_h5(path, bad)
  with pytest.raises(ValueError) as error:
    pretrained.load_into(fresh_state, path, 'resnet50')
  message = str(error.value)
  assert '\n' not in message
  assert 'missing layers: conv5_block3_3_bn' in message
  assert 'unexpected layers: extra_dense;' in message
  assert ('conv2_block2_2_conv/kernel (3, 3, 64, 32) in the file vs '
          '(3, 3, 64, 64) in the model') in message
  assert 'predictions' not in message


def test_partial_weights_h5_is_refused(keras_resnet, fresh_state):
  with pytest.raises(ValueError, match=r'cannot read .* as a keras.applications'
                     r'.ResNet50 weights \(.weights.h5\) file'):
    pretrained.load_into(fresh_state, keras_resnet[0]['partial.weights.h5'],
                         'resnet50')


def test_other_architecture_is_refused(fresh_state, tmp_path):
  vgg = {f'block1_conv{i}': [np.zeros((3, 3, 3, 64), np.float32),
                             np.zeros((64,), np.float32)] for i in (1, 2)}
  path = str(tmp_path / 'vgg16_notop.h5')
  _write_legacy_h5(path, vgg)
  with pytest.raises(ValueError, match=r'missing layers: conv1_bn, conv1_conv'
                     r'.*\(\d+ more\); unexpected layers: block1_conv1'):
    pretrained.load_into(fresh_state, path, 'resnet50')


@pytest.mark.parametrize('contents, suffix, match', [
    (b'not an HDF5 file', '.h5', 'cannot read .* as a legacy Keras HDF5'),
    (b'not a zip file', '.keras', r'cannot read .* as a Keras model \(.keras\)'),
    (b'weights', '.pt', 'expected a Keras .h5, .hdf5, .keras or .weights.h5'),
])
def test_unreadable_file_raises(fresh_state, tmp_path, contents, suffix,
                                match):
  path = tmp_path / f'weights{suffix}'
  path.write_bytes(contents)
  with pytest.raises(ValueError, match=match):
    pretrained.load_into(fresh_state, str(path), 'resnet50')


def test_missing_file_raises(fresh_state, tmp_path):
  with pytest.raises(FileNotFoundError, match='no Keras weights file at'):
    pretrained.load_into(fresh_state, str(tmp_path / 'nope.h5'), 'resnet50')


@pytest.mark.parametrize('model_name', ['cnn_263k', 'resnet18'])
def test_other_model_name_raises(keras_resnet, fresh_state, model_name):
  with pytest.raises(ValueError, match='resnet50 and vgg16 only'):
    pretrained.load_into(fresh_state, keras_resnet[0]['keras'], model_name)


def test_state_of_another_model_raises(keras_resnet, fresh_state):
  path = keras_resnet[0]['keras']
  with pytest.raises(ValueError, match='needs? models.ResNet50\\(keras_v1'):
    pretrained.load_into(fresh_state.replace(apply_fn=models.ResNet50().apply),
                         path, 'resnet50')
  with pytest.raises(ValueError, match='holds a VGG16, not the resnet50'):
    pretrained.load_into(fresh_state.replace(apply_fn=models.VGG16().apply),
                         path, 'resnet50')


@pytest.mark.slow  # About 20 s on 2 CPU cores: one more ResNet50 compile.
def test_v15_strides_would_not_match(keras_resnet, imported_state):
  """The equivalence test can fail: v1.5 strides give other features."""
  _, _, images, keras_features = keras_resnet
  state = imported_state.replace(apply_fn=models.ResNet50().apply)
  features, _ = _features_and_predictions(state, images)
  assert np.abs(features - keras_features).max() > (
      0.01 * np.abs(keras_features).max())


@pytest.mark.slow  # About 20 s on 2 CPU cores.
def test_flax_vgg16_computes_what_keras_does(tmp_path):
  rng = np.random.default_rng(1)
  keras_model = keras.applications.VGG16(
      weights=None, include_top=False, pooling='avg', input_shape=(32, 32, 3))
  _randomise(keras_model, rng)
  path = str(tmp_path / 'vgg16.keras')
  keras_model.save(path)
  images = rng.normal(size=(2, 32, 32, 1)).astype(np.float32)
  keras_features = np.asarray(keras_model(np.repeat(images, 3, axis=-1)))

  model = models.VGG16()
  variables = models.init_variables(model, images)
  state = step_lib.TrainState.create(
      apply_fn=model.apply, params=variables['params'], batch_stats={},
      tx=optax.adam(1e-3))
  state = pretrained.load_into(state, path, 'vgg16')
  _, intermediates = model.apply(
      {'params': state.params}, images, train=False,
      capture_intermediates=lambda module, _: module.name == 'block5_conv3')
  feature_maps = intermediates['intermediates']['block5_conv3']['__call__'][0]
  features = np.asarray(
      fast_layers.max_pool_2x2(jax.nn.relu(feature_maps))).mean(axis=(1, 2))
  np.testing.assert_allclose(features, keras_features, rtol=0,
                             atol=1e-4 * np.abs(keras_features).max())


@pytest.mark.slow  # About a minute on 2 CPU cores: a ResNet50 train step.
def test_training_run_starts_from_the_file(keras_resnet, tiny_config, tmp_path,
                                           capsys):
  """`--config.init_from=FILE` end to end: one epoch of train_and_evaluate."""
  config = tiny_config
  config.model, config.loss, config.num_epochs = 'resnet50', 'huber', 1
  config.init_from = keras_resnet[0]['h5']
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert f'initialised from {config.init_from}' in capsys.readouterr().out
  assert np.isfinite(results['test_mae_mm'])
