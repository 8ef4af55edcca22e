"""The mask model's boundary refinement: rays, polygon moments, the option."""

import csv
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy import ndimage

from conftest import tiny_mask_config
from hc_jax import losses
from hc_jax import models
from hc_jax import workdir as workdir_lib
from hc_jax.data import augment
from hc_jax.data import ellipse as ellipse_lib
from hc_jax.data import hc18
from hc_jax.nets import boundary
from hc_jax.nets import hcnet_mask
from hc_jax.nets import mask_head
from hc_jax.training import config_check
from hc_jax.training import train

from test_mask import _phantoms
from test_mask import train_on_phantoms

ELLIPSES = np.array([[50.0, 40.0, 30.0, 18.0, 0.6],
                     [10.0, -5.0, 80.0, 60.0, 2.0],
                     [96.0, 64.0, 45.0, 44.0, 0.0],
                     [300.0, 200.0, 120.0, 70.0, 2.9]], np.float32)
IDENTITY = np.array([[1.0, 1.0, 0.0, 0.0]] * len(ELLIPSES), np.float32)
TINY = dict(widths=(4, 8, 8, 8), stride=2, margin=4)


def _on_the_ellipse(ellipses, rays, center=None):
  """`[B, rays, 2]` where rays from `center` (the ellipses' own by default)
  leave the ellipses."""
  ellipse_center, shape = augment.ellipse_to_matrix(ellipses)
  center = ellipse_center if center is None else center
  direction = boundary.directions(rays)
  t, hits = boundary.ray_ellipse_distance(center, direction, ellipse_center,
                                          shape)
  return center[:, None] + t[..., None] * direction, hits


def test_the_polygon_of_points_on_an_ellipse_gives_its_hc():
  points, hits = _on_the_ellipse(ELLIPSES, 64)
  assert np.all(np.asarray(hits))
  area, center, cov = boundary.polygon_moments(points)
  hc = np.asarray(mask_head.hc_px_from_moments(cov, IDENTITY))
  true = ellipse_lib.ramanujan_perimeter(ELLIPSES[:, 2], ELLIPSES[:, 3])
  np.testing.assert_allclose(hc, true, rtol=5e-3)
  np.testing.assert_allclose(hc, true, rtol=1e-3)  # The sliver correction.
  np.testing.assert_allclose(center, ELLIPSES[:, :2], atol=0.05)
  np.testing.assert_allclose(np.abs(area), math.pi * ELLIPSES[:, 2] *
                             ELLIPSES[:, 3], rtol=1e-2)
  fitted = np.asarray(mask_head.ellipse_from_moments(center, cov))
  np.testing.assert_allclose(fitted[:, 2:4], ELLIPSES[:, 2:4], rtol=2e-3)
  # Off-centre rays (the first pass's centre is not the head's) and the
  # reversed orientation give the same region.
  shifted, hits = _on_the_ellipse(ELLIPSES, 64, ELLIPSES[:, :2] + 5.0)
  assert np.all(np.asarray(hits))
  _, _, cov_shifted = boundary.polygon_moments(shifted[:, ::-1])
  np.testing.assert_allclose(
      mask_head.hc_px_from_moments(cov_shifted, IDENTITY), true, rtol=5e-3)


def test_the_moments_radius_and_the_ray_intersection_agree():
  center, shape = augment.ellipse_to_matrix(ELLIPSES)
  cov = shape @ jnp.swapaxes(shape, -1, -2) / 4  # A filled ellipse's moments.
  direction = boundary.directions(32)
  t, hits = boundary.ray_ellipse_distance(center, direction, center, shape)
  assert np.all(np.asarray(hits))
  np.testing.assert_allclose(boundary.ellipse_radius(cov, direction), t,
                             rtol=1e-4)
  # A ray from outside that points away meets it at no t > 0.
  outside = center + jnp.asarray([[1000.0, 0.0]])
  _, hits = boundary.ray_ellipse_distance(outside, direction, center, shape)
  assert not np.asarray(hits)[:, 0].any() and np.asarray(hits).any()


def test_bilinear_matches_map_coordinates_and_passes_gradients():
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(2, 9, 13, 3)), jnp.float32)
  points = jnp.asarray(rng.uniform([0, 0], [12, 8], (2, 40, 2)), jnp.float32)
  got = boundary.bilinear(features, points)
  for b in range(2):
    for c in range(3):
      want = ndimage.map_coordinates(
          features[b, :, :, c], [points[b, :, 1], points[b, :, 0]], order=1)
      np.testing.assert_allclose(got[b, :, c], want, atol=1e-5)
  grad = jax.grad(lambda f: boundary.bilinear(f, points).sum())(features)
  np.testing.assert_allclose(grad.sum(), 2 * 40 * 3, rtol=1e-5)


def _init(model, x):
  return models.init_variables(model, x)


def test_refine_off_is_the_model_as_it_was():
  x = jax.random.normal(jax.random.key(1), (2, 32, 48, 1))
  plain = hcnet_mask.HCNetMask(**TINY)
  off = hcnet_mask.HCNetMask(**TINY, refine_rays=0)
  on = hcnet_mask.HCNetMask(**TINY, refine_rays=16, refine_samples=8)
  v_plain, v_off, v_on = _init(plain, x), _init(off, x), _init(on, x)
  assert (jax.tree.structure(v_off) == jax.tree.structure(v_plain))
  assert 'boundary' not in v_off['params']
  assert jax.tree.all(jax.tree.map(np.array_equal, v_off, v_plain))
  out_plain = plain.apply(v_plain, x, train=False)
  out_off = off.apply(v_off, x, train=False)
  assert sorted(out_off) == sorted(out_plain) == sorted(
      ('logits', 'mass', 'center', 'cov', 'ellipse_in', 'quality'))
  for key in out_plain:
    np.testing.assert_array_equal(out_off[key], out_plain[key])
  # With it on, the first pass is the same network and the same outputs.
  shared = {k: v for k, v in v_on['params'].items() if k != 'boundary'}
  assert jax.tree.structure(shared) == jax.tree.structure(v_off['params'])
  out_on = on.apply({**v_on, 'params': {**v_on['params'], **v_off['params']}},
                    x, train=False)
  for key in ('logits', 'mass', 'quality'):
    np.testing.assert_array_equal(out_on[key], out_off[key])
  np.testing.assert_array_equal(out_on['center_coarse'], out_off['center'])
  np.testing.assert_array_equal(out_on['cov_coarse'], out_off['cov'])


# The plain layers' gradients equal the fast ones' (tests/test_fast_layers.py):
# the plain variant runs with the slow tests.
@pytest.mark.parametrize('layers', [pytest.param('plain', marks=pytest.mark.slow),
                                    'fast'])
def test_refine_on_outputs_and_gradients(layers):
  rays, samples = 16, 8
  batch = _phantoms(4)
  model = hcnet_mask.HCNetMask(**TINY, moments='window', refine_rays=rays,
                               refine_samples=samples, layers=layers)
  x = augment.zscore_batch(batch['image'])
  variables = _init(model, x)
  out = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  assert sorted(out) == sorted(('logits', 'mass', 'center', 'cov',
                                'ellipse_in', 'quality', 'center_coarse',
                                'cov_coarse', 'ray_radius'))
  assert out['center'].shape == out['center_coarse'].shape == (4, 2)
  assert out['cov'].shape == out['cov_coarse'].shape == (4, 2, 2)
  assert out['ellipse_in'].shape == (4, 5) and out['ray_radius'].shape == (
      4, rays)
  for value in out.values():
    assert np.all(np.isfinite(np.asarray(value)))
  # It starts near the first ellipse: the soft-argmax near its radius.
  coarse = boundary.ellipse_radius(out['cov_coarse'], boundary.directions(rays))
  np.testing.assert_allclose(out['ray_radius'], coarse, rtol=0.05)
  def loss(params, rays):
    outputs, _ = model.apply({**variables, 'params': params}, x, train=True,
                             mutable=['batch_stats'])
    return mask_head.train_loss(
        outputs, jnp.asarray(batch['ellipse']), batch['resize'],
        jnp.asarray(batch['hc_px']) / 100.0, 100.0, 2, 2,
        losses.get_loss('mae'),
        {'bce': 1.0, 'dice': 1.0, 'hc': 1.0, 'rays': rays})

  # One compiled graph each (not op by op): the test's time is compiling.
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  grads = grad(variables['params'], 1.0)
  for path, value in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(np.asarray(value))), path
  for name, value in grads['boundary'].items():
    assert float(jnp.abs(value['kernel']).max()) > 0, name
  # Without the ray term the refinement still learns from the HC term.
  grads = grad(variables['params'], 0.0)
  assert float(jnp.abs(grads['boundary']['logits']['kernel']).max()) > 0


def test_the_ray_term_needs_the_refinement():
  outputs = {'logits': jnp.zeros((1, 8, 8)), 'cov': jnp.eye(2)[None] * 9.0,
             'center': jnp.zeros((1, 2))}
  with pytest.raises(mask_head.MaskHeadError, match='refine_rays'):
    mask_head.train_loss(outputs, jnp.asarray(ELLIPSES[:1]), IDENTITY[:1],
                         jnp.ones(1), 1.0, 2, 0, losses.get_loss('mae'),
                         {'rays': 1.0})
  from configs import hcnet_mask as mask_config  # pylint: disable=import-outside-toplevel
  config = mask_config.get_config()
  config.mask_loss.rays = 1.0
  with pytest.raises(ValueError, match='refine_rays'):
    config_check.check_config(config)


@pytest.mark.parametrize('option, message', [
    (dict(refine_rays=2), 'refine_rays'), (dict(refine_rays=-1), 'refine_rays'),
    (dict(refine_rays=8, refine_samples=1), 'refine_samples')])
def test_bad_refine_settings_are_one_clear_error(option, message):
  with pytest.raises(hcnet_mask.HCNetMaskError, match=message):
    hcnet_mask.HCNetMask(**TINY, **option)


def test_the_refine_config_is_hcnet_mask_with_the_option():
  from configs import hcnet_mask as mask_config  # pylint: disable=import-outside-toplevel
  from configs import hcnet_mask_refine  # pylint: disable=import-outside-toplevel
  config = hcnet_mask_refine.get_config()
  config_check.check_config(config)
  assert config.model == 'hcnet_mask'
  model = models.from_config(config)
  assert model.refine_rays == 64 and model.refine_samples == 32
  base = mask_config.get_config()
  assert models.from_config(base).refine_rays == 0
  assert base.mask_loss.rays == 0.0 and config.mask_loss.rays == 1.0


# The refined run below trains end to end in the default run; this one, that
# the refinement learns, with the slow tests.
@pytest.mark.slow
def test_a_refined_model_trains_on_eight_phantoms():
  history, before, after = train_on_phantoms(
      40, {'bce': 1.0, 'dice': 1.0, 'hc': 1.0, 'rays': 1.0},
      refine_rays=32, refine_samples=16)
  assert np.all(np.isfinite(history))
  assert np.mean(history[-5:]) < 0.7 * np.mean(history[:5]), history
  assert after < before, (before, after)


@pytest.fixture(scope='module')
def refine_run(phantom_hc18, tmp_path_factory):
  """A finished tiny hcnet_mask_refine run on the phantoms (32x48, 2
  epochs, 16 rays of 8 samples)."""
  config = tiny_mask_config('hcnet_mask_refine', *phantom_hc18)
  config.model_options.refine_rays = 16
  config.model_options.refine_samples = 8
  workdir = str(tmp_path_factory.mktemp('refine_run') / 'fold0')
  train.train_and_evaluate(config, workdir)
  return workdir


def test_a_refined_run_trains_and_predicts(refine_run, phantom_hc18):
  from hc_jax.evaluation import loading  # pylint: disable=import-outside-toplevel
  with open(os.path.join(refine_run, workdir_lib.METRICS_FILE)) as f:
    lines = [json.loads(line) for line in f]
  train_losses = [line['train_loss'] for line in lines if 'train_loss' in line]
  assert train_losses and np.all(np.isfinite(train_losses)), lines
  with open(os.path.join(refine_run, workdir_lib.PREDICTIONS_FILE),
            newline='') as f:
    rows = list(csv.DictReader(f))
  images = [hc18.read_grayscale(os.path.join(
      phantom_hc18[0], 'training_set', r['filename']))[0] for r in rows]
  pixel_sizes = [float(r['pixel_size_mm']) for r in rows]
  predictor = loading.load(refine_run)
  assert predictor.kind.name == 'mask'
  out = predictor(images, pixel_sizes, keep_masks=True)
  np.testing.assert_allclose(out['hc_mm'], [float(r['hc_mm_pred'])
                                            for r in rows], atol=1e-2)
  # The reported ellipse is the refined one: its perimeter is the HC.
  perimeter = ellipse_lib.ramanujan_perimeter(out['ellipse_px'][:, 2],
                                              out['ellipse_px'][:, 3])
  np.testing.assert_allclose(perimeter, out['hc_px'], rtol=1e-4)
  assert np.all((out['quality'] >= 0) & (out['quality'] <= 1))
