"""The ellipse output of an ellipse model: decoding, HC in the graph, loss.

An ellipse model (`hcnet.HCNetEllipse`, 'hcnet_ellipse') returns six raw
values per image. `decode` turns them into an ellipse
`[cx, cy, a, b, angle]` in MODEL-INPUT pixels (the conventions of
`hc_jax.data.augment`: x the column, y the row, pixel centres at integers, the
angle turning +x towards +y; a lies along the angle, and a >= b is not
imposed). Every raw vector, however large, decodes to a valid ellipse:

* centre: `-0.5 + W * sigmoid(raw[0])`, `-0.5 + H * sigmoid(raw[1])`, inside
  the image;
* semi-axes: `(H + W) / 4 * (min(softplus(raw + log(e - 1)), MAX_SEMI_AXIS)
  + MIN_SEMI_AXIS)`, positive and finite; zero raw values give a quarter of
  the mean side;
* orientation: `angle = atan2(raw[5], raw[4]) / 2` in [0, pi), i.e.
  (cos 2θ, sin 2θ) up to its length, so θ and θ + pi are one output.

`hc_px(ellipse_in, resize)` maps the ellipse back to ORIGINAL pixels (the
inverse of x_in = sx x + ox, y_in = sy y + oy) and returns its Ramanujan
perimeter, the HC in px: the same number as `ellipse.ramanujan_perimeter`
of `augment.transform_ellipse(ellipse_in, diag(1/sx, 1/sy), (-ox/sx,
-oy/sy))`, computed in a closed form that stays differentiable for a circle
(the eigen-decomposition there has an infinite derivative).

`loss` is the config's HC loss on the normalised HC plus `weight` x a shape
term: the mean absolute difference of the centres and of the square roots of
the shape matrices, P = (A A^T)^(1/2) = R diag(a, b) R^T, both over the
mean side (H + W) / 2. P does not change when a and b swap with the angle
turned by pi/2, or when the angle turns by pi, and it grows linearly with
the ellipse like the centre does.

For prediction, `predict_ellipse(raw, resize, height, width, pixel_size_mm)`
gives each image's ellipse and HC in original pixels (and mm).
"""

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from hc_jax.data import augment

# Smallest and largest semi-axis, in quarters of the mean side; the largest
# is 25 times the image, far beyond any head, so it only keeps absurd raw
# values finite.
MIN_SEMI_AXIS = 1e-3
MAX_SEMI_AXIS = 100.0
# softplus(SOFTPLUS_SHIFT) == 1, so zero raw values give the unit semi-axis.
SOFTPLUS_SHIFT = math.log(math.e - 1)


class EllipseHeadError(ValueError):
  """Arrays whose shapes an ellipse head cannot take."""


def _check(name: str, value, size: int) -> None:
  shape = tuple(jnp.shape(value))
  if len(shape) < 1 or shape[-1] != size:
    raise EllipseHeadError(f'{name} must have shape [..., {size}], got {shape}')


def decode(raw: jax.Array, height: int, width: int) -> jax.Array:
  """Raw model outputs -> ellipses `[..., 5]` in model-input pixels.

  Args:
    raw: `[..., 6]`: centre x, centre y, semi-axis a, semi-axis b, cos 2θ,
      sin 2θ, any real values.
    height: model-input height (rows).
    width: model-input width (columns).

  Returns:
    float32 `[..., 5]` of `[cx, cy, a, b, angle]`, a, b > 0, angle in [0, pi).
  """
  _check('raw', raw, 6)
  raw = jnp.asarray(raw, jnp.float32)
  center_x = -0.5 + width * jax.nn.sigmoid(raw[..., 0])
  center_y = -0.5 + height * jax.nn.sigmoid(raw[..., 1])
  unit = (height + width) / 4.0
  axes = unit * (jnp.minimum(jax.nn.softplus(raw[..., 2:4] + SOFTPLUS_SHIFT),
                             MAX_SEMI_AXIS) + MIN_SEMI_AXIS)
  cos2, sin2 = raw[..., 4], raw[..., 5]
  # atan2 at (0, 0) has an undefined gradient: take the angle 0 there.
  zero = (cos2 == 0) & (sin2 == 0)
  angle = 0.5 * jnp.arctan2(sin2, jnp.where(zero, 1.0, cos2))
  angle = jnp.mod(angle, math.pi)
  angle = jnp.where(angle >= math.pi, angle - math.pi, angle)  # Rounding.
  return jnp.stack([center_x, center_y, axes[..., 0], axes[..., 1], angle],
                   -1)


def to_input_pixels(ellipse: jax.Array, resize: jax.Array) -> jax.Array:
  """Ellipses `[..., 5]` in original pixels -> model-input pixels.

  Args:
    ellipse: `[..., 5]` in original pixels (a NaN row stays NaN).
    resize: `[..., 4]` of `[sx, sy, ox, oy]`: x_in = sx x + ox, y_in = sy y + oy.

  Returns:
    float32 `[..., 5]`, canonical (a >= b, angle in [0, pi)).
  """
  _check('ellipse', ellipse, 5)
  _check('resize', resize, 4)
  resize = jnp.asarray(resize, jnp.float32)
  scale = resize[..., :2]
  matrix = scale[..., :, None] * jnp.eye(2, dtype=jnp.float32)
  return augment.transform_ellipse(ellipse, matrix, resize[..., 2:])


def to_original_pixels(ellipse_in: jax.Array, resize: jax.Array) -> jax.Array:
  """Ellipses `[..., 5]` in model-input pixels -> original pixels (canonical).

  The inverse of `to_input_pixels`; for reporting, not for gradients.
  """
  _check('ellipse_in', ellipse_in, 5)
  _check('resize', resize, 4)
  resize = jnp.asarray(resize, jnp.float32)
  scale = resize[..., :2]
  matrix = (1.0 / scale)[..., :, None] * jnp.eye(2, dtype=jnp.float32)
  return augment.transform_ellipse(ellipse_in, matrix,
                                   -resize[..., 2:] / scale)


def hc_px(ellipse_in: jax.Array, resize: jax.Array) -> jax.Array:
  """The HC in original pixels of ellipses given in model-input pixels.

  With B = diag(1/sx, 1/sy) R diag(a, b), the original ellipse's semi-axes
  are B's singular values: (a' + b')^2 = |B|_F^2 + 2 det B and
  (a' - b')^2 = |B|_F^2 - 2 det B, and Ramanujan's perimeter
  pi (3 s - sqrt(4 s^2 - d^2)) (s = a' + b', d = a' - b') is written as
  pi (5 s^2 + d^2) / (3 s + sqrt(4 s^2 - d^2)), which needs no eigenvalues.

  Args:
    ellipse_in: `[..., 5]` ellipses in model-input pixels, a, b > 0.
    resize: `[..., 4]` of `[sx, sy, ox, oy]` (the offset does not matter).

  Returns:
    float32 `[...]`, HC in original pixels; differentiable everywhere a, b > 0.
  """
  _check('ellipse_in', ellipse_in, 5)
  _check('resize', resize, 4)
  _, shape = augment.ellipse_to_matrix(ellipse_in)
  resize = jnp.asarray(resize, jnp.float32)
  shape = shape / resize[..., :2, None]  # diag(1/sx, 1/sy) A.
  frobenius = jnp.sum(shape ** 2, axis=(-2, -1))
  det = jnp.abs(shape[..., 0, 0] * shape[..., 1, 1] -
                shape[..., 0, 1] * shape[..., 1, 0])
  sum_sq = frobenius + 2 * det
  diff_sq = jnp.maximum(frobenius - 2 * det, 0.0)
  total = jnp.sqrt(sum_sq)
  return math.pi * (5 * sum_sq + diff_sq) / (
      3 * total + jnp.sqrt(4 * sum_sq - diff_sq))


def _root_shape(ellipse: jax.Array) -> jax.Array:
  """`[..., 3]` of P00, P01, P11, P = R diag(a, b) R^T."""
  a, b, angle = ellipse[..., 2], ellipse[..., 3], ellipse[..., 4]
  mean, half = (a + b) / 2, (a - b) / 2
  cos2, sin2 = jnp.cos(2 * angle), jnp.sin(2 * angle)
  return jnp.stack([mean + half * cos2, half * sin2, mean - half * cos2], -1)


def shape_distance(ellipse_pred_in: jax.Array, ellipse_true_in: jax.Array,
                   height: int, width: int) -> jax.Array:
  """Per-ellipse distance `[...]`, over the mean side (H + W) / 2.

  |dcx| + |dcy| + |dP00| + 2 |dP01| + |dP11| (the four entries of P), over
  the mean side: 0 only for the same ellipse, whatever its parametrisation.
  """
  centre = jnp.abs(ellipse_pred_in[..., :2] - ellipse_true_in[..., :2])
  root = jnp.abs(_root_shape(ellipse_pred_in) - _root_shape(ellipse_true_in))
  total = (jnp.sum(centre, -1) + root[..., 0] + 2 * root[..., 1] +
           root[..., 2])
  return total / ((height + width) / 2.0)


def loss(ellipse_pred_in: jax.Array, ellipse_true_in: jax.Array,
         hc_pred_target: jax.Array, hc_true_target: jax.Array,
         base_loss: Callable[[jax.Array, jax.Array], jax.Array],
         weight: float, height: int, width: int) -> jax.Array:
  """The HC loss plus `weight` x the mean `shape_distance`.

  Args:
    ellipse_pred_in: `[B, 5]` predicted ellipses in model-input pixels.
    ellipse_true_in: `[B, 5]` true ellipses in model-input pixels; a row with
      a NaN (an image without an ellipse) adds no shape term.
    hc_pred_target: `[B]` predicted normalised HC.
    hc_true_target: `[B]` true normalised HC.
    base_loss: the config's loss, `(predictions, targets) -> scalar`.
    weight: weight of the shape term (0 trains on the HC alone).
    height: model-input height.
    width: model-input width.

  Returns:
    The scalar loss.
  """
  hc_loss = base_loss(hc_pred_target, hc_true_target)
  known = jnp.all(jnp.isfinite(ellipse_true_in), axis=-1)
  safe_true = jnp.where(known[:, None], ellipse_true_in, 0.0)
  distance = shape_distance(ellipse_pred_in, safe_true, height, width)
  distance = jnp.where(known, distance, 0.0)
  shape_loss = jnp.sum(distance) / jnp.maximum(jnp.sum(known), 1)
  return hc_loss + weight * shape_loss


def train_loss(raw: jax.Array, ellipse_true: jax.Array, resize: jax.Array,
               hc_true_target: jax.Array, normaliser_px: jax.Array,
               image_hw: tuple[int, int], base_loss, weight: float
               ) -> jax.Array:
  """The loss of one batch of an ellipse model, as `hc_jax.training.train` uses it.

  Args:
    raw: `[B, 6]` model outputs.
    ellipse_true: `[B, 5]` (augmented) true ellipses in ORIGINAL pixels.
    resize: `[B, 4]` of `[sx, sy, ox, oy]`.
    hc_true_target: `[B]` true HC over the normaliser.
    normaliser_px: the run's normaliser (scalar).
    image_hw: model-input `(height, width)`.
    base_loss: the config's loss.
    weight: weight of the shape term.

  Returns:
    The scalar loss.
  """
  height, width = image_hw
  ellipse_pred_in = decode(raw, height, width)
  hc_pred_target = hc_px(ellipse_pred_in, resize) / normaliser_px
  return loss(ellipse_pred_in, to_input_pixels(ellipse_true, resize),
              hc_pred_target, hc_true_target, base_loss, weight, height, width)


def normalised_hc(raw: jax.Array, resize: jax.Array, normaliser_px,
                  height: int, width: int) -> jax.Array:
  """`[B]` predicted HC over the normaliser, for evaluation."""
  return hc_px(decode(raw, height, width), resize) / normaliser_px


def predict_ellipse(raw: jax.Array, resize: jax.Array, height: int,
                    width: int, pixel_size_mm: Optional[jax.Array] = None
                    ) -> dict[str, jax.Array]:
  """Each image's predicted ellipse and HC, in original pixels (and mm).

  Args:
    raw: `[B, 6]` outputs of an ellipse model (`train=False`).
    resize: `[B, 4]` of `[sx, sy, ox, oy]` of each image (`prepare`'s).
    height: model-input height.
    width: model-input width.
    pixel_size_mm: None, or `[B]` pixel sizes to add the ellipse in mm.

  Returns:
    {'ellipse_px': `[B, 5]` `[cx, cy, a, b, angle]` in original pixels
    (a >= b, angle in [0, pi), angle as in `hc_jax.data.augment`), 'hc_px': `[B]`,
    'ellipse_in': `[B, 5]` in model-input pixels}; with `pixel_size_mm` also
    'ellipse_mm' (centre and semi-axes times the pixel size, angle unchanged)
    and 'hc_mm'.
  """
  ellipse_in = decode(raw, height, width)
  out = {'ellipse_in': ellipse_in,
         'ellipse_px': to_original_pixels(ellipse_in, resize),
         'hc_px': hc_px(ellipse_in, resize)}
  if pixel_size_mm is not None:
    size = jnp.asarray(pixel_size_mm, jnp.float32)[..., None]
    out['ellipse_mm'] = jnp.concatenate(
        [out['ellipse_px'][..., :4] * size, out['ellipse_px'][..., 4:]], -1)
    out['hc_mm'] = out['hc_px'] * size[..., 0]
  return out
