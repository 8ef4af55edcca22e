"""Ellipse geometry: fitting a head outline and measuring its circumference.

HC18's reference head circumference is the perimeter of the ellipse that the
sonographer drew. We fit that ellipse to the outline pixels of an annotation
image (Fitzgibbon's direct least squares, in Halir and Flusser's numerically
stable form) and measure it with Ramanujan's approximation, which reproduces
the published HC to within 0.05 mm on every training image.

NumPy only, so the TF-free paths can use it.
"""

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Ellipse:
  """An ellipse in image pixels.

  Attributes:
    center_x: column of the centre, in px.
    center_y: row of the centre, in px.
    semi_axis_a: semi-major axis, in px.
    semi_axis_b: semi-minor axis, in px (b <= a).
    angle_rad: angle of the major axis from +x towards +y, in [0, pi).
  """
  center_x: float
  center_y: float
  semi_axis_a: float
  semi_axis_b: float
  angle_rad: float

  @property
  def perimeter_px(self) -> float:
    return float(ramanujan_perimeter(self.semi_axis_a, self.semi_axis_b))

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


def ramanujan_perimeter(semi_axis_a, semi_axis_b, xp=np):
  """Ramanujan's first approximation of an ellipse's perimeter,
  pi (3 (a + b) - sqrt((3a + b)(a + 3b))).

  Computed as pi (6a^2 + 8ab + 6b^2) / (3 (a + b) + sqrt((3a + b)(a + 3b))),
  the same value without the subtraction, so float32 keeps full relative
  precision. The one definition of the HC of an ellipse: NumPy callers use it
  as is, JAX code through `augment.ramanujan_perimeter` (`xp=jax.numpy`).

  Args:
    semi_axis_a: semi-axis (scalar or array).
    semi_axis_b: the other semi-axis, same units (broadcast with the first).
    xp: the array module: NumPy (float64) or jax.numpy (float32, traceable
      under `jax.jit`).

  Returns:
    The perimeter, in the units of the semi-axes; 0 for a = b = 0. A NaN
    semi-axis gives NaN with NumPy (a missing ellipse stays missing) and 0
    with jax.numpy (where the step masks rows without an ellipse, a NaN
    would reach the gradients through `where`).
  """
  dtype = xp.float64 if xp is np else xp.float32
  a = xp.asarray(semi_axis_a, dtype)
  b = xp.asarray(semi_axis_b, dtype)
  denominator = 3 * (a + b) + xp.sqrt((3 * a + b) * (a + 3 * b))
  safe = xp.where(denominator > 0, denominator, 1.0)
  perimeter = xp.where(denominator > 0,
                       math.pi * (6 * a * a + 8 * a * b + 6 * b * b) / safe,
                       0.0)
  if xp is np:
    return np.where(np.isnan(denominator), np.nan, perimeter)
  return perimeter


def wrap_angle(angle):
  """Angles into [0, pi) (np.mod can round up to pi itself)."""
  angle = np.mod(angle, np.pi)
  return np.where(angle >= np.pi, angle - np.pi, angle)


def mirror_ellipses(ellipses, width: int) -> np.ndarray:
  """Ellipses `[..., 5]` of a left-right mirrored image, mirrored back.

  Args:
    ellipses: `[cx, cy, a, b, angle]` in pixels of an image `width` columns
      wide (pixel centres at integers).
    width: columns of that image.

  Returns:
    float64 `[..., 5]`: x -> width - 1 - x, angle -> pi - angle (in [0, pi)).
  """
  out = np.array(ellipses, np.float64)
  out[..., 0] = width - 1 - out[..., 0]
  out[..., 4] = wrap_angle(np.pi - out[..., 4])
  return out


def fit_ellipse(x, y) -> Ellipse:
  """Fits an ellipse to points by direct least squares.

  Args:
    x: point columns (px).
    y: point rows (px), same length as `x`.

  Returns:
    The fitted `Ellipse`.

  Raises:
    ValueError: with fewer than 6 points, or where no ellipse fits (a line,
      a blank outline, a hyperbola-like scatter).
  """
  x = np.asarray(x, dtype=np.float64).ravel()
  y = np.asarray(y, dtype=np.float64).ravel()
  if x.size < 6 or x.size != y.size:
    raise ValueError(f'need at least 6 outline points, got {x.size}')
  # Centre and scale the points so the scatter matrices are well conditioned.
  x0, y0 = x.mean(), y.mean()
  scale = max(x.std(), y.std())
  if not scale > 0:
    raise ValueError('no ellipse fits the outline (all points coincide)')
  xs, ys = (x - x0) / scale, (y - y0) / scale
  quadratic = np.stack([xs * xs, xs * ys, ys * ys], axis=1)
  linear = np.stack([xs, ys, np.ones_like(xs)], axis=1)
  s1 = quadratic.T @ quadratic
  s2 = quadratic.T @ linear
  s3 = linear.T @ linear
  try:
    t = -np.linalg.solve(s3, s2.T)
    m = s1 + s2 @ t
    m = np.array([m[2] / 2, -m[1], m[0] / 2])
    _, eigenvectors = np.linalg.eig(m)
  except np.linalg.LinAlgError as e:
    raise ValueError(f'no ellipse fits the outline ({e})') from None
  eigenvectors = np.real(eigenvectors)
  is_ellipse = 4 * eigenvectors[0] * eigenvectors[2] - eigenvectors[1] ** 2 > 0
  if not is_ellipse.any():
    raise ValueError('no ellipse fits the outline')
  a_, b_, c_ = eigenvectors[:, np.argmax(is_ellipse)]
  d_, e_, f_ = t @ np.array([a_, b_, c_])
  det = b_ * b_ - 4 * a_ * c_
  if not det < 0:
    raise ValueError('no ellipse fits the outline')
  cx = (2 * c_ * d_ - b_ * e_) / det
  cy = (2 * a_ * e_ - b_ * d_) / det
  value_at_center = (a_ * cx * cx + b_ * cx * cy + c_ * cy * cy + d_ * cx
                     + e_ * cy + f_)
  eigenvalues, axes = np.linalg.eigh(np.array([[a_, b_ / 2], [b_ / 2, c_]]))
  with np.errstate(invalid='ignore', divide='ignore'):
    semi_axes = np.sqrt(-value_at_center / eigenvalues) * scale
  if not np.all(np.isfinite(semi_axes)) or np.any(semi_axes <= 0):
    raise ValueError('no ellipse fits the outline')
  major = int(np.argmax(semi_axes))
  direction = axes[:, major]
  return Ellipse(
      center_x=float(cx * scale + x0),
      center_y=float(cy * scale + y0),
      semi_axis_a=float(semi_axes[major]),
      semi_axis_b=float(semi_axes[1 - major]),
      angle_rad=float(np.arctan2(direction[1], direction[0]) % np.pi))


def fit_annotation(annotation: np.ndarray) -> Ellipse:
  """Fits the ellipse drawn as an outline in an HC18 annotation image.

  Args:
    annotation: [H, W] array, the outline non-zero on a zero background.

  Returns:
    The fitted `Ellipse`, in pixels of the annotation image.

  Raises:
    ValueError: when the annotation is blank or holds no ellipse.
  """
  rows, cols = np.nonzero(annotation)
  if rows.size == 0:
    raise ValueError('annotation is blank')
  return fit_ellipse(cols, rows)
