"""Tests for hc_jax.data.augment: the warped image and its moved ellipse agree.

The central check renders a head outline at the model-input resolution, warps
it with the same draws as the image path, fits an ellipse to the warped pixels,
maps that back to original pixels and compares it with the returned target.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hc_jax.data import augment
from hc_jax.data import ellipse as ellipse_lib
from hc_jax.data import normalise
from hc_jax.data import phantom


# One compiled call per shape, not op by op (the config is static).
_augment_batch = jax.jit(augment.augment_batch, static_argnames='config')


@pytest.fixture(autouse=True, scope='module')
def _fast_compiles():
  """Compile time dominates these small programs; restored afterwards."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


HEIGHT, WIDTH = 128, 192  # Model input, deliberately not square.
FULL = augment.AugmentConfig(flip=True, max_translate_px=8.0,
                             max_rotate_deg=25.0, scale_range=(0.85, 1.15))


def stretch_resize(original_height=400, original_width=480):
  """Both axes resized to the input independently (sx != sy)."""
  return np.array([WIDTH / original_width, HEIGHT / original_height, 0.0, 0.0])


def letterbox_resize(original_height=270, original_width=300):
  """One scale, the image centred with padding (sx == sy, an offset)."""
  scale = min(HEIGHT / original_height, WIDTH / original_width)
  return np.array([scale, scale, (WIDTH - scale * original_width) / 2,
                   (HEIGHT - scale * original_height) / 2])


RESIZES = {'stretch': (stretch_resize(), (400, 480)),
           'letterbox': (letterbox_resize(), (270, 300))}


def head_ellipses(original_size, batch_size, seed=0):
  """Off-centre, clearly elliptical heads in original pixels, [B, 5]."""
  rng = np.random.default_rng(seed)
  original_height, original_width = original_size
  semi_a = (0.22 * min(original_height, original_width)
            * rng.uniform(0.9, 1.1, batch_size))
  return np.stack([
      original_width * rng.uniform(0.54, 0.6, batch_size),
      original_height * rng.uniform(0.4, 0.46, batch_size),
      semi_a, semi_a * rng.uniform(0.65, 0.8, batch_size),
      rng.uniform(0.0, np.pi, batch_size)], axis=1).astype(np.float32)


def render_ring(ellipse, resize, half_width_px=1.5):
  """The ellipse as a ring of ~3 input px, drawn at the model-input size.

  Each input pixel is taken back to original pixels with the inverse resize
  and lit where it lies near the original outline, so the ring's centreline is
  the resized ellipse without going through the code under test.
  """
  sx, sy, ox, oy = resize
  rows = (np.arange(HEIGHT, dtype=np.float32)[:, None] - oy) / sy
  cols = (np.arange(WIDTH, dtype=np.float32)[None, :] - ox) / sx
  distance, _, _ = phantom.ellipse_distance_px(rows, cols, *ellipse)
  distance_in = np.abs(distance) * min(sx, sy)
  return np.clip(255.0 * (half_width_px + 0.5 - distance_in), 0, 255)[..., None]


def perimeters(ellipses):
  return np.asarray(
      augment.ramanujan_perimeter(ellipses[:, 2], ellipses[:, 3]))


def outline_points(ellipse, num=720):
  """Points `[2, num]` (x; y) on an ellipse `[5]`."""
  center, matrix = (np.asarray(v, np.float64) for v in
                    augment.ellipse_to_matrix(jnp.asarray(ellipse)))
  t = np.linspace(0, 2 * np.pi, num, endpoint=False)
  return center[:, None] + matrix @ np.stack([np.cos(t), np.sin(t)])


def fit_warped_ring(warped, resize):
  """Ellipses fitted to a warped ring: in input and in original pixels."""
  rows, cols = np.nonzero(warped[..., 0] > 127.5)
  fitted_in = ellipse_lib.fit_ellipse(cols, rows)
  x, y = outline_points(list(fitted_in.as_dict().values()))
  sx, sy, ox, oy = resize
  return fitted_in, ellipse_lib.fit_ellipse((x - ox) / sx, (y - oy) / sy)


def assert_targets_match_image(warped, targets, hc_out, resize, hc_tol=0.01):
  """The target outline lies on the warped ring, in input pixels, per image."""
  sx, sy, ox, oy = resize
  for image, target, hc in zip(warped, targets, hc_out):
    fitted_in, fitted = fit_warped_ring(np.asarray(image), resize)
    x, y = outline_points(target)
    distance, _, _ = phantom.ellipse_distance_px(
        sy * y + oy, sx * x + ox, *fitted_in.as_dict().values())
    assert np.max(np.abs(distance)) < 0.5, (target, fitted)
    assert abs(float(hc) / fitted.perimeter_px - 1) < hc_tol, (target, fitted)
    assert abs(target[0] - fitted.center_x) * sx < 0.3
    assert abs(target[1] - fitted.center_y) * sy < 0.3


@pytest.mark.parametrize('flip, angle_deg, shift_xy, zoom, expected_xy', [
    (True, 0.0, (0.0, 0.0), 1.0, (24 - 17, 5)),   # x -> W - 1 - x.
    (False, 90.0, (0.0, 0.0), 1.0, (12 + 3, 8 + 5)),  # +x turns to +y.
    (False, 0.0, (3.0, -2.0), 1.0, (17 + 3, 5 - 2)),
    (False, 0.0, (0.0, 0.0), 2.0, (12 + 10, 8 - 6)),  # About the centre.
    (True, 90.0, (1.0, 0.0), 1.0, (12 + 3 + 1, 8 - 5)),  # Flip, then turn.
])
def test_warp_moves_a_dot_as_documented(flip, angle_deg, shift_xy, zoom,
                                        expected_xy):
  image = np.zeros((1, 17, 25, 1), np.float32)  # Centre (12, 8).
  image[0, 5, 17, 0] = 1.0  # x = 17, y = 5.
  params = dict(flip=jnp.array([flip]),
                angle_rad=jnp.array([math.radians(angle_deg)]),
                translate_xy=jnp.array([shift_xy]), zoom=jnp.array([zoom]))
  warped = np.asarray(augment.warp_images(image, params))[0, ..., 0]
  row, col = np.unravel_index(np.argmax(warped), warped.shape)
  assert (col, row) == expected_xy
  assert warped[row, col] > 0.2


@pytest.mark.parametrize('resize_name', sorted(RESIZES))
def test_targets_follow_random_warps(resize_name):
  resize, original_size = RESIZES[resize_name]
  batch_size = 8
  ellipses = head_ellipses(original_size, batch_size)
  rings = np.stack([render_ring(e, resize) for e in ellipses])
  hc_px = perimeters(ellipses)
  resizes = np.tile(resize, (batch_size, 1)).astype(np.float32)
  key = jax.random.key(3)
  images, targets, hc_out = _augment_batch(
      key, rings, ellipses, hc_px, resizes, FULL)
  params = augment.draw_params(key, batch_size, FULL)
  assert 0 < np.sum(params['flip']) < batch_size  # Both branches are covered.
  assert np.max(np.abs(params['angle_rad'])) > math.radians(10)
  warped = augment.warp_images(rings, params)
  np.testing.assert_allclose(images, normalise.zscore_batch(warped), atol=1e-4)
  assert_targets_match_image(np.asarray(warped), np.asarray(targets), hc_out,
                             resize)


HAND_PICKED = {
    'flip': dict(flip=True, angle_rad=0.0, translate_xy=(0.0, 0.0), zoom=1.0),
    'rotate+': dict(flip=False, angle_rad=0.4, translate_xy=(0.0, 0.0),
                    zoom=1.0),
    'rotate-': dict(flip=False, angle_rad=-0.4, translate_xy=(0.0, 0.0),
                    zoom=1.0),
    'shift': dict(flip=False, angle_rad=0.0, translate_xy=(7.0, -5.0),
                  zoom=1.0),
    'zoom': dict(flip=False, angle_rad=0.0, translate_xy=(0.0, 0.0), zoom=1.2),
    'all': dict(flip=True, angle_rad=0.35, translate_xy=(-6.0, 4.0), zoom=0.9),
}


@pytest.mark.parametrize('resize_name', sorted(RESIZES))
def test_targets_follow_hand_picked_warps(resize_name):
  resize, original_size = RESIZES[resize_name]
  names = sorted(HAND_PICKED)
  params = {field: jnp.asarray(np.array([HAND_PICKED[n][field] for n in names]),
                               jnp.float32 if field != 'flip' else bool)
            for field in HAND_PICKED['all']}
  ellipses = head_ellipses(original_size, len(names), seed=1)
  rings = np.stack([render_ring(e, resize) for e in ellipses])
  hc_px = perimeters(ellipses)
  resizes = np.tile(resize, (len(names), 1)).astype(np.float32)
  targets, hc_out = augment.transform_targets(params, ellipses, hc_px, resizes,
                                              HEIGHT, WIDTH)
  warped = np.asarray(augment.warp_images(rings, params))
  assert_targets_match_image(warped, np.asarray(targets), hc_out, resize)


def test_rotation_under_stretch_changes_hc():
  resize, original_size = RESIZES['stretch']
  ellipses = head_ellipses(original_size, 1)
  params = dict(flip=jnp.array([False]), angle_rad=jnp.array([0.5]),
                translate_xy=jnp.zeros((1, 2)), zoom=jnp.array([1.0]))
  hc_px = augment.ramanujan_perimeter(ellipses[:, 2], ellipses[:, 3])
  _, hc_out = augment.transform_targets(params, ellipses, hc_px,
                                        resize[None].astype(np.float32),
                                        HEIGHT, WIDTH)
  assert abs(float(hc_out[0] / hc_px[0]) - 1) > 0.01


@pytest.mark.parametrize('max_rotate_deg', [0.0, 20.0])
def test_hc_scales_with_zoom_under_isotropic_resize(max_rotate_deg):
  config = augment.AugmentConfig(flip=True, max_translate_px=6.0,
                                 max_rotate_deg=max_rotate_deg,
                                 scale_range=(0.7, 1.3))
  batch_size = 16
  ellipses = head_ellipses((270, 300), batch_size)
  hc_px = np.linspace(100.0, 600.0, batch_size, dtype=np.float32)
  resizes = np.tile(letterbox_resize(), (batch_size, 1)).astype(np.float32)
  key = jax.random.key(7)
  images = np.zeros((batch_size, 8, 12, 1), np.uint8)
  _, _, hc_out = _augment_batch(key, images, ellipses, hc_px, resizes,
                                       config)
  zoom = np.asarray(augment.draw_params(key, batch_size, config)['zoom'])
  assert zoom.min() < 0.85 and zoom.max() > 1.15
  np.testing.assert_allclose(hc_out, hc_px * zoom, rtol=1e-5)


@pytest.mark.parametrize('config', [
    augment.NO_AUGMENT,
    augment.AugmentConfig(flip=False, max_translate_px=0, max_rotate_deg=0)])
def test_identity_config_only_zscores(config):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 16, 24, 1), dtype=np.uint8)
  ellipses = head_ellipses((270, 300), 3)
  hc_px = np.array([150.0, 250.0, 350.0], np.float32)
  resizes = np.tile(stretch_resize(), (3, 1)).astype(np.float32)
  out, targets, hc_out = _augment_batch(
      jax.random.key(0), images, ellipses, hc_px, resizes, config)
  np.testing.assert_allclose(out, normalise.zscore_batch(images), atol=1e-6)
  np.testing.assert_array_equal(targets, ellipses)
  np.testing.assert_array_equal(hc_out, hc_px)


def test_missing_ellipse_falls_back_to_zoom():
  ellipses = head_ellipses((400, 480), 4)
  ellipses[[1, 3]] = np.nan
  hc_px = np.array([200.0, 300.0, 400.0, 500.0], np.float32)
  resizes = np.tile(stretch_resize(), (4, 1)).astype(np.float32)
  key = jax.random.key(2)
  _, targets, hc_out = (np.asarray(v) for v in _augment_batch(
      key, np.zeros((4, 8, 12, 1), np.float32), ellipses, hc_px, resizes, FULL))
  zoom = np.asarray(augment.draw_params(key, 4, FULL)['zoom'])
  assert np.all(np.isnan(targets[[1, 3]]))
  assert np.all(np.isfinite(targets[[0, 2]]))
  np.testing.assert_allclose(hc_out[[1, 3]], (hc_px * zoom)[[1, 3]], rtol=1e-6)


def test_output_is_zscored_float32():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (4, 16, 24, 3), dtype=np.uint8)
  ellipses = head_ellipses((400, 480), 4)
  out, targets, hc_out = _augment_batch(
      jax.random.key(1), images, ellipses, np.ones(4, np.float32),
      np.tile(stretch_resize(), (4, 1)), FULL)
  assert out.dtype == targets.dtype == hc_out.dtype == jnp.float32
  assert out.shape == images.shape
  np.testing.assert_allclose(np.mean(out, axis=(1, 2, 3)), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.std(out, axis=(1, 2, 3)), 1.0, atol=1e-4)


def test_jit_and_member_vmap_match_eager_loop():
  members, batch_size = 3, 4
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (members, batch_size, 16, 24, 1),
                        dtype=np.uint8)
  ellipses = np.stack([head_ellipses((400, 480), batch_size, seed=m)
                       for m in range(members)])
  ellipses[1, 2] = np.nan
  hc_px = rng.uniform(100, 500, (members, batch_size)).astype(np.float32)
  resizes = np.tile(stretch_resize(), (members, batch_size, 1))
  resizes = resizes.astype(np.float32)
  keys = jax.random.split(jax.random.key(5), members)
  step = jax.jit(augment.augment_batch, static_argnames='config')
  vmapped = jax.jit(jax.vmap(lambda *args: augment.augment_batch(*args, FULL)))(
      keys, images, ellipses, hc_px, resizes)
  for member in range(members):
    args = (keys[member], images[member], ellipses[member], hc_px[member],
            resizes[member])
    eager = augment.augment_batch(*args, FULL)
    jitted = step(*args, config=FULL)
    for e, j, v in zip(eager, jitted, vmapped):
      np.testing.assert_allclose(j, e, rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(v[member], e, rtol=1e-4, atol=1e-4)


def test_matrix_round_trip_and_transform():
  rng = np.random.default_rng(3)
  num = 50
  semi_a = rng.uniform(5.0, 300.0, num)
  ellipses = np.stack([rng.uniform(-50, 800, num), rng.uniform(-50, 600, num),
                       semi_a, semi_a * rng.uniform(0.3, 0.99, num),
                       rng.uniform(0.0, np.pi, num)], 1).astype(np.float32)
  center, matrix = augment.ellipse_to_matrix(ellipses)
  back = np.asarray(augment.ellipse_from_matrix(center, matrix))
  np.testing.assert_allclose(back[:, :4], ellipses[:, :4], rtol=1e-5, atol=1e-3)
  angle_error = np.abs(back[:, 4] - ellipses[:, 4])
  assert np.all(np.minimum(angle_error, np.pi - angle_error) < 1e-4)

  linear = rng.normal(0.0, 1.0, (num, 2, 2)).astype(np.float32)
  shift = rng.normal(0.0, 20.0, (num, 2)).astype(np.float32)
  moved = np.asarray(augment.transform_ellipse(ellipses, linear, shift))
  assert np.all(moved[:, 2] >= moved[:, 3])
  assert np.all((moved[:, 4] >= 0) & (moved[:, 4] < np.pi))
  for e, m, lin, t in zip(ellipses, moved, linear, shift):
    points = lin.astype(np.float64) @ outline_points(e) + t[:, None]
    _, _, radius = phantom.ellipse_distance_px(points[1], points[0], *m)
    np.testing.assert_allclose(radius, 1.0, atol=2e-4)


def test_ramanujan_matches_numpy():
  a = np.array([1.0, 50.0, 120.5, 300.0, 7.0, 0.0], np.float32)
  b = np.array([1.0, 20.0, 119.0, 10.0, 0.01, 0.0], np.float32)
  np.testing.assert_allclose(augment.ramanujan_perimeter(a, b),
                             ellipse_lib.ramanujan_perimeter(a, b), rtol=1e-6)


def test_draws_stay_in_their_ranges():
  params = augment.draw_params(jax.random.key(0), 256, FULL)
  assert 0.35 < np.mean(params['flip']) < 0.65
  assert np.max(np.abs(params['angle_rad'])) <= math.radians(25.0) + 1e-6
  assert np.max(np.abs(params['translate_xy'])) <= 8.0
  assert 0.85 <= np.min(params['zoom']) and np.max(params['zoom']) <= 1.15
  plain = augment.draw_params(
      jax.random.key(0), 64,
      augment.AugmentConfig(flip=False, scale_range=None))
  assert not np.any(plain['flip'])
  np.testing.assert_array_equal(plain['zoom'], 1.0)


def test_config_from_dict():
  assert augment.AugmentConfig.from_dict(None) == augment.NO_AUGMENT

  class FakeConfigDict:
    def to_dict(self):
      return dict(flip=False, max_translate_px=3, scale_range=[0.9, 1.1])

  config = augment.AugmentConfig.from_dict(FakeConfigDict())
  assert config == augment.AugmentConfig(False, 3.0, 10.0, (0.9, 1.1))
  assert hash(config) == hash(
      augment.AugmentConfig(False, 3.0, 10.0, (0.9, 1.1)))


@pytest.mark.parametrize('fields', [{'max_rotate_deg': -1.0},
                                    {'max_translate_px': float('nan')},
                                    {'scale_range': (1.2, 0.8)},
                                    {'scale_range': (0.0, 1.0)},
                                    {'scale_range': 1.1},
                                    {'rotate': 10.0}])
def test_config_rejects_bad_settings(fields):
  with pytest.raises(ValueError):
    augment.AugmentConfig.from_dict(fields)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match='ellipses'):
    augment.augment_batch(jax.random.key(0), np.zeros((2, 8, 8, 1)),
                          np.zeros((2, 4)), np.zeros(2), np.zeros((2, 4)), FULL)
  with pytest.raises(ValueError, match='images'):
    augment.augment_batch(jax.random.key(0), np.zeros((8, 8, 1)),
                          np.zeros((2, 5)), np.zeros(2), np.zeros((2, 4)), FULL)


def test_approximate_labels_keep_hc_times_zoom_only():
  """exact_labels=False reproduces the earlier pipeline's labels: under a
  stretch a rotation leaves HC unchanged, only the zoom scales it."""
  key = jax.random.key(3)
  images = jnp.zeros((4, 16, 24, 1), jnp.uint8)
  ellipses = jnp.tile(jnp.array([[400.0, 270.0, 200.0, 120.0, 0.7]]), (4, 1))
  hc_px = augment.ramanujan_perimeter(ellipses[:, 2], ellipses[:, 3])
  resize = jnp.tile(jnp.array([[24 / 800, 16 / 540, 0.0, 0.0]]), (4, 1))
  config = augment.AugmentConfig(max_rotate_deg=30.0, scale_range=(0.8, 1.2))
  approximate = augment.AugmentConfig(max_rotate_deg=30.0,
                                      scale_range=(0.8, 1.2),
                                      exact_labels=False)
  _, moved, exact_hc = _augment_batch(key, images, ellipses, hc_px,
                                             resize, config)
  _, moved_too, approx_hc = _augment_batch(key, images, ellipses, hc_px,
                                                  resize, approximate)
  zoom = augment.draw_params(key, 4, config)['zoom']
  np.testing.assert_allclose(approx_hc, hc_px * zoom, rtol=1e-6)
  np.testing.assert_allclose(moved_too, moved, rtol=1e-6)
  assert np.abs(np.asarray(exact_hc) / np.asarray(approx_hc) - 1).max() > 1e-3
