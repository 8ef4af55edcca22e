"""Tests for hc_jax.models."""

import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hc_jax import models
from hc_jax.nets import layers as layers_lib

# Exact parameter counts ('params' collection only), one input channel.
# The custom CNNs depend on the input size through their Flatten; VGG16 and
# ResNet50 end in global average pooling, so theirs do not.
CNN_263K_PARAMS_128 = 263_633
CNN_1M_PARAMS_128 = 286_529
CNN_1M_PARAMS_256 = 1_072_961
VGG16_PARAMS = 14_845_121
VGG16_BN_PARAMS = 14_853_569
RESNET50_PARAMS = 23_503_809


def _init(model, images, key=1):
  """The model's variables, initialised in one compiled call."""
  return models.init_variables(model, images, jax.random.key(key))


def _train_apply(model, variables, images):
  """`(predictions, updates)` of a train-mode forward pass, compiled."""
  return jax.jit(functools.partial(
      model.apply, train=True, mutable=['batch_stats']))(
          variables, images, rngs={'dropout': jax.random.key(2)})


def _abstract_variables(model, image_size, batch_size=1, width=None):
  """Shapes and dtypes of the model's variables, without computing them."""
  images = jnp.zeros((batch_size, image_size, width or image_size, 1),
                     jnp.float32)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), images, train=False))


@pytest.mark.parametrize(
    'name, image_size, kwargs, expected',
    [
        ('cnn_263k', 128, {}, CNN_263K_PARAMS_128),
        ('cnn_1m', 128, {}, CNN_1M_PARAMS_128),
        ('cnn_1m', 256, {}, CNN_1M_PARAMS_256),
        ('vgg16', 64, {}, VGG16_PARAMS),
        ('vgg16', 64, {'batch_norm': True}, VGG16_BN_PARAMS),
        ('resnet50', 64, {}, RESNET50_PARAMS),
    ],
)
def test_param_count(name, image_size, kwargs, expected):
  model = models.create_model(name, **kwargs)
  variables = _abstract_variables(model, image_size)
  assert models.count_params(variables['params']) == expected


@pytest.mark.parametrize('name', ['vgg16', 'resnet50'])
def test_param_count_independent_of_image_size(name):
  model = models.create_model(name)
  counts = {models.count_params(_abstract_variables(model, size)['params'])
            for size in (32, 96, 224)}
  assert len(counts) == 1


@pytest.mark.parametrize(
    'name, kwargs',
    [
        ('cnn_263k', {}),
        ('cnn_1m', {}),
        ('vgg16', {}),
        ('vgg16', {'batch_norm': True}),
        ('resnet50', {}),
        ('resnet50', {'dtype': jnp.bfloat16}),
    ],
)
@pytest.mark.parametrize('train', [False, True])
def test_output_shape_and_dtype(name, kwargs, train):
  model = models.create_model(name, **kwargs)
  batch_size = 3
  images = jnp.zeros((batch_size, 64, 64, 1), jnp.float32)
  variables = _abstract_variables(model, 64)

  def apply(variables):
    return model.apply(
        variables, images, train=train, mutable=['batch_stats'] if train else [],
        rngs={'dropout': jax.random.key(1)} if train else {})

  predictions, _ = jax.eval_shape(apply, variables)
  assert predictions.shape == (batch_size,)
  assert predictions.dtype == jnp.float32


def test_resnet50_bfloat16_keeps_float32_params():
  model = models.ResNet50(dtype=jnp.bfloat16)
  variables = _abstract_variables(model, 64)
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}


def test_resnet50_layer_names_follow_keras():
  params = _abstract_variables(models.ResNet50(), 64)['params']
  assert {'conv1_conv', 'conv1_bn', 'conv5_block3', 'head'} <= set(params)
  assert set(params['conv2_block1']) == {
      '0_conv', '0_bn', '1_conv', '1_bn', '2_conv', '2_bn', '3_conv', '3_bn'}
  assert params['conv1_conv']['kernel'].shape == (7, 7, 1, 64)


@pytest.fixture(scope='module')
def cnn_263k():
  """The small CNN, its initial variables and a batch of 64x64 images."""
  model = models.CNN263K()
  images = jax.random.normal(jax.random.key(0), (4, 64, 64, 1))
  variables = _init(model, images)
  return model, variables, images


def test_train_mode_updates_batch_stats(cnn_263k):
  model, variables, images = cnn_263k
  _, updates = _train_apply(model, variables, images)
  old = jax.tree.leaves(variables['batch_stats'])
  new = jax.tree.leaves(updates['batch_stats'])
  assert len(old) == len(new) == 6
  assert all(not np.allclose(a, b) for a, b in zip(old, new))


def test_eval_mode_uses_running_statistics(cnn_263k):
  model, variables, images = cnn_263k
  predictions = model.apply(variables, images, train=False)
  # Each prediction depends on its own image only, not on the batch.
  np.testing.assert_allclose(
      model.apply(variables, images[:1], train=False), predictions[:1],
      rtol=1e-5, atol=1e-6)
  # ... and on the running statistics: updating them changes the prediction.
  _, updates = model.apply(
      variables, images, train=True, mutable=['batch_stats'],
      rngs={'dropout': jax.random.key(2)})
  updated = {'params': variables['params'], **updates}
  assert not np.allclose(model.apply(updated, images, train=False), predictions)


def test_eval_mode_is_deterministic(cnn_263k):
  model, variables, images = cnn_263k
  np.testing.assert_array_equal(
      model.apply(variables, images, train=False),
      model.apply(variables, images, train=False))


def test_dropout_depends_on_rng_in_train_mode(cnn_263k):
  model, variables, images = cnn_263k

  def train_predictions(seed):
    predictions, _ = model.apply(
        variables, images, train=True, mutable=['batch_stats'],
        rngs={'dropout': jax.random.key(seed)})
    return predictions

  np.testing.assert_array_equal(train_predictions(3), train_predictions(3))
  assert not np.allclose(train_predictions(3), train_predictions(4))


def test_train_mode_needs_dropout_rng(cnn_263k):
  model, variables, images = cnn_263k
  with pytest.raises(flax.errors.InvalidRngError):
    model.apply(variables, images, train=True, mutable=['batch_stats'])


def test_cnn_1m_runs_at_128():
  model = models.CNN1M()
  images = jax.random.normal(jax.random.key(0), (2, 128, 128, 1))
  variables = _init(model, images)
  predictions, _ = _train_apply(model, variables, images)
  assert predictions.shape == (2,)
  assert np.all(np.isfinite(predictions))


@pytest.mark.parametrize(
    'name, kwargs',
    [
        ('vgg16', {'batch_norm': True}),  # About 9 s on 2 CPU cores.
        pytest.param(  # About 20 s on 2 CPU cores.
            'resnet50', {'dtype': jnp.bfloat16}, marks=pytest.mark.slow),
    ],
)
def test_big_models_run(name, kwargs):
  model = models.create_model(name, **kwargs)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
  variables = _init(model, images)
  predictions, _ = _train_apply(model, variables, images)
  eval_predictions = jax.jit(functools.partial(model.apply, train=False))(
      variables, images)
  for output in (predictions, eval_predictions):
    assert output.shape == (2,)
    assert output.dtype == jnp.float32
    assert np.all(np.isfinite(output))


def test_unknown_model_raises():
  with pytest.raises(ValueError, match='known models: cnn_1m, cnn_263k'):
    models.create_model('resnet18')


def test_unbatched_images_raise(cnn_263k):
  model, variables, images = cnn_263k
  with pytest.raises(ValueError, match='batch, height, width, 1'):
    model.apply(variables, images[0], train=False)


def test_count_params():
  params = {'dense': {'kernel': jnp.zeros((3, 4)), 'bias': jnp.zeros((4,))},
            'scale': jax.ShapeDtypeStruct((2, 5), jnp.float32)}
  assert models.count_params(params) == 26
  assert models.count_params({}) == 0


def test_paper_cnn_is_parametrised_by_its_widths():
  model = models.PaperCNN(conv_features=(8, 16), dense_features=(16, 8))
  params = _abstract_variables(model, 128)['params']
  assert models.count_params(params) == CNN_263K_PARAMS_128
  model = models.PaperCNN(conv_features=(4,), dense_features=(3,))
  params = _abstract_variables(model, 8)['params']
  # conv 3*3*4+4, BN 8, flatten 4*4*4=64 -> dense 64*3+3, BN 6, head 3+1.
  assert models.count_params(params) == 40 + 8 + 195 + 6 + 4


def test_paper_cnn_layer_names():
  """The names that trained checkpoints of the paper's CNNs hold."""
  params = _abstract_variables(models.CNN1M(), 64)['params']
  assert set(params) == {'conv1', 'conv1_bn', 'conv2', 'conv2_bn', 'conv3',
                         'conv3_bn', 'dense1', 'dense1_bn', 'dense2',
                         'dense3', 'head'}
  assert params['dense2']['kernel'].shape == (16, 32)
  assert params['dense3']['kernel'].shape == (32, 8)


@pytest.mark.parametrize('name, kwargs', [
    ('cnn_263k', {}), ('cnn_1m', {}), ('vgg16', {'batch_norm': True}),
    ('resnet50', {})])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_non_square_images(name, kwargs, dtype):
  model = models.create_model(name, dtype=dtype, **kwargs)
  images = jnp.zeros((2, 32, 48, 1), jnp.float32)
  variables = _abstract_variables(model, 32, width=48)
  predictions, _ = jax.eval_shape(lambda v: model.apply(
      v, images, train=True, mutable=['batch_stats'],
      rngs={'dropout': jax.random.key(1)}), variables)
  assert predictions.shape == (2,)
  assert predictions.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {
      jnp.dtype(jnp.float32)}


def test_paper_cnn_flatten_follows_height_and_width():
  params = _abstract_variables(models.CNN263K(), 128, width=192)['params']
  assert params['dense1']['kernel'].shape == (32 * 48 * 16, 16)


@pytest.mark.parametrize('name', ['cnn_263k', 'cnn_1m'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_paper_cnns_run_on_non_square_images(name, dtype):
  model = models.create_model(name, dtype=dtype)
  images = jax.random.normal(jax.random.key(0), (2, 40, 56, 1))
  variables = _init(model, images)
  predictions, _ = _train_apply(model, variables, images)
  assert predictions.shape == (2,) and predictions.dtype == jnp.float32
  assert np.all(np.isfinite(predictions))
  assert np.all(np.isfinite(jax.jit(functools.partial(
      model.apply, train=False))(variables, images)))


def _config(**entries):
  config = ml_collections.ConfigDict(
      {'model': 'cnn_263k', 'dtype': 'float32', 'init_from': ''})
  config.update(entries)
  return config


@pytest.mark.parametrize('name', sorted(models.MODELS))
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('layers', ['plain', 'fast'])
def test_from_config(name, dtype, layers):
  model = models.from_config(_config(model=name, dtype=dtype, layers=layers))
  assert isinstance(model, models.MODELS[name])
  assert model.dtype == jnp.dtype(dtype)
  assert model.layers == layers


@pytest.mark.parametrize('backend, expected', [
    ('cpu', 'fast'), ('gpu', 'plain'), ('tpu', 'plain')])
def test_layers_auto_resolves_by_backend(monkeypatch, backend, expected):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert layers_lib.resolve('auto') == expected
  config = _config()  # No `layers` entry: 'auto'.
  assert models.from_config(config).layers == expected
  config.layers = 'auto'
  assert models.from_config(config).layers == expected
  assert models.create_model('resnet50').layers == expected
  config.layers = 'plain'  # An explicit choice wins on any backend.
  assert models.from_config(config).layers == 'plain'


def test_from_config_resnet50_keras_v1_with_init_from():
  assert not models.from_config(_config(model='resnet50')).keras_v1
  assert models.from_config(
      _config(model='resnet50', init_from='/some/weights.h5')).keras_v1


@pytest.mark.parametrize('entries, message', [
    ({'model': 'resnet18'},
     'known models: cnn_1m, cnn_263k, hcnet, hcnet_ellipse, hcnet_mask, hcnet_mask_label, resnet50, vgg16'),
    ({'dtype': 'float16'}, 'choose one of: float32, bfloat16'),
    ({'layers': 'cuda'}, 'choose one of: auto, plain, fast'),
])
def test_from_config_errors(entries, message):
  with pytest.raises(ValueError, match=message):
    models.from_config(_config(**entries))


@pytest.mark.parametrize('layers', ['auto', 'gpu'])
def test_model_needs_a_concrete_layer_set(layers):
  model = models.CNN263K(layers=layers)
  with pytest.raises(ValueError, match="one of: plain, fast"):
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), train=False)
