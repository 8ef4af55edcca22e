"""Tests for hc_jax.data.resize and the TensorFlow z-score
(hc_jax.data.normalise), eagerly and inside tf.data, and the resize
geometry that maps original pixels to the model input (hc_jax.data.cache)."""

import math

import numpy as np
import pytest
import tensorflow as tf

from hc_jax.data import augment
from hc_jax.data import cache as cache_lib
from hc_jax.data import ellipse as ellipse_lib
from hc_jax.data import normalise
from hc_jax.data import resize as resize_lib

SIZE = 64  # Model input side for most tests: small keeps them fast.


def draw_ring(height, width, center_x, center_y, semi_axis_a, semi_axis_b,
              angle_rad, thickness_px=6.0):
  """Draws an elliptical ring (a skull outline) into a uint8 [H, W, 1] image."""
  image = np.zeros([height, width], np.uint8)
  perimeter = ellipse_lib.ramanujan_perimeter(semi_axis_a, semi_axis_b)
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
  return ellipse_lib.ramanujan_perimeter(semi_axis_a, semi_axis_b)


OPS = {
    'resize_stretch': lambda image: resize_lib.resize(image, SIZE, 'stretch'),
    'resize_letterbox': lambda image: resize_lib.resize(image, SIZE,
                                                        'letterbox'),
    'to_uint8': lambda image: resize_lib.to_uint8(
        tf.cast(image, tf.float32) * 1.3 - 20.0),
    'zscore': normalise.zscore_tf,
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


@pytest.mark.parametrize('mode', resize_lib.RESIZE_MODES)
@pytest.mark.parametrize('height,width',
                         [(540, 800), (544, 796), (600, 600), (300, 200)])
def test_resize_shape_dtype_range(mode, height, width):
  image = np.random.RandomState(1).randint(
      0, 256, [height, width, 1]).astype(np.uint8)
  resized = resize_lib.resize(image, SIZE, mode)
  assert resized.shape == (SIZE, SIZE, 1)
  assert resized.dtype == tf.float32
  assert 0.0 <= float(tf.reduce_min(resized))
  assert float(tf.reduce_max(resized)) <= 255.0


def test_letterbox_pads_centred_with_zeros():
  image = np.full([540, 800, 1], 200, np.uint8)
  resized = resize_lib.resize(image, SIZE, 'letterbox').numpy()[..., 0]
  content_rows = np.nonzero(resized.max(axis=1) > 0)[0]
  # 540 * 64 / 800 = 43.2 -> 43 rows, (64 - 43) // 2 = 10 zero rows on top.
  assert (content_rows.min(), content_rows.max()) == (10, 52)
  assert (resized.max(axis=0) > 0).all()


def test_unknown_resize_mode_raises():
  with pytest.raises(ValueError, match='letterbox'):
    resize_lib.resize(np.zeros([4, 4, 1], np.uint8), SIZE, 'crop')


def test_letterbox_keeps_a_circle_round_and_stretch_does_not():
  circle = draw_ring(540, 800, 400.0, 270.0, 200.0, 200.0, 0.0)
  letterboxed = resize_lib.resize(circle, 2 * SIZE, 'letterbox').numpy()
  _, covariance = ring_moments(letterboxed)
  std_x, std_y = np.sqrt(np.diag(covariance))
  assert std_x == pytest.approx(std_y, rel=0.02)
  # Letterboxing scales by 128 / 800: a radius of 200 px becomes 32 px.
  assert std_x == pytest.approx(32.0 / math.sqrt(2), rel=0.03)
  stretched = resize_lib.resize(circle, 2 * SIZE, 'stretch').numpy()
  _, covariance = ring_moments(stretched)
  std_x, std_y = np.sqrt(np.diag(covariance))
  assert std_y / std_x == pytest.approx(800 / 540, rel=0.03)


def test_to_uint8_rounds_and_clips():
  values = tf.constant([-3.0, 0.4, 0.6, 127.5, 254.6, 300.0])
  np.testing.assert_array_equal(
      resize_lib.to_uint8(values).numpy(), [0, 0, 1, 128, 255, 255])
  assert resize_lib.to_uint8(values).dtype == tf.uint8


def test_zscore_standardises():
  image = np.random.RandomState(2).randint(0, 256, [SIZE, SIZE, 1])
  standardised = normalise.zscore_tf(image.astype(np.uint8)).numpy()
  assert standardised.dtype == np.float32
  assert standardised.mean() == pytest.approx(0.0, abs=1e-5)
  assert standardised.std() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize('value', [0, 7, 255])
def test_zscore_of_constant_image_is_zero_not_nan(value):
  standardised = normalise.zscore_tf(np.full([8, 8, 1], value, np.uint8))
  np.testing.assert_array_equal(standardised.numpy(), 0.0)


@pytest.mark.parametrize('size', [(48, 80), (80, 48), 64])
@pytest.mark.parametrize('mode', resize_lib.RESIZE_MODES)
def test_non_square_output(size, mode):
  image = np.full([540, 800, 1], 100, np.uint8)
  out_hw = (size, size) if isinstance(size, int) else size
  assert resize_lib.resize(image, size, mode).shape == (*out_hw, 1)


@pytest.mark.parametrize('mode', resize_lib.RESIZE_MODES)
@pytest.mark.parametrize('original_hw, out_hw', [
    ((540, 800), (128, 192)), ((544, 796), (128, 128)), ((600, 500), (96, 160))])
def test_resize_geometry_maps_the_head_where_resize_puts_it(
    mode, original_hw, out_hw):
  """A ring drawn on the original image, resized, lies where the geometry
  says: its centre and second moments match the mapped ellipse."""
  height, width = original_hw
  ellipse = np.array([0.52 * width, 0.47 * height, 0.3 * height,
                      0.22 * height, 0.5], np.float32)
  image = draw_ring(height, width, *ellipse.tolist(), thickness_px=4.0)
  resized = resize_lib.resize(image, out_hw, mode).numpy()
  sx, sy, ox, oy = cache_lib.resize_geometry([original_hw], out_hw, mode)[0]
  mapped = np.asarray(augment.transform_ellipse(
      ellipse, np.diag([sx, sy]).astype(np.float32),
      np.array([ox, oy], np.float32)))
  rows, cols = np.nonzero(resized[..., 0] > 0.5 * resized.max())
  fitted = ellipse_lib.fit_ellipse(cols.astype(float), rows.astype(float))
  np.testing.assert_allclose([fitted.center_x, fitted.center_y], mapped[:2],
                             atol=0.4)
  np.testing.assert_allclose([fitted.semi_axis_a, fitted.semi_axis_b],
                             mapped[2:4], rtol=0.02, atol=0.4)
  assert fitted.perimeter_px == pytest.approx(
      float(augment.ramanujan_perimeter(mapped[2], mapped[3])), rel=0.01)
  if mode == 'stretch':
    assert sx * width == pytest.approx(out_hw[1])
  else:
    assert sx == pytest.approx(sy, rel=0.02)
