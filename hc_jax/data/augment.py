"""Training augmentation in JAX that moves the image and its ellipse together.

Each image of a batch gets a horizontal flip (probability 0.5), a rotation about
the image centre (uniform in ±`max_rotate_deg`), a shift (uniform in
±`max_translate_px` per axis) and an optional zoom (uniform in `scale_range`),
combined into one affine map G and applied by one bilinear resampling with
zeros outside the image; then each image is z-scored
(`hc_jax.data.normalise`).

Conventions: x is the column, y the row, pixel centres sit at integers, angles
turn +x towards +y, and the centre of an H x W image is `((W - 1) / 2,
(H - 1) / 2)`. The forward map on model-input pixels is

  G(p) = zoom * R(angle) F (p - c) + c + shift,  i.e.  G(p) = M p + t,

with F = diag(-1, 1) for a flip (x -> W - 1 - x, applied first) or the identity.

The targets follow the image exactly. A per-example resize geometry
`[sx, sy, ox, oy]` maps original-image pixels to model-input pixels,
S(p) = diag(sx, sy) p + (ox, oy) (a stretch has sx != sy, a letterbox sx == sy
and an offset). The augmented input is then the resized view of a virtual
original image whose head ellipse is S^-1 G S applied to the true one; that
ellipse is returned in original pixels, and HC is scaled by the ratio of the
Ramanujan perimeters after and before. Under a stretch a rotation changes the
HC in original pixels, which this accounts for. Images without an ellipse
(a NaN row) get HC times the zoom.

  images, ellipses, hc_px = augment.augment_batch(
      key, uint8_images, ellipses, hc_px, resize, config)  # training
  images = normalise.zscore_batch(uint8_images)            # evaluation

Only JAX, NumPy and the standard library are needed.
"""

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from hc_jax.data import ellipse as ellipse_lib
from hc_jax.data.normalise import zscore_batch

@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Settings of the training augmentation; hashable, so static under jit.

  Attributes:
    flip: horizontal flip with probability 0.5.
    max_translate_px: shift drawn uniformly in ±this per axis, in model-input
      pixels.
    max_rotate_deg: rotation about the image centre drawn uniformly in ±this.
    scale_range: None, or `(min_zoom, max_zoom)` of a zoom about the centre.
    exact_labels: move HC with the warp exactly (under an anisotropic resize
      a rotation changes the true HC); False keeps HC times the zoom only,
      the approximation of the paper's pipeline, for comparison.
  """
  flip: bool = True
  max_translate_px: float = 5.0
  max_rotate_deg: float = 10.0
  scale_range: Optional[Tuple[float, float]] = None
  exact_labels: bool = True

  def __post_init__(self):
    for name in ('max_translate_px', 'max_rotate_deg'):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
        raise ValueError(f'{name} must be a finite number >= 0, got {value!r}.')
      object.__setattr__(self, name, float(value))
    object.__setattr__(self, 'flip', bool(self.flip))
    object.__setattr__(self, 'exact_labels', bool(self.exact_labels))
    if self.scale_range is not None:
      try:
        min_zoom, max_zoom = (float(value) for value in self.scale_range)
      except (TypeError, ValueError):
        raise ValueError('scale_range must be None or (min, max), got '
                         f'{self.scale_range!r}.') from None
      if not 0 < min_zoom <= max_zoom < math.inf:
        raise ValueError('scale_range must satisfy 0 < min <= max, got '
                         f'{self.scale_range!r}.')
      object.__setattr__(self, 'scale_range', (min_zoom, max_zoom))

  @classmethod
  def from_dict(cls, fields: Optional[Mapping[str, Any]]) -> 'AugmentConfig':
    """From a dict or ConfigDict of the fields; None means no augmentation.

    Raises:
      ValueError: for an unknown field or a bad range.
    """
    if fields is None:
      return NO_AUGMENT
    if hasattr(fields, 'to_dict'):  # An ml_collections.ConfigDict.
      fields = fields.to_dict()
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f'unknown augmentation settings {unknown}.')
    return cls(**fields)

  @property
  def has_affine(self) -> bool:
    """Whether any rotation, translation or zoom is drawn."""
    return (self.max_translate_px > 0 or self.max_rotate_deg > 0 or
            self.scale_range is not None)


NO_AUGMENT = AugmentConfig(flip=False, max_translate_px=0.0, max_rotate_deg=0.0)


# ----------------------------------------------------------------------------
# Ellipse geometry. All functions broadcast over leading axes.
# ----------------------------------------------------------------------------


def ramanujan_perimeter(semi_axis_a, semi_axis_b) -> jax.Array:
  """`ellipse.ramanujan_perimeter` in JAX: float32, traceable under jit."""
  return ellipse_lib.ramanujan_perimeter(semi_axis_a, semi_axis_b, xp=jnp)


def ellipse_to_matrix(ellipse: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """`[cx, cy, a, b, angle]` -> `(c [..., 2], A [..., 2, 2])`, A = R diag(a, b).

  The ellipse is the set {c + A u : |u| = 1}.
  """
  ellipse = jnp.asarray(ellipse, jnp.float32)
  center_x, center_y, a, b, angle = (ellipse[..., i] for i in range(5))
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  matrix = jnp.stack([jnp.stack([a * cos, -b * sin], -1),
                      jnp.stack([a * sin, b * cos], -1)], -2)
  return jnp.stack([center_x, center_y], -1), matrix


def ellipse_from_matrix(center: jax.Array, matrix: jax.Array) -> jax.Array:
  """`(c, A)` -> `[cx, cy, a, b, angle]` with a >= b and angle in [0, pi).

  The semi-axes are the square roots of the eigenvalues of A A^T; b is taken
  as |det A| / a, which stays accurate in float32 for thin ellipses.
  """
  gram = matrix @ jnp.swapaxes(matrix, -1, -2)
  p, q, r = gram[..., 0, 0], gram[..., 0, 1], gram[..., 1, 1]
  radius = jnp.sqrt(((p - r) / 2) ** 2 + q ** 2)
  a = jnp.sqrt(jnp.maximum((p + r) / 2 + radius, 0.0))
  det = (matrix[..., 0, 0] * matrix[..., 1, 1]
         - matrix[..., 0, 1] * matrix[..., 1, 0])
  b = jnp.where(a == 0, 0.0, jnp.abs(det) / jnp.where(a == 0, 1.0, a))
  angle = jnp.mod(0.5 * jnp.arctan2(2 * q, p - r), math.pi)
  angle = jnp.where(angle >= math.pi, angle - math.pi, angle)  # Rounding.
  return jnp.stack([center[..., 0], center[..., 1], a, b, angle], -1)


def transform_ellipse(ellipse: jax.Array, matrix: jax.Array,
                      translation: jax.Array) -> jax.Array:
  """The image of an ellipse `[..., 5]` under p -> M p + t (M `[..., 2, 2]`)."""
  center, shape = ellipse_to_matrix(ellipse)
  center = jnp.einsum('...ij,...j->...i', matrix, center) + translation
  return ellipse_from_matrix(center, matrix @ shape)


# ----------------------------------------------------------------------------
# Random draws, the affine map, the warp and the targets.
# ----------------------------------------------------------------------------


def _draw_one(key: jax.Array, config: AugmentConfig) -> dict[str, jax.Array]:
  flip_key, rotate_key, translate_key, zoom_key = jax.random.split(key, 4)
  flip = jax.random.uniform(flip_key) < 0.5
  if not config.flip:
    flip = jnp.zeros((), bool)
  angle_rad = jax.random.uniform(
      rotate_key, minval=-config.max_rotate_deg,
      maxval=config.max_rotate_deg) * (math.pi / 180.0)
  translate_xy = jax.random.uniform(
      translate_key, (2,), minval=-config.max_translate_px,
      maxval=config.max_translate_px)
  zoom = jnp.float32(1.0)
  if config.scale_range is not None:
    zoom = jax.random.uniform(zoom_key, minval=config.scale_range[0],
                              maxval=config.scale_range[1])
  return dict(flip=flip, angle_rad=angle_rad, translate_xy=translate_xy,
              zoom=zoom)


def draw_params(key: jax.Array, batch_size: int,
                config: AugmentConfig) -> dict[str, jax.Array]:
  """Draws one augmentation per image; image i uses `split(key, B)[i]`.

  Returns:
    A dict of `flip` (bool `[B]`), `angle_rad` `[B]`, `translate_xy` `[B, 2]`
    (model-input pixels) and `zoom` `[B]`.
  """
  keys = jax.random.split(key, batch_size)
  return jax.vmap(_draw_one, in_axes=(0, None))(keys, config)


def affine_of(params: Mapping[str, jax.Array], height: int,
              width: int) -> Tuple[jax.Array, jax.Array]:
  """The forward map G(p) = M p + t on model-input pixels of each draw.

  Args:
    params: draws as from `draw_params` (any leading shape).
    height: model-input height.
    width: model-input width.

  Returns:
    `(M [..., 2, 2], t [..., 2])`.
  """
  cos, sin = jnp.cos(params['angle_rad']), jnp.sin(params['angle_rad'])
  mirror = jnp.where(params['flip'], -1.0, 1.0)
  zoom = jnp.asarray(params['zoom'], jnp.float32)
  matrix = zoom[..., None, None] * jnp.stack(
      [jnp.stack([cos * mirror, -sin], -1),
       jnp.stack([sin * mirror, cos], -1)], -2)
  center = jnp.array([(width - 1) / 2.0, (height - 1) / 2.0], jnp.float32)
  translation = (center + params['translate_xy']
                 - jnp.einsum('...ij,j->...i', matrix, center))
  return matrix, translation


def _warp_one(image, matrix, translation):
  height, width = image.shape[:2]
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32), indexing='ij')
  # Sample the input at G^-1(p_out) = M^-1 (p_out - t).
  det = matrix[0, 0] * matrix[1, 1] - matrix[0, 1] * matrix[1, 0]
  dx, dy = cols - translation[0], rows - translation[1]
  x_in = (matrix[1, 1] * dx - matrix[0, 1] * dy) / det
  y_in = (-matrix[1, 0] * dx + matrix[0, 0] * dy) / det

  def warp_channel(channel):
    return jax.scipy.ndimage.map_coordinates(
        channel, [y_in, x_in], order=1, mode='constant', cval=0.0)

  return jax.vmap(warp_channel, in_axes=-1, out_axes=-1)(image)


def warp_images(images: jax.Array,
                params: Mapping[str, jax.Array]) -> jax.Array:
  """Warps `[B, H, W, C]` images by `affine_of(params)`: bilinear, zero fill.

  Returns:
    float32 `[B, H, W, C]` warped images (not z-scored).
  """
  images = jnp.asarray(images, jnp.float32)
  matrix, translation = affine_of(params, images.shape[1], images.shape[2])
  return jax.vmap(_warp_one)(images, matrix, translation)


def transform_targets(params, ellipses, hc_px, resize, height, width):
  """Moves each ellipse (original pixels) and HC with the warp of its image.

  Args:
    params: draws as from `draw_params`, leading axis `[B]`.
    ellipses: float `[B, 5]` in original pixels; a row may be all NaN.
    hc_px: `[B]` head circumferences in original pixels.
    resize: `[B, 4]` of `[sx, sy, ox, oy]`, original -> model-input pixels.
    height: model-input height.
    width: model-input width.

  Returns:
    `(ellipses, hc_px)`: S^-1 G S of each ellipse, canonical (a >= b, angle in
    [0, pi)), and HC times the perimeter ratio (times the zoom for NaN rows).
  """
  ellipses = jnp.asarray(ellipses, jnp.float32)
  hc_px = jnp.asarray(hc_px, jnp.float32)
  resize = jnp.asarray(resize, jnp.float32)
  matrix, translation = affine_of(params, height, width)
  scale, offset = resize[:, :2], resize[:, 2:]
  # S^-1 G S p = D^-1 M D p + D^-1 (M o + t - o), with D = diag(sx, sy).
  original_matrix = matrix * scale[:, None, :] / scale[:, :, None]
  original_translation = (
      jnp.einsum('bij,bj->bi', matrix, offset) + translation - offset) / scale
  moved = transform_ellipse(ellipses, original_matrix, original_translation)
  before = ramanujan_perimeter(ellipses[:, 2], ellipses[:, 3])
  after = ramanujan_perimeter(moved[:, 2], moved[:, 3])
  ratio = after / jnp.where(before > 0, before, 1.0)
  no_ellipse = jnp.any(jnp.isnan(ellipses), axis=-1)
  ratio = jnp.where(no_ellipse, jnp.asarray(params['zoom'], jnp.float32), ratio)
  return moved, hc_px * ratio


def augment_batch(key, images, ellipses, hc_px, resize, config: AugmentConfig):
  """Augments and z-scores a batch and moves its targets with it.

  Args:
    key: a `jax.random` key; image i uses `jax.random.split(key, B)[i]`.
    images: `[B, H, W, C]` model-input images, values in 0..255 (uint8 or
      float); H != W is fine.
    ellipses: float `[B, 5]` of `[cx, cy, a, b, angle]` in original pixels; an
      all-NaN row marks an image without an ellipse.
    hc_px: `[B]` head circumferences in original pixels.
    resize: `[B, 4]` of `[sx, sy, ox, oy]`: x_in = sx x + ox, y_in = sy y + oy.
    config: an `AugmentConfig` (static under `jax.jit`).

  Returns:
    `(images, ellipses, hc_px)`: float32 `[B, H, W, C]` z-scored images, float32
    `[B, 5]` ellipses and `[B]` HC of the augmented images, in original pixels.
    With no flip and no affine configured the targets come back unchanged.

  Raises:
    ValueError: when the shapes do not fit together.
  """
  if getattr(images, 'ndim', None) != 4:
    raise ValueError(f'images must be [B, H, W, C], got shape '
                     f'{getattr(images, "shape", None)}.')
  batch_size, height, width = images.shape[:3]
  expected = dict(ellipses=(batch_size, 5), hc_px=(batch_size,),
                  resize=(batch_size, 4))
  given = dict(ellipses=ellipses, hc_px=hc_px, resize=resize)
  for name, value in given.items():
    if tuple(jnp.shape(value)) != expected[name]:
      raise ValueError(f'{name} must have shape {expected[name]}, got '
                       f'{tuple(jnp.shape(value))}.')
  if not (config.flip or config.has_affine):
    return (zscore_batch(images), jnp.asarray(ellipses, jnp.float32),
            jnp.asarray(hc_px, jnp.float32))
  params = draw_params(key, batch_size, config)
  images = zscore_batch(warp_images(images, params))
  moved, moved_hc_px = transform_targets(params, ellipses, hc_px, resize,
                                         height, width)
  if not config.exact_labels:
    moved_hc_px = jnp.asarray(hc_px, jnp.float32) * params['zoom']
  return images, moved, moved_hc_px
