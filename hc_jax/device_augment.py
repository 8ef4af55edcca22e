"""Training augmentation on the accelerator, in JAX: no TensorFlow needed.

The same augmentation as `hc_jax.preprocess.augment` (the tf.data path), for
batches gathered from images kept on the device:

* a horizontal flip with probability 0.5;
* one combined rotation about the image centre (uniform in
  ±`max_rotate_deg`), shift (uniform in ±`max_translate_px` per axis) and
  optional zoom (uniform in `scale_range`; HC is multiplied by the zoom),
  resampled once, bilinear, with zeros outside the image;
* then each image is z-scored (zero mean, unit standard deviation).

The transform convention is `preprocess.affine_warp`'s: x is the column, y
the row, the angle turns +x towards +y, the centre is `((W - 1) / 2,
(H - 1) / 2)`, and the forward map is `p_out = c + t + scale * R(angle)
(p_in - c)`. The warp samples the input at the inverse map with
`jax.scipy.ndimage.map_coordinates(order=1, mode='constant', cval=0)`; the
flip is folded into the same sampling (x -> W - 1 - x), which equals flipping
first because bilinear weights are symmetric. Random draws come from
`jax.random` keys, so they differ from the TF path's draws but follow the same
distributions.

  images, hc_scale = device_augment.augment_batch(key, uint8_images, config)
  images = device_augment.zscore_batch(uint8_images)  # evaluation
"""

import math

import jax
import jax.numpy as jnp

from hc_jax.augmentation import AugmentConfig
from hc_jax.augmentation import NO_AUGMENT  # pylint: disable=unused-import
from hc_jax.augmentation import ZSCORE_EPS




def zscore(image: jax.Array, eps: float = ZSCORE_EPS) -> jax.Array:
  """Standardises one image to zero mean and unit (population) SD.

  Args:
    image: image of any real or integer dtype.
    eps: lower bound on the standard deviation.

  Returns:
    float32 image of the same shape.
  """
  image = jnp.asarray(image, jnp.float32)
  mean = jnp.mean(image)
  std = jnp.std(image)
  return (image - mean) / jnp.maximum(std, eps)


def zscore_batch(images: jax.Array) -> jax.Array:
  """`zscore` of each image of a `[B, H, W, C]` batch; float32."""
  return jax.vmap(zscore)(images)


def affine_warp(image: jax.Array, angle_rad=0.0, translate_xy=(0.0, 0.0),
                scale=1.0, flip=False) -> jax.Array:
  """Flips, rotates, zooms and shifts one image about its centre.

  The JAX twin of `preprocess.affine_warp` (same convention, bilinear, zero
  fill), with the flip of `preprocess.random_flip` folded in: `flip=True`
  warps the mirrored image.

  Args:
    image: `[H, W, C]` image of any real or integer dtype.
    angle_rad: rotation angle in radians (scalar, may be traced).
    translate_xy: `(tx, ty)` shift in output pixels.
    scale: zoom factor (> 1 enlarges the head).
    flip: whether to mirror left-right first (bool, may be traced).

  Returns:
    float32 `[H, W, C]` warped image.
  """
  image = jnp.asarray(image, jnp.float32)
  height, width = image.shape[:2]
  center_x, center_y = (width - 1) / 2.0, (height - 1) / 2.0
  translate_xy = jnp.asarray(translate_xy, jnp.float32)
  cos = jnp.cos(angle_rad) / scale
  sin = jnp.sin(angle_rad) / scale
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32),
                            indexing='ij')
  # Inverse map p_in = c + R(-angle) (p_out - c - t) / scale.
  dx = cols - center_x - translate_xy[0]
  dy = rows - center_y - translate_xy[1]
  x_in = center_x + cos * dx + sin * dy
  y_in = center_y - sin * dx + cos * dy
  x_in = jnp.where(flip, (width - 1) - x_in, x_in)

  def warp_channel(channel):
    return jax.scipy.ndimage.map_coordinates(
        channel, [y_in, x_in], order=1, mode='constant', cval=0.0)

  return jax.vmap(warp_channel, in_axes=-1, out_axes=-1)(image)


def augment_image(key: jax.Array, image: jax.Array,
                  config: AugmentConfig) -> tuple[jax.Array, jax.Array]:
  """Augments and z-scores one image.

  Args:
    key: a `jax.random` key.
    image: `[H, W, C]` image, values in 0..255 (uint8 or float).
    config: an `AugmentConfig`.

  Returns:
    `(image, hc_scale)`: the float32 augmented, z-scored image and the float32
    scalar by which HC changed (1 unless `config.scale_range` is set).
  """
  flip_key, rotate_key, translate_key, scale_key = jax.random.split(key, 4)
  flip = (jax.random.uniform(flip_key) < 0.5) if config.flip else False
  angle_rad = jax.random.uniform(
      rotate_key, minval=-config.max_rotate_deg,
      maxval=config.max_rotate_deg) * (math.pi / 180.0)
  translate_xy = jax.random.uniform(
      translate_key, (2,), minval=-config.max_translate_px,
      maxval=config.max_translate_px)
  hc_scale = jnp.float32(1.0)
  if config.scale_range is not None:
    hc_scale = jax.random.uniform(scale_key, minval=config.scale_range[0],
                                  maxval=config.scale_range[1])
  if config.flip or config.has_affine:
    image = affine_warp(image, angle_rad, translate_xy, hc_scale, flip)
  return zscore(image), hc_scale


def augment_batch(key: jax.Array, images: jax.Array,
                  config: AugmentConfig) -> tuple[jax.Array, jax.Array]:
  """`augment_image` over a `[B, H, W, C]` batch, one key per image.

  Args:
    key: a `jax.random` key; image i uses `jax.random.split(key, B)[i]`.
    images: `[B, H, W, C]` images, values in 0..255.
    config: an `AugmentConfig` (static under `jax.jit`).

  Returns:
    `(images, hc_scale)`: float32 `[B, H, W, C]` and float32 `[B]`.
  """
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(augment_image, in_axes=(0, 0, None))(keys, images, config)
