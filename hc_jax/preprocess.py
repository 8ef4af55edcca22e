"""Per-image preprocessing ops for fetal head ultrasound.

Small named TensorFlow functions on one image `[H, W, C]` (C is 1 for HC18).
Every op works both eagerly and inside `tf.data` (graph mode); the tests check
that the two agree.

Random ops are stateless: each takes an explicit `seed`, an integer tensor of
shape [2], so the same seed always gives the same output, whatever runs before.

Targets. The regression target is the head circumference in pixels of the
ORIGINAL image divided by a constant `normaliser_px`, so it is the same for the
'stretch' and 'letterbox' resize modes, and a prediction converts back with
`pred * normaliser_px * pixel_size_mm` in both. How augmentation moves the
label:

* 'letterbox' (aspect ratio kept): flip, rotation and translation are rigid
  maps of the original image, so HC is exactly unchanged; a zoom by `scale`
  multiplies it by exactly `scale`.
* 'stretch' (the paper: whole image squashed to a square): flip, translation
  and zoom commute with the anisotropic stretch, so they behave as above, but a
  rotation in the stretched frame is a slight shear of the original head, which
  leaves HC unchanged only to first order in the angle and the aspect ratio.
  This is what the paper does.
"""

import math

import tensorflow as tf

from hc_jax.augmentation import AugmentConfig  # pylint: disable=unused-import
from hc_jax.augmentation import NO_AUGMENT  # pylint: disable=unused-import
from hc_jax.augmentation import ZSCORE_EPS
# Targets live in a TF-free module; re-exported for the pipeline's users.
from hc_jax.targets import RESIZE_MODES
from hc_jax.targets import hc_mm_from_target  # pylint: disable=unused-import
from hc_jax.targets import hc_px_from_target  # pylint: disable=unused-import
from hc_jax.targets import hc_target




def _check_resize_mode(mode):
  if mode not in RESIZE_MODES:
    raise ValueError(
        f'Unknown resize mode {mode!r}; expected one of {RESIZE_MODES}.')


def resize(image, size, mode='stretch'):
  """Resizes one ultrasound image to a square `size` x `size`.

  Args:
    image: `[H, W, C]` image of any real dtype, values in 0..255.
    size: side of the square output, in pixels.
    mode: 'stretch' resizes the whole image to `size` x `size` (bilinear with
      antialiasing, as in the paper; the aspect ratio is not kept).
      'letterbox' scales by `size / max(H, W)`, keeping the aspect ratio, and
      pads with zeros, centred, to `size` x `size`.

  Returns:
    float32 `[size, size, C]` image in the 0..255 range.

  Raises:
    ValueError: for a `mode` not in `RESIZE_MODES`.
  """
  _check_resize_mode(mode)
  image = tf.convert_to_tensor(image)
  channels = image.shape[-1]
  image = tf.cast(image, tf.float32)
  if mode == 'stretch':
    resized = tf.image.resize(
        image, [size, size], method='bilinear', antialias=True)
  else:
    height_width = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_max(height_width)
    new_height_width = tf.clip_by_value(
        tf.cast(tf.round(height_width * scale), tf.int32), 1, size)
    resized = tf.image.resize(
        image, new_height_width, method='bilinear', antialias=True)
    offset = (size - new_height_width) // 2
    resized = tf.image.pad_to_bounding_box(
        resized, offset[0], offset[1], size, size)
  # Antialiased bilinear weights are a convex combination; the clip only
  # removes float rounding so to_uint8 and callers can rely on the range.
  resized = tf.clip_by_value(resized, 0.0, 255.0)
  return tf.ensure_shape(resized, [size, size, channels])


def to_uint8(image):
  """Rounds and clips an image to uint8, the form the cache stores.

  Args:
    image: real-valued image, nominally in 0..255.

  Returns:
    uint8 image of the same shape.
  """
  image = tf.cast(image, tf.float32)
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def zscore(image, eps=ZSCORE_EPS):
  """Standardises each image to zero mean and unit standard deviation.

  Args:
    image: `[H, W, C]` image, or a batch `[B, H, W, C]` (each image on its
      own), of any real dtype.
    eps: lower bound on the standard deviation, so a constant image maps to
      zeros rather than NaN.

  Returns:
    float32 image of the same shape.
  """
  image = tf.cast(image, tf.float32)
  mean = tf.reduce_mean(image, axis=[-3, -2, -1], keepdims=True)
  std = tf.math.reduce_std(image, axis=[-3, -2, -1], keepdims=True)
  return (image - mean) / tf.maximum(std, eps)


# ----------------------------------------------------------------------------
# Augmentation.
# ----------------------------------------------------------------------------


# AugmentConfig and NO_AUGMENT live in the TF-free hc_jax.augmentation.




def _uniform(seed, shape, minval, maxval):
  return tf.random.stateless_uniform(
      shape, seed=seed, minval=minval, maxval=maxval, dtype=tf.float32)


def _inverse_transforms(angle_rad, translate_xy, scale, height, width):
  """ImageProjectiveTransform vectors ([..., 8]) of `affine_warp`'s map."""
  center_x = (tf.cast(width, tf.float32) - 1.0) / 2.0
  center_y = (tf.cast(height, tf.float32) - 1.0) / 2.0
  cos = tf.cos(angle_rad) / scale
  sin = tf.sin(angle_rad) / scale
  # Inverse linear part A = R(-angle) / scale, offset b = c - A (c + t).
  a0, a1, a3, a4 = cos, sin, -sin, cos
  shifted_x = center_x + translate_xy[..., 0]
  shifted_y = center_y + translate_xy[..., 1]
  a2 = center_x - a0 * shifted_x - a1 * shifted_y
  a5 = center_y - a3 * shifted_x - a4 * shifted_y
  zero = tf.zeros_like(a0)
  return tf.stack([a0, a1, a2, a3, a4, a5, zero, zero], axis=-1)


def affine_warp(image, angle_rad=0.0, translate_xy=(0.0, 0.0), scale=1.0):
  """Rotates, zooms and shifts an image about its centre in one resample.

  The forward map (input pixel to output pixel, x = column, y = row, angle from
  +x towards +y, like the HC18 ellipse angle) is
  `p_out = c + t + scale * R(angle) (p_in - c)` with `c` the image centre.
  `ImageProjectiveTransformV3` wants the inverse, output to input:
  `p_in = c + R(-angle) (p_out - c - t) / scale`. Bilinear, zero fill.

  Args:
    image: `[H, W, C]` image, or a batch `[B, H, W, C]` with per-image
      `angle_rad` [B], `translate_xy` [B, 2] and `scale` [B].
    angle_rad: rotation angle in radians.
    translate_xy: `(tx, ty)` shift in output pixels.
    scale: zoom factor (> 1 enlarges the head).

  Returns:
    float32 warped image(s), the shape of `image`.
  """
  image = tf.cast(tf.convert_to_tensor(image), tf.float32)
  batched = image.shape.rank == 4
  images = image if batched else image[tf.newaxis]
  height_width = tf.shape(images)[1:3]
  transforms = _inverse_transforms(
      tf.cast(angle_rad, tf.float32), tf.cast(translate_xy, tf.float32),
      tf.cast(scale, tf.float32), height_width[0], height_width[1])
  transforms = tf.reshape(transforms, [-1, 8])
  warped = tf.raw_ops.ImageProjectiveTransformV3(
      images=images,
      transforms=transforms,
      output_shape=height_width,
      fill_value=tf.constant(0.0, tf.float32),
      interpolation='BILINEAR',
      fill_mode='CONSTANT')
  return tf.ensure_shape(warped if batched else warped[0], image.shape)


def random_flip(image, seed):
  """Mirrors the image left-right with probability 0.5.

  Args:
    image: `[H, W, C]` image.
    seed: int tensor of shape [2].

  Returns:
    The image, flipped or not, same dtype.
  """
  image = tf.convert_to_tensor(image)
  do_flip = _uniform(seed, [], 0.0, 1.0) < 0.5
  return tf.cond(do_flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def random_translate(image, seed, max_px=5.0):
  """Shifts the image by up to `max_px` pixels along each axis.

  Args:
    image: `[H, W, C]` image.
    seed: int tensor of shape [2].
    max_px: largest shift per axis, in pixels.

  Returns:
    float32 shifted image; HC is unchanged.
  """
  translate_xy = _uniform(seed, [2], -max_px, max_px)
  return affine_warp(image, translate_xy=translate_xy)


def random_rotate(image, seed, max_deg=10.0):
  """Rotates the image about its centre by up to `max_deg` degrees.

  Args:
    image: `[H, W, C]` image.
    seed: int tensor of shape [2].
    max_deg: largest rotation either way, in degrees.

  Returns:
    float32 rotated image; HC is unchanged (see the module docstring).
  """
  angle_rad = _uniform(seed, [], -max_deg, max_deg) * (math.pi / 180.0)
  return affine_warp(image, angle_rad=angle_rad)


def random_scale(image, seed, min_scale, max_scale):
  """Zooms about the image centre by a factor drawn from the given range.

  Args:
    image: `[H, W, C]` image.
    seed: int tensor of shape [2].
    min_scale: smallest zoom factor.
    max_scale: largest zoom factor.

  Returns:
    `(image, scale)`: the float32 zoomed image and the float32 scalar factor
    that multiplies HC.
  """
  scale = _uniform(seed, [], min_scale, max_scale)
  return affine_warp(image, scale=scale), scale


def augment_params(seed, config):
  """Draws one image's augmentation: flip, rotation, shift and zoom.

  Drawing (per example) is split from applying (`apply_augment`, per batch)
  so the pipeline can warp a whole batch in one call.

  Args:
    seed: int tensor of shape [2].
    config: an `AugmentConfig`.

  Returns:
    {'flip': bool, 'angle_rad': float32, 'translate_xy': float32 [2],
    'hc_scale': float32 (the factor by which HC changes; 1 without zoom)}.
  """
  flip_seed, rotate_seed, translate_seed, scale_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=4))
  flip = _uniform(flip_seed, [], 0.0, 1.0) < 0.5
  params = {
      'flip': tf.logical_and(flip, config.flip),
      'angle_rad': _uniform(rotate_seed, [], -config.max_rotate_deg,
                            config.max_rotate_deg) * (math.pi / 180.0),
      'translate_xy': _uniform(translate_seed, [2], -config.max_translate_px,
                               config.max_translate_px),
      'hc_scale': tf.constant(1.0, tf.float32),
  }
  if config.scale_range is not None:
    params['hc_scale'] = _uniform(scale_seed, [], *config.scale_range)
  return params


def apply_augment(images, params, config):
  """Applies drawn augmentations to a batch: flip, then one combined warp.

  Composing the affine parts into one warp costs a single resample (one
  bilinear blur) however many are enabled.

  Args:
    images: `[B, H, W, C]` images, values in 0..255.
    params: `augment_params` outputs stacked over the batch.
    config: the `AugmentConfig` they were drawn with.

  Returns:
    float32 `[B, H, W, C]` augmented images.
  """
  images = tf.cast(tf.convert_to_tensor(images), tf.float32)
  if config.flip:
    images = tf.where(params['flip'][:, tf.newaxis, tf.newaxis, tf.newaxis],
                      tf.reverse(images, axis=[2]), images)
  if not config.has_affine:
    return images
  return affine_warp(images, params['angle_rad'], params['translate_xy'],
                     params['hc_scale'])


def augment(image, seed, config):
  """Applies a flip, then one combined rotation/translation/zoom, to one image.

  Args:
    image: `[H, W, C]` image, values in 0..255.
    seed: int tensor of shape [2].
    config: an `AugmentConfig`.

  Returns:
    `(image, hc_scale)`: the float32 augmented image and the float32 scalar
    factor by which HC changed (1 unless `config.scale_range` is set).
  """
  params = augment_params(seed, config)
  batch = {name: value[tf.newaxis] for name, value in params.items()}
  image = apply_augment(tf.convert_to_tensor(image)[tf.newaxis], batch, config)
  return tf.ensure_shape(image[0], tf.convert_to_tensor(image).shape[1:]), (
      params['hc_scale'])
