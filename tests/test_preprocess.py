"""Tests for hc_jax.preprocess: every op eagerly and inside tf.data, and labels."""

import math

import numpy as np
import pytest
import tensorflow as tf

from hc_jax import preprocess

SIZE = 64  # Model input side for most tests: small keeps them fast.


def draw_ring(height, width, center_x, center_y, semi_axis_a, semi_axis_b,
              angle_rad, thickness_px=6.0):
  """Draws an elliptical ring (a skull outline) into a uint8 [H, W, 1] image."""
  image = np.zeros([height, width], np.uint8)
  perimeter = ramanujan(semi_axis_a, semi_axis_b)
  t = np.linspace(0.0, 2.0 * np.pi, int(8 * perimeter), endpoint=False)
  cos_angle, sin_angle = math.cos(angle_rad), math.sin(angle_rad)
  for offset in np.linspace(-thickness_px / 2, thickness_px / 2,
                            int(2 * thickness_px) + 1):
    along_a = (semi_axis_a + offset) * np.cos(t)
    along_b = (semi_axis_b + offset) * np.sin(t)
    x = np.round(center_x + along_a * cos_angle - along_b * sin_angle)
    y = np.round(center_y + along_a * sin_angle + along_b * cos_angle)
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    image[y[inside].astype(int), x[inside].astype(int)] = 255
  return image[..., np.newaxis]


def ramanujan(semi_axis_a, semi_axis_b):
  h = ((semi_axis_a - semi_axis_b) / (semi_axis_a + semi_axis_b))**2
  return math.pi * (semi_axis_a + semi_axis_b) * (
      1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def ring_moments(image, threshold=0.3):
  """Intensity-weighted centre and covariance of the bright pixels."""
  image = np.asarray(image, np.float64)[..., 0]
  weights = np.where(image > threshold * image.max(), image, 0.0)
  rows, cols = np.nonzero(weights)
  w = weights[rows, cols] / weights[rows, cols].sum()
  center = np.array([np.sum(w * cols), np.sum(w * rows)])
  d = np.stack([cols, rows], axis=1) - center
  return center, (d * w[:, None]).T @ d


def measure_perimeter(image):
  """Perimeter of a thin ring from its second moments (var = semi-axis^2 / 2)."""
  _, covariance = ring_moments(image)
  eigenvalues = np.linalg.eigvalsh(covariance)
  semi_axis_b, semi_axis_a = np.sqrt(2.0 * eigenvalues)
  return ramanujan(semi_axis_a, semi_axis_b)


@pytest.fixture(scope='module')
def ring():
  """A 540x800 scan-sized ring, its true HC in px, and its letterbox image."""
  semi_axis_a, semi_axis_b = 240.0, 180.0
  image = draw_ring(540, 800, 405.0, 265.0, semi_axis_a, semi_axis_b, 0.4)
  letterboxed = preprocess.resize(image, 2 * SIZE, 'letterbox').numpy()
  return {
      'image': image,
      'hc_px': ramanujan(semi_axis_a, semi_axis_b),
      'letterboxed': letterboxed,
      'perimeter': measure_perimeter(letterboxed),
  }


def seed(value):
  return tf.constant([value, 7], tf.int64)


FULL_AUGMENT = preprocess.AugmentConfig(
    flip=True, max_translate_px=5.0, max_rotate_deg=10.0,
    scale_range=(0.9, 1.1))

OPS = {
    'resize_stretch': lambda image: preprocess.resize(image, SIZE, 'stretch'),
    'resize_letterbox': lambda image: preprocess.resize(image, SIZE,
                                                        'letterbox'),
    'to_uint8': lambda image: preprocess.to_uint8(
        tf.cast(image, tf.float32) * 1.3 - 20.0),
    'zscore': preprocess.zscore,
    'random_flip': lambda image: preprocess.random_flip(image, seed(1)),
    'random_translate': lambda image: preprocess.random_translate(
        image, seed(2), max_px=5.0),
    'random_rotate': lambda image: preprocess.random_rotate(
        image, seed(3), max_deg=10.0),
    'random_scale': lambda image: preprocess.random_scale(
        image, seed(4), 0.8, 1.2),
    'augment': lambda image: preprocess.augment(image, seed(5), FULL_AUGMENT),
}


@pytest.mark.parametrize('name', sorted(OPS))
@pytest.mark.parametrize('height,width', [(54, 80), (55, 79)])
def test_eager_and_tf_data_agree(name, height, width):
  op = OPS[name]
  rng = np.random.RandomState(0)
  image = rng.randint(0, 256, [height, width, 1]).astype(np.uint8)
  eager = op(tf.constant(image))
  # from_generator leaves H and W unknown, as a TFDS image feature does.
  dataset = tf.data.Dataset.from_generator(
      lambda: iter([image]),
      output_signature=tf.TensorSpec([None, None, 1], tf.uint8)).map(op)
  in_graph = next(iter(dataset))
  tf.nest.map_structure(
      lambda e, g: np.testing.assert_allclose(e.numpy(), g.numpy(), atol=1e-4),
      eager, in_graph)


@pytest.mark.parametrize('mode', preprocess.RESIZE_MODES)
@pytest.mark.parametrize('height,width',
                         [(540, 800), (544, 796), (600, 600), (300, 200)])
def test_resize_shape_dtype_range(mode, height, width):
  image = np.random.RandomState(1).randint(
      0, 256, [height, width, 1]).astype(np.uint8)
  resized = preprocess.resize(image, SIZE, mode)
  assert resized.shape == (SIZE, SIZE, 1)
  assert resized.dtype == tf.float32
  assert 0.0 <= float(tf.reduce_min(resized))
  assert float(tf.reduce_max(resized)) <= 255.0


def test_letterbox_pads_centred_with_zeros():
  image = np.full([540, 800, 1], 200, np.uint8)
  resized = preprocess.resize(image, SIZE, 'letterbox').numpy()[..., 0]
  content_rows = np.nonzero(resized.max(axis=1) > 0)[0]
  # 540 * 64 / 800 = 43.2 -> 43 rows, (64 - 43) // 2 = 10 zero rows on top.
  assert (content_rows.min(), content_rows.max()) == (10, 52)
  assert (resized.max(axis=0) > 0).all()


def test_unknown_resize_mode_raises():
  with pytest.raises(ValueError, match='letterbox'):
    preprocess.resize(np.zeros([4, 4, 1], np.uint8), SIZE, 'crop')


def test_letterbox_keeps_a_circle_round_and_stretch_does_not():
  circle = draw_ring(540, 800, 400.0, 270.0, 200.0, 200.0, 0.0)
  letterboxed = preprocess.resize(circle, 2 * SIZE, 'letterbox').numpy()
  _, covariance = ring_moments(letterboxed)
  std_x, std_y = np.sqrt(np.diag(covariance))
  assert std_x == pytest.approx(std_y, rel=0.02)
  # Letterboxing scales by 128 / 800: a radius of 200 px becomes 32 px.
  assert std_x == pytest.approx(32.0 / math.sqrt(2), rel=0.03)
  stretched = preprocess.resize(circle, 2 * SIZE, 'stretch').numpy()
  _, covariance = ring_moments(stretched)
  std_x, std_y = np.sqrt(np.diag(covariance))
  assert std_y / std_x == pytest.approx(800 / 540, rel=0.03)


def test_to_uint8_rounds_and_clips():
  values = tf.constant([-3.0, 0.4, 0.6, 127.5, 254.6, 300.0])
  np.testing.assert_array_equal(
      preprocess.to_uint8(values).numpy(), [0, 0, 1, 128, 255, 255])
  assert preprocess.to_uint8(values).dtype == tf.uint8


def test_zscore_standardises():
  image = np.random.RandomState(2).randint(0, 256, [SIZE, SIZE, 1])
  standardised = preprocess.zscore(image.astype(np.uint8)).numpy()
  assert standardised.dtype == np.float32
  assert standardised.mean() == pytest.approx(0.0, abs=1e-5)
  assert standardised.std() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize('value', [0, 7, 255])
def test_zscore_of_constant_image_is_zero_not_nan(value):
  standardised = preprocess.zscore(np.full([8, 8, 1], value, np.uint8))
  np.testing.assert_array_equal(standardised.numpy(), 0.0)


def test_flip_is_an_exact_mirror_half_the_time():
  image = np.random.RandomState(3).randint(0, 256, [9, 13, 1]).astype(np.uint8)
  flipped = 0
  for value in range(200):
    out = preprocess.random_flip(image, seed(value)).numpy()
    assert out.dtype == np.uint8
    if np.array_equal(out, image[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out, image)
  assert 70 < flipped < 130


def test_letterbox_perimeter_is_hc_times_the_resize_scale(ring):
  # Validates the moment-based measurement used below: 128 / 800 = 0.16.
  assert ring['perimeter'] == pytest.approx(ring['hc_px'] * 0.16, rel=0.02)


@pytest.mark.parametrize('value', range(3))
def test_rotate_translate_flip_keep_hc(ring, value):
  image = ring['letterboxed']
  rotated = preprocess.random_rotate(image, seed(value), max_deg=30.0)
  translated = preprocess.random_translate(image, seed(value), max_px=5.0)
  flipped = preprocess.random_flip(image, seed(value))
  no_zoom = preprocess.AugmentConfig(max_translate_px=5.0, max_rotate_deg=30.0)
  augmented, hc_scale = preprocess.augment(image, seed(value), no_zoom)
  assert float(hc_scale) == 1.0
  for out in (rotated, translated, flipped, augmented):
    assert measure_perimeter(out.numpy()) == pytest.approx(ring['perimeter'],
                                                           rel=0.02)


def test_rotation_turns_from_plus_x_towards_plus_y():
  # A dot 10 px right of the centre of a 21x31 image (centre row 10, col 15).
  image = np.zeros([21, 31, 1], np.float32)
  image[10, 25] = 255.0
  quarter_turn = preprocess.affine_warp(image, angle_rad=math.pi / 2).numpy()
  # Angles go from +x towards +y (column towards row), as HC18's ellipse angle.
  assert np.unravel_index(quarter_turn.argmax(), image.shape) == (20, 15, 0)
  assert quarter_turn.max() == pytest.approx(255.0, abs=1e-3)


def test_zoom_is_about_the_centre():
  image = np.zeros([21, 31, 1], np.float32)
  image[10, 25] = 255.0
  half = preprocess.affine_warp(image, scale=0.5).numpy()
  assert np.unravel_index(half.argmax(), image.shape) == (10, 20, 0)


def test_translation_moves_the_centre(ring):
  image = ring['letterboxed']
  center_before, _ = ring_moments(image)
  shifted = preprocess.affine_warp(image, translate_xy=(4.0, -3.0))
  center_after, _ = ring_moments(shifted.numpy())
  np.testing.assert_allclose(center_after - center_before, [4.0, -3.0],
                             atol=0.1)


@pytest.mark.parametrize('value', range(3))
def test_random_scale_multiplies_hc_by_scale(ring, value):
  image = ring['letterboxed']
  zoomed, scale = preprocess.random_scale(image, seed(value), 0.8, 1.25)
  assert 0.8 <= float(scale) <= 1.25
  assert measure_perimeter(zoomed.numpy()) == pytest.approx(
      ring['perimeter'] * float(scale), rel=0.02)
  augmented, hc_scale = preprocess.augment(image, seed(value), FULL_AUGMENT)
  assert 0.9 <= float(hc_scale) <= 1.1
  assert measure_perimeter(augmented.numpy()) == pytest.approx(
      ring['perimeter'] * float(hc_scale), rel=0.02)


def test_augment_is_reproducible_per_seed(ring):
  image = ring['letterboxed']
  first, first_scale = preprocess.augment(image, seed(11), FULL_AUGMENT)
  again, again_scale = preprocess.augment(image, seed(11), FULL_AUGMENT)
  other, other_scale = preprocess.augment(image, seed(12), FULL_AUGMENT)
  np.testing.assert_array_equal(first.numpy(), again.numpy())
  assert float(first_scale) == float(again_scale)
  assert not np.allclose(first.numpy(), other.numpy())
  assert float(first_scale) != float(other_scale)


def test_augment_without_settings_is_identity(ring):
  image = ring['letterboxed']
  out, hc_scale = preprocess.augment(image, seed(0), preprocess.NO_AUGMENT)
  np.testing.assert_array_equal(out.numpy(), image)
  assert float(hc_scale) == 1.0


@pytest.mark.parametrize('fields', [
    {'max_translate_px': -1.0},
    {'max_rotate_deg': -5.0},
    {'scale_range': (1.2, 0.8)},
    {'scale_range': (0.0, 1.0)},
])
def test_augment_config_rejects_bad_ranges(fields):
  with pytest.raises(ValueError):
    preprocess.AugmentConfig(**fields)


def test_targets_round_trip():
  hc_px = np.array([400.0, 1234.5], np.float32)
  pixel_size_mm = np.array([0.1, 0.25], np.float32)
  target = preprocess.hc_target(hc_px, 1000.0)
  np.testing.assert_allclose(target, hc_px / 1000.0)
  np.testing.assert_allclose(preprocess.hc_px_from_target(target, 1000.0),
                             hc_px, rtol=1e-6)
  np.testing.assert_allclose(
      preprocess.hc_mm_from_target(target, 1000.0, pixel_size_mm),
      hc_px * pixel_size_mm, rtol=1e-6)
