"""Tests for hc_jax.nets.hcnet and hc_jax.nets.ellipse_head."""

import csv
import functools
import math
import os

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hc_jax import losses
from hc_jax import models
from hc_jax import workdir as workdir_lib
from hc_jax.data import augment
from hc_jax.data import cache as cache_lib
from hc_jax.data import normalise
from hc_jax.data import phantom
from hc_jax.nets import ellipse_head
from hc_jax.nets import hcnet
from hc_jax.training import step as step_lib
from hc_jax.training import train

# Exact parameter counts ('params' only), one input channel. Convolutions
# have no bias (BatchNorm follows); the flatten head depends on the input size.
HCNET_PARAMS_128 = 376_305
HCNET_PARAMS_128X192 = 441_841
HCNET_ELLIPSE_PARAMS_128X192 = 442_166
HCNET_GAP_PARAMS = 245_233


def _init(model, height, width, batch=1):
  images = jnp.zeros((batch, height, width, 1), jnp.float32)
  return models.init_variables(model, images)


def _count(model, height, width):
  variables = jax.eval_shape(functools.partial(_init, model, height, width))
  return models.count_params(variables['params'])


@pytest.mark.parametrize('name, kwargs, height, width, expected', [
    ('hcnet', {}, 128, 128, HCNET_PARAMS_128),
    ('hcnet', {}, 128, 192, HCNET_PARAMS_128X192),
    ('hcnet', {'dilated': True}, 128, 192, HCNET_PARAMS_128X192),
    ('hcnet_ellipse', {}, 128, 192, HCNET_ELLIPSE_PARAMS_128X192),
    ('hcnet', {'head': 'gap'}, 128, 192, HCNET_GAP_PARAMS),
    ('hcnet', {'head': 'gap'}, 64, 64, HCNET_GAP_PARAMS),
])
def test_param_count(name, kwargs, height, width, expected):
  model = models.create_model(name, **kwargs)
  assert _count(model, height, width) == expected


@pytest.mark.parametrize('name, shape', [('hcnet', (3,)),
                                         ('hcnet_ellipse', (3, 6))])
@pytest.mark.parametrize('train_mode', [False, True])
def test_non_square_inputs(name, shape, train_mode):
  model = models.create_model(name, widths=(8, 8, 16), dilated=True)
  variables = _init(model, 32, 48)
  images = jax.random.normal(jax.random.key(1), (3, 32, 48, 1))
  out = jax.jit(functools.partial(
      model.apply, train=train_mode,
      mutable=['batch_stats'] if train_mode else False))(
          variables, images, rngs={'dropout': jax.random.key(2)})
  out = out[0] if train_mode else out
  assert out.shape == shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


def test_bad_settings_raise_one_clear_error():
  with pytest.raises(hcnet.HCNetError, match='head must be one of'):
    _init(hcnet.HCNet(head='pool'), 32, 32)
  with pytest.raises(hcnet.HCNetError, match='at least 32x32'):
    _init(hcnet.HCNet(), 16, 48)


def test_bounded_output_stays_in_range_for_extreme_inputs():
  model = hcnet.HCNet(widths=(8, 16), head='gap')
  variables = _init(model, 32, 48)
  base = jax.random.normal(jax.random.key(3), (4, 32, 48, 1))
  unbounded = hcnet.HCNet(widths=(8, 16), head='gap', bounded=False)
  escaped = False
  for factor in (1.0, 1e4, -1e4, 1e8):
    out = np.asarray(model.apply(variables, base * factor, train=False))
    assert np.all(np.isfinite(out))
    assert np.all(out >= hcnet.BOUND_LOW) and np.all(out <= hcnet.BOUND_HIGH)
    raw = np.asarray(unbounded.apply(variables, base * factor, train=False))
    escaped |= bool(np.any((raw < hcnet.BOUND_LOW) | (raw > hcnet.BOUND_HIGH)))
  assert escaped  # The same weights unbounded do leave the range.


def test_decode_always_gives_a_valid_ellipse():
  height, width = 32, 48
  raw = jax.random.normal(jax.random.key(4), (200, 6)) * 5
  extremes = jnp.array([[1e4, -1e4, 1e4, -1e4, 0.0, 0.0],
                        [-1e6, 1e6, -1e6, 1e6, -1e6, 1e-30],
                        [0.0, 0.0, -88.0, 88.0, -1.0, -0.0],
                        [3e38, -3e38, 3e38, -3e38, 3e38, -3e38]])
  ellipse = np.asarray(ellipse_head.decode(jnp.concatenate([raw, extremes]),
                                           height, width))
  assert np.all(np.isfinite(ellipse))
  assert np.all(ellipse[:, 2:4] > 0)
  assert np.all((ellipse[:, 0] >= -0.5) & (ellipse[:, 0] <= width - 0.5))
  assert np.all((ellipse[:, 1] >= -0.5) & (ellipse[:, 1] <= height - 0.5))
  assert np.all((ellipse[:, 4] >= 0) & (ellipse[:, 4] < math.pi))
  # Zero raw values: the centre of the image, a quarter of the mean side.
  zero = np.asarray(ellipse_head.decode(jnp.zeros(6), height, width))
  np.testing.assert_allclose(zero[:4], [23.5, 15.5, 20.02, 20.02], atol=1e-4)
  with pytest.raises(ellipse_head.EllipseHeadError, match=r'\[..., 6\]'):
    ellipse_head.decode(jnp.zeros((2, 5)), height, width)


def _random_ellipses(key, count, height, width):
  keys = jax.random.split(key, 5)
  return jnp.stack([
      jax.random.uniform(keys[0], (count,), maxval=width),
      jax.random.uniform(keys[1], (count,), maxval=height),
      jax.random.uniform(keys[2], (count,), minval=1, maxval=width / 2),
      jax.random.uniform(keys[3], (count,), minval=1, maxval=height / 2),
      jax.random.uniform(keys[4], (count,), minval=-4, maxval=4)], -1)


@pytest.mark.parametrize('mode', ['stretch', 'letterbox'])
def test_hc_px_is_the_perimeter_of_the_ellipse_mapped_back(mode):
  original = np.array([[540, 800], [600, 700], [480, 640]])
  resize = jnp.asarray(cache_lib.resize_geometry(original, (128, 192), mode))
  resize = jnp.repeat(resize, 20, axis=0)
  ellipse_in = _random_ellipses(jax.random.key(5), len(resize), 128, 192)
  ellipse_in = ellipse_in.at[:3, 3].set(ellipse_in[:3, 2])  # Circles too.
  sx, sy, ox, oy = (resize[:, i] for i in range(4))
  zero = jnp.zeros_like(sx)
  matrix = jnp.stack([jnp.stack([1 / sx, zero], -1),
                      jnp.stack([zero, 1 / sy], -1)], -2)
  by_hand = augment.transform_ellipse(ellipse_in, matrix,
                                      jnp.stack([-ox / sx, -oy / sy], -1))
  expected = augment.ramanujan_perimeter(by_hand[:, 2], by_hand[:, 3])
  np.testing.assert_allclose(ellipse_head.hc_px(ellipse_in, resize), expected,
                             rtol=2e-6)
  np.testing.assert_allclose(
      ellipse_head.to_original_pixels(ellipse_in, resize), by_hand,
      rtol=1e-5, atol=1e-4)
  back = ellipse_head.to_input_pixels(by_hand, resize)
  np.testing.assert_allclose(back[:, :4], augment.ellipse_from_matrix(
      *augment.ellipse_to_matrix(ellipse_in))[:, :4], rtol=1e-4, atol=1e-3)


def test_loss_is_zero_only_for_the_same_ellipse():
  mae = losses.get_loss('mae')
  true = jnp.array([[20.0, 14.0, 12.0, 7.0, 0.3], [30.0, 10.0, 5.0, 9.0, 2.0]])
  hc = jnp.array([0.5, 0.7])
  args = dict(base_loss=mae, weight=1.0, height=32, width=48)
  assert float(ellipse_head.loss(true, true, hc, hc, **args)) == 0.0
  swapped = true[:, jnp.array([0, 1, 3, 2, 4])].at[:, 4].add(math.pi / 2)
  turned = true.at[:, 4].add(math.pi)
  for same in (swapped, turned, swapped.at[:, 4].add(-math.pi)):
    assert float(ellipse_head.loss(same, true, hc, hc, **args)) < 1e-5
  for delta in ([1.0, 0, 0, 0, 0], [0, 0, 0, 1.0, 0], [0, 0, 0, 0, 0.2]):
    moved = true + jnp.asarray(delta)
    assert float(ellipse_head.loss(moved, true, hc, hc, **args)) > 1e-3
  assert float(ellipse_head.loss(true, true, hc + 0.1, hc, **args)) > 0.09
  # An image without an ellipse adds no shape term.
  unknown = true.at[1].set(jnp.nan)
  value = ellipse_head.loss(true.at[1, 0].add(5.0), unknown, hc, hc, **args)
  assert float(value) == 0.0


def test_gradients_are_finite_for_circles_and_extremes():
  # An exact circle at angle 0 in a square letterbox, where the semi-axes as
  # eigenvalues (augment.ellipse_from_matrix) have an infinite derivative.
  raw = jnp.array([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                   [1e3, -1e3, 50.0, -50.0, 1e3, 0.0],
                   [0.2, -0.1, 0.5, 0.5, 0.3, -0.7]])
  true = jnp.array([[400.0, 270.0, 150.0, 100.0, 0.5]] * 3)
  resize = jnp.asarray(cache_lib.resize_geometry(
      np.array([[600, 600], [540, 800], [540, 800]]), (32, 48), 'letterbox'))
  mae = losses.get_loss('mae')
  grads = jax.jit(jax.grad(lambda raw: ellipse_head.train_loss(
      raw, true, resize, jnp.array([0.6, 0.6, 0.6]), 1000.0, (32, 48), mae,
      1.0)))(raw)
  assert np.all(np.isfinite(grads))
  assert np.any(grads != 0)


@pytest.mark.slow  # About 45 s on a shared CPU (data preparation, compile).
def test_one_epoch_of_the_ellipse_model_writes_results(tiny_config, tmp_path):
  tiny_config.model = 'hcnet_ellipse'
  tiny_config.num_epochs = 1
  tiny_config.ellipse_weight = 0.5
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(tiny_config, workdir)
  with open(os.path.join(workdir, workdir_lib.PREDICTIONS_FILE)) as f:
    rows = list(csv.DictReader(f))
  assert rows and results['test_num_images'] == len(rows)
  predicted = np.array([float(r['hc_mm_pred']) for r in rows])
  assert np.all(np.isfinite(predicted)) and np.all(predicted > 0)
  assert np.isfinite(results['test_mae_mm'])


def _phantoms(count, seed=0):
  """Phantom scans rendered at 64x96 and box-downsampled to 32x48."""
  rng = np.random.default_rng(seed)
  images, ellipses = [], []
  for _ in range(count):
    a = rng.uniform(14, 28)
    ellipse = [rng.uniform(38, 58), rng.uniform(26, 38), a,
               a * rng.uniform(0.7, 0.95), rng.uniform(0, math.pi)]
    scan = phantom.render_scan(rng, 64, 96, *ellipse).astype(np.float32)
    images.append(scan.reshape(32, 2, 48, 2).mean(axis=(1, 3)))
    ellipses.append(ellipse)
  ellipses = np.asarray(ellipses, np.float32)
  return {'image': np.round(np.asarray(images))[..., None].astype(np.uint8),
          'ellipse': ellipses,
          'hc_px': np.asarray(augment.ramanujan_perimeter(ellipses[:, 2],
                                                          ellipses[:, 3])),
          'resize': cache_lib.resize_geometry(np.array([[64, 96]] * count),
                                              (32, 48), 'stretch')}


def test_the_ellipse_model_overfits_eight_phantoms():
  batch = _phantoms(8)
  model = hcnet.HCNetEllipse(widths=(8, 16, 16), head='gap', dropout=0.0,
                             layers='fast')
  variables = _init(model, 32, 48)
  state = step_lib.TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      batch_stats=variables['batch_stats'], tx=optax.adam(1e-2))
  normaliser = float(batch['hc_px'].max())
  member = {'key': jax.random.key(0), 'normaliser_px': jnp.float32(normaliser)}
  step = jax.jit(functools.partial(
      step_lib.train_step, loss_fn=losses.get_loss('mae'),
      augment=augment.NO_AUGMENT, loss_of=step_lib.output_functions(
          ml_collections.ConfigDict({'model': 'hcnet_ellipse',
                                     'ellipse_weight': 1.0}))[0]))

  def hc_error(state):
    raw, _ = state.apply_fn(
        {'params': state.params, 'batch_stats': state.batch_stats},
        normalise.zscore_batch(batch['image']), train=True,
        mutable=['batch_stats'])
    predicted = ellipse_head.hc_px(ellipse_head.decode(raw, 32, 48),
                                   batch['resize'])
    return float(np.mean(np.abs(predicted - batch['hc_px']) / batch['hc_px']))

  before = hc_error(state)
  for _ in range(60):
    state, loss = step(state, batch, member)
    assert np.isfinite(float(loss))
  after = hc_error(state)
  print(f'relative HC error {before:.3f} -> {after:.3f}')
  assert after < 0.5 * before and after < 0.1, (before, after)
