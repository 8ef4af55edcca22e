"""Resizing ultrasound images to the model input (TensorFlow ops).

The images are resized once, when HC18 is prepared (`hc_jax.data.cache`), and
again by `hc_jax.predict` for new scans, with the same op, so a model sees
the same input at training and at inference. Augmentation is not here: it
runs in JAX inside the jitted training step (`hc_jax.data.augment`).

The ops work on one image `[H, W, C]`, eagerly and inside tf.data; the
tests check that the two agree.
"""

import tensorflow as tf

RESIZE_MODES = ('stretch', 'letterbox')


def _check_resize_mode(mode):
  if mode not in RESIZE_MODES:
    raise ValueError(
        f'Unknown resize mode {mode!r}; expected one of {RESIZE_MODES}.')


def _height_width(size):
  if isinstance(size, int):
    return size, size
  height, width = size
  return int(height), int(width)


def resize(image, size, mode='stretch'):
  """Resizes one ultrasound image to the model input.

  Args:
    image: `[H, W, C]` image of any real dtype, values in 0..255.
    size: the output: an int (a square) or `(height, width)`.
    mode: 'stretch' resizes the whole image to the output (bilinear with
      antialiasing, as in the paper; the aspect ratio is not kept).
      'letterbox' scales by `min(out_h / H, out_w / W)`, keeping the aspect
      ratio, and pads with zeros, centred. `cache.resize_geometry`
      gives where an original pixel lands, for either mode.

  Returns:
    float32 `[out_h, out_w, C]` image in the 0..255 range.

  Raises:
    ValueError: for a `mode` not in `RESIZE_MODES`.
  """
  _check_resize_mode(mode)
  out_h, out_w = _height_width(size)
  image = tf.convert_to_tensor(image)
  channels = image.shape[-1]
  image = tf.cast(image, tf.float32)
  if mode == 'stretch':
    resized = tf.image.resize(
        image, [out_h, out_w], method='bilinear', antialias=True)
  else:
    height_width = tf.cast(tf.shape(image)[:2], tf.float64)
    out_hw = tf.constant([out_h, out_w], tf.float64)
    scale = tf.reduce_min(out_hw / height_width)
    new_height_width = tf.clip_by_value(
        tf.cast(tf.round(height_width * scale), tf.int32), 1, [out_h, out_w])
    resized = tf.image.resize(
        image, new_height_width, method='bilinear', antialias=True)
    offset = (tf.constant([out_h, out_w]) - new_height_width) // 2
    resized = tf.image.pad_to_bounding_box(
        resized, offset[0], offset[1], out_h, out_w)
  # Antialiased bilinear weights are a convex combination; the clip only
  # removes float rounding so to_uint8 and callers can rely on the range.
  resized = tf.clip_by_value(resized, 0.0, 255.0)
  return tf.ensure_shape(resized, [out_h, out_w, channels])


def to_uint8(image):
  """Rounds and clips an image to uint8, the form the cache stores.

  Args:
    image: real-valued image, nominally in 0..255.

  Returns:
    uint8 image of the same shape.
  """
  image = tf.cast(image, tf.float32)
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
