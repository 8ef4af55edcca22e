"""hc_jax.nets.fast_layers against the plain Flax layers: values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from hc_jax import models
from hc_jax.nets import fast_layers
from hc_jax.nets import layers as layers_lib


def _close(actual, expected, rtol=1e-5, atol=1e-5):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=rtol,
                                                       atol=atol),
               actual, expected)


def _close_to_scale(actual, expected, rtol=1e-4, floor=1e-5):
  """Each array within `rtol` of the largest magnitude of the expected one.

  For gradients summed in a different order: elements near zero then differ
  by float rounding relative to the array's scale, not to their own. Arrays
  that should be zero (the bias of a convolution followed by BatchNorm, which
  cancels) hold only rounding noise, so no tolerance goes below `floor`.
  """
  jax.tree.map(lambda a, e: np.testing.assert_allclose(
      a, e, rtol=0, atol=max(rtol * float(jnp.abs(e).max()), floor)),
               actual, expected)


# The whole-model checks compile without XLA's optimisations in the default
# run (the same equivalence in about half the time) and, with `-m slow`, also
# with them, as a user's run compiles the model.
XLA_MODES = ['unoptimised',
             pytest.param('optimised',
                          marks=[pytest.mark.slow, pytest.mark.xla_optimized])]


def _batch_norm_pair(epsilon=1e-3, momentum=0.99, train=True, **kwargs):
  common = dict(use_running_average=not train, momentum=momentum,
                epsilon=epsilon, **kwargs)
  return fast_layers.BatchNorm(**common), nn.BatchNorm(**common)


@pytest.mark.parametrize('shape', [(4, 6, 5, 3), (8, 16)])
def test_batch_norm_matches_flax_in_training(shape):
  fast, plain = _batch_norm_pair()
  x = 3.0 * jax.random.normal(jax.random.key(0), shape) + 1.5
  weights = jax.random.normal(jax.random.key(1), shape)
  variables = jax.jit(plain.init)(jax.random.key(2), x)
  assert jax.tree.structure(jax.jit(fast.init)(jax.random.key(2), x)) == \
      jax.tree.structure(variables)
  variables = {**variables, 'params': {  # Not the identity initialisation.
      'scale': jnp.linspace(0.5, 2.0, shape[-1]),
      'bias': jnp.linspace(-1.0, 1.0, shape[-1])}}

  def loss(module, variables, x):
    y, updates = module.apply(variables, x, mutable=['batch_stats'])
    # A nonlinear loss, plus the new running statistics, so the gradient
    # flows through every output of the layer.
    stats = updates['batch_stats']
    return ((y * weights).sum() + (y ** 2).sum() + stats['mean'].sum()
            + 3.0 * stats['var'].sum()), (y, updates)

  grad = jax.jit(jax.grad(loss, argnums=(1, 2), has_aux=True),
                 static_argnums=0)  # One compiled call per module.
  (fast_grads, (fast_y, fast_updates)) = grad(fast, variables, x)
  (plain_grads, (plain_y, plain_updates)) = grad(plain, variables, x)
  _close(fast_y, plain_y)
  _close(fast_updates, plain_updates)
  _close(fast_grads, plain_grads, rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(fast_grads[1]).max()) > 1e-2  # Not trivially zero.


def test_batch_norm_matches_flax_in_evaluation():
  fast, plain = _batch_norm_pair(train=False)
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
  variables = {'params': {'scale': jnp.array([0.5, 2.0]),
                          'bias': jnp.array([1.0, -1.0])},
               'batch_stats': {'mean': jnp.array([0.3, -0.2]),
                               'var': jnp.array([2.0, 0.5])}}
  _close(fast.apply(variables, x), plain.apply(variables, x))
  grad = lambda module: jax.grad(
      lambda v, x: (module.apply(v, x) ** 2).sum(), argnums=(0, 1))(
          variables, x)
  _close(grad(fast), grad(plain))


def test_batch_norm_keeps_running_stats_while_initialising():
  fast, plain = _batch_norm_pair()
  x = jax.random.normal(jax.random.key(0), (4, 3)) + 5.0
  _close(fast.init(jax.random.key(1), x), plain.init(jax.random.key(1), x))


def test_batch_norm_bfloat16_output():
  fast, plain = _batch_norm_pair(dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (4, 4, 4, 3)).astype(jnp.bfloat16)
  variables = plain.init(jax.random.key(1), x)
  fast_y, _ = fast.apply(variables, x, mutable=['batch_stats'])
  plain_y, _ = plain.apply(variables, x, mutable=['batch_stats'])
  assert fast_y.dtype == plain_y.dtype == jnp.bfloat16
  _close(fast_y.astype(jnp.float32), plain_y.astype(jnp.float32), rtol=2e-2,
         atol=2e-2)


@pytest.mark.parametrize(
    'in_shape, features, conv_kwargs',
    [
        ((2, 9, 7, 1), 6, dict(kernel_size=(3, 3), padding='SAME')),
        ((1, 1, 1, 1), 3, dict(kernel_size=(3, 3), padding='SAME')),
        ((2, 11, 10, 1), 4, dict(kernel_size=(7, 7), strides=(2, 2),
                                 padding=((3, 3), (3, 3)), use_bias=False)),
        ((2, 6, 5, 3), 5, dict(kernel_size=(1, 1))),
        ((2, 7, 6, 3), 5, dict(kernel_size=(1, 1), strides=(2, 2),
                               use_bias=False)),
        ((2, 6, 5, 3), 4, dict(kernel_size=(3, 3), padding='SAME')),  # Narrow.
        ((2, 6, 5, 8), 16, dict(kernel_size=(3, 3), padding='SAME',
                                use_bias=False)),  # Narrow, 16 outputs.
        ((2, 7, 6, 5), 3, dict(kernel_size=(2, 3), padding='VALID')),
        ((2, 6, 5, 4), 4, dict(kernel_size=(3, 3),
                               padding=((2, 0), (0, 2)))),  # Narrow.
        ((2, 6, 5, 17), 4, dict(kernel_size=(3, 3), padding='SAME')),  # Plain.
        ((2, 6, 5, 1), 4, dict(kernel_size=(3, 3), padding='VALID',
                               kernel_dilation=(2, 2))),  # Plain.
    ])
def test_conv_general_dilated_matches_flax(in_shape, features, conv_kwargs):
  fast = nn.Conv(features,
                 conv_general_dilated=fast_layers.conv_general_dilated,
                 **conv_kwargs)
  plain = nn.Conv(features, **conv_kwargs)
  x = jax.random.normal(jax.random.key(0), in_shape)
  variables = jax.jit(plain.init)(jax.random.key(1), x)
  if 'bias' in variables['params']:
    variables = {'params': {**variables['params'], 'bias': jnp.arange(
        features, dtype=jnp.float32)}}
  fast_y = jax.jit(fast.apply)(variables, x)
  plain_y = jax.jit(plain.apply)(variables, x)
  assert fast_y.shape == plain_y.shape
  _close(fast_y, plain_y)
  weights = jax.random.normal(jax.random.key(2), plain_y.shape)
  grad = lambda module: jax.jit(jax.grad(  # One compiled call each.
      lambda v, x: (jnp.tanh(module.apply(v, x)) * weights).sum(),
      argnums=(0, 1)))(variables, x)
  _close(grad(fast), grad(plain))


@pytest.mark.parametrize('max_bytes', [2**30, 0])  # im2col; one dot per tap.
@pytest.mark.parametrize('conv_kwargs', [
    dict(kernel_size=(3, 3), padding='SAME'),
    dict(kernel_size=(3, 3), strides=(2, 2), padding='SAME', use_bias=False),
    dict(kernel_size=(2, 2), padding='VALID'),
])
def test_conv_im2col_kernel_grad_matches_flax(monkeypatch, max_bytes,
                                              conv_kwargs):
  # Take the path of large convolutions at a small size.
  monkeypatch.setattr(fast_layers, 'IM2COL_KERNEL_GRAD_MIN_WORK', 0)
  monkeypatch.setattr(fast_layers, 'IM2COL_MAX_BYTES', max_bytes)
  fast = nn.Conv(6, conv_general_dilated=fast_layers.conv_general_dilated,
                 **conv_kwargs)
  plain = nn.Conv(6, **conv_kwargs)
  x = jax.random.normal(jax.random.key(0), (2, 7, 8, 3))
  variables = jax.jit(plain.init)(jax.random.key(1), x)
  plain_y = jax.jit(plain.apply)(variables, x)
  _close(jax.jit(fast.apply)(variables, x), plain_y)
  weights = jax.random.normal(jax.random.key(2), plain_y.shape)
  grad = lambda module: jax.jit(jax.grad(  # One compiled call each.
      lambda v, x: (jnp.tanh(module.apply(v, x)) * weights).sum(),
      argnums=(0, 1)))(variables, x)
  _close(grad(fast), grad(plain))


@pytest.mark.parametrize('in_channels, features, narrow', [
    (8, 8, True), (8, 16, True), (16, 16, True), (16, 17, False),
    (48, 16, False)])
def test_narrow_convolutions_take_the_padded_path(in_channels, features,
                                                  narrow):
  conv = nn.Conv(features, (3, 3), use_bias=False,
                 conv_general_dilated=fast_layers.conv_general_dilated)
  x = jnp.zeros((1, 6, 5, in_channels))
  variables = conv.init(jax.random.key(0), x)
  jaxpr = str(jax.make_jaxpr(conv.apply)(variables, x))
  assert ('custom_vjp_call' in jaxpr) == narrow
  if narrow:  # The kernel's output channels padded for XLA's library path.
    assert (f'f32[3,3,{in_channels},{fast_layers.NARROW_PADDED_FEATURES}]'
            in jaxpr)


@pytest.mark.parametrize('xla', XLA_MODES)
def test_hcnet_mask_same_with_and_without_the_narrow_path(monkeypatch, xla):
  """hcnet_mask's config network (8- and 16-channel layers at full and half
  resolution) with the narrow path against without it: the same parameter
  tree, outputs and gradients of its training loss."""
  del xla  # Its mark sets XLA's optimisations.
  from hc_jax import losses  # pylint: disable=import-outside-toplevel
  from hc_jax.nets import mask_head  # pylint: disable=import-outside-toplevel
  model = models.create_model('hcnet_mask', layers='fast',
                              widths=(8, 16, 32, 64, 64), stride=2, margin=8,
                              moments='window')
  images = jax.random.normal(jax.random.key(0), (2, 32, 48, 1))
  variables = models.init_variables(model, images, jax.random.key(1))
  ellipses = jnp.array([[24.0, 16.0, 14.0, 9.0, 0.4],
                        [20.0, 18.0, 11.0, 10.0, 2.0]])
  resize = jnp.array([[1.0, 1.0, 0.0, 0.0]] * 2)
  target = jnp.array([0.3, 0.35])

  def loss(params):
    outputs, _ = model.apply({**variables, 'params': params}, images,
                             train=True, mutable=['batch_stats'])
    return mask_head.train_loss(
        outputs, ellipses, resize, target, 200.0, 2, 4, losses.mse,
        {'bce': 1.0, 'dice': 1.0, 'hc': 1.0}), outputs

  def run():
    (value, outputs), grads = jax.jit(jax.value_and_grad(
        loss, has_aux=True))(variables['params'])
    return value, outputs, grads

  narrow = run()
  monkeypatch.setattr(fast_layers, 'NARROW_MAX_FEATURES', 0)
  wide = run()
  assert jax.tree.structure(narrow[2]) == jax.tree.structure(wide[2])
  assert jax.tree.map(jnp.shape, narrow[2]) == jax.tree.map(jnp.shape, wide[2])
  _close(narrow[0], wide[0])
  _close(narrow[1], wide[1], rtol=1e-4, atol=1e-4)
  # Through train-mode BatchNorm on two images and the windowed moments, a
  # reordered float sum moves some gradients by up to ~0.3 % of their array's
  # scale (XLA's thread count and fusion differ between processes); a wrong
  # convolution would move them by the whole scale.
  _close_to_scale(narrow[2], wide[2], rtol=1e-2)


def test_conv_general_dilated_bfloat16():
  kwargs = dict(kernel_size=(1, 1), dtype=jnp.bfloat16, use_bias=False)
  fast = nn.Conv(8, conv_general_dilated=fast_layers.conv_general_dilated,
                 **kwargs)
  plain = nn.Conv(8, **kwargs)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
  variables = plain.init(jax.random.key(1), x)
  fast_y, plain_y = fast.apply(variables, x), plain.apply(variables, x)
  assert fast_y.dtype == plain_y.dtype == jnp.bfloat16
  _close(fast_y.astype(jnp.float32), plain_y.astype(jnp.float32), rtol=2e-2,
         atol=5e-2)


def _custom_vjp_calls(model, variables, images):
  """How many custom-VJP calls a training step of `model` traces."""
  jaxpr = jax.make_jaxpr(lambda v: model.apply(
      v, images, train=True, rngs={'dropout': jax.random.key(2)},
      mutable=['batch_stats']))(variables)
  return str(jaxpr).count('custom_vjp_call')


@pytest.mark.parametrize('name, kwargs', [
    ('cnn_263k', {}), ('cnn_1m', {}),
    pytest.param('vgg16', {'batch_norm': True},  # Every layer kind.
                 marks=pytest.mark.slow),  # 20-50 s on 2 CPU cores.
    pytest.param('resnet50', {'stage_sizes': (1, 1, 1, 1)},  # Every layer kind.
                 marks=pytest.mark.slow),  # 20-40 s on 2 CPU cores.
])
@pytest.mark.parametrize('xla', XLA_MODES)
def test_models_same_with_plain_and_fast_layers(name, kwargs, xla):
  del xla  # Its mark sets XLA's optimisations.
  fast = models.create_model(name, layers='fast', **kwargs)
  plain = models.create_model(name, layers='plain', **kwargs)
  images = jax.random.normal(jax.random.key(0), (4, 32, 48, 1))  # Not square.
  targets = jnp.linspace(0.2, 1.0, 4)
  def init(model):
    return models.init_variables(model, images, jax.random.key(1))

  variables = init(plain)
  _close(init(fast), variables)
  # The fast model does take the fast paths (custom VJPs), the plain none.
  assert _custom_vjp_calls(plain, variables, images) == 0
  assert _custom_vjp_calls(fast, variables, images) > 0

  def loss(model, params):
    predictions, updates = model.apply(
        {**variables, 'params': params}, images, train=True,
        rngs={'dropout': jax.random.key(2)}, mutable=['batch_stats'])
    return ((predictions - targets) ** 2).mean(), updates

  grad = lambda model: jax.jit(jax.value_and_grad(
      lambda p: loss(model, p), has_aux=True))(variables['params'])
  (fast_loss, fast_updates), fast_grads = grad(fast)
  (plain_loss, plain_updates), plain_grads = grad(plain)
  _close(fast_loss, plain_loss)
  _close(fast_updates, plain_updates)
  # VGG16 stacks five 2x2 max pools behind BatchNorms over few pixels: a
  # rounding-level difference in the first convolution can flip which of
  # four near-equal values a pool keeps, and the gradient then flows to a
  # neighbour. Its deep kernel gradients agree to a few per cent, not 1e-4
  # (measured: 3.8 % of the largest at 64x96 and 17 % at 32x48 for one
  # block-5 kernel, with the fast kernel-gradient path switched off too);
  # a wrong gradient would be off by its whole size.
  _close_to_scale(fast_grads, plain_grads,
                  rtol=0.25 if name == 'vgg16' else 1e-4)
  _close(fast.apply(variables, images, train=False),
         plain.apply(variables, images, train=False))


def test_layers_builder_picks_the_fast_layers():
  fast, plain = layers_lib.Layers('fast'), layers_lib.Layers('plain')
  assert isinstance(fast.batch_norm(True, 0.9, 1e-5), fast_layers.BatchNorm)
  assert type(plain.batch_norm(True, 0.9, 1e-5)) is nn.BatchNorm
  assert fast.conv(4).conv_general_dilated is fast_layers.conv_general_dilated
  assert plain.conv(4).conv_general_dilated is not \
      fast_layers.conv_general_dilated
  bf16 = layers_lib.Layers('fast', jnp.bfloat16)
  assert bf16.conv(4).dtype == bf16.dense(4).dtype == jnp.bfloat16
  assert bf16.dense(1, dtype=jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize('kind', ['auto', 'cuda'])
def test_layers_builder_rejects_unknown_sets(kind):
  with pytest.raises(ValueError, match='one of: plain, fast'):
    layers_lib.Layers(kind)


@pytest.mark.parametrize('window, strides, padding', [
    ((2, 2), None, 'VALID'), ((3, 3), (2, 2), ((1, 1), (1, 1)))])
def test_layers_max_pool_same_for_both_sets(window, strides, padding):
  x = jax.random.normal(jax.random.key(0), (2, 9, 12, 3))
  pools = [functools.partial(layers_lib.Layers(kind).max_pool, window=window,
                             strides=strides, padding=padding)
           for kind in ('fast', 'plain')]
  values = [pool(x) for pool in pools]
  _close(values[0], values[1])
  weights = jax.random.normal(jax.random.key(1), values[0].shape)
  grads = [jax.grad(lambda x, pool=pool: (pool(x) * weights).sum())(x)
           for pool in pools]
  _close(grads[0], grads[1])


def test_max_pool_2x2_floors_odd_sizes():
  feature_maps = jnp.arange(2 * 5 * 5 * 3, dtype=jnp.float32).reshape(
      2, 5, 5, 3)
  pooled = fast_layers.max_pool_2x2(feature_maps)
  expected = np.asarray(feature_maps)[:, :4, :4, :].reshape(
      2, 2, 2, 2, 2, 3).max(axis=(2, 4))
  np.testing.assert_array_equal(pooled, expected)


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (1, 9, 7, 2)])
def test_max_pool_2x2_matches_flax_values_and_gradients(shape):
  feature_maps = jax.random.normal(jax.random.key(0), shape)  # No ties.
  reference = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
  np.testing.assert_allclose(fast_layers.max_pool_2x2(feature_maps),
                             reference(feature_maps))
  weights = jax.random.normal(jax.random.key(1),
                              reference(feature_maps).shape)
  grad = lambda pool: jax.grad(lambda x: (pool(x) * weights).sum())(
      feature_maps)
  np.testing.assert_allclose(grad(fast_layers.max_pool_2x2), grad(reference))


def test_max_pool_2x2_gradient_goes_to_the_first_of_tied_maxima():
  feature_maps = jnp.zeros((1, 4, 5, 2))  # All tied, odd width.
  weights = jnp.arange(1.0, 9.0).reshape(1, 2, 2, 2)
  grad = lambda pool: jax.grad(lambda x: (pool(x) * weights).sum())(
      feature_maps)
  reference = grad(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)))
  np.testing.assert_array_equal(grad(fast_layers.max_pool_2x2), reference)
  assert float(reference[0, 0, 0, 0]) == 1.0
  assert float(reference[0, 1, 1, 0]) == 0.0
