"""Rays from a first ellipse, and the ellipse of the boundary found along them.

The boundary refinement of a mask model (`hc_jax.nets.hcnet_mask.HCNetMask`
with `refine_rays > 0`) places the skull at the input's full resolution:

* K rays leave the first pass's centre at evenly spaced angles
  (`directions`); along each, R radial positions span `SPAN` times the first
  ellipse's radius in that direction (`radial_positions`, the radius from the
  moments' shape, `ellipse_radius`);
* a full-resolution feature map is sampled there bilinearly (`bilinear`),
  and a small network gives one logit per position; a softmax over the
  positions and its weighted mean radius (a soft-argmax) give the boundary's
  radius on each ray;
* the K boundary points close a polygon whose area moments
  (`polygon_moments`, Green's theorem) are those of a filled region, so the
  ellipse and the HC follow as from a mask's moments
  (`mask_head.ellipse_from_moments`, `mask_head.hc_px_from_moments`).

`ray_ellipse_distance` is where each ray meets a reference ellipse, the
target of the rays' loss term (`mask_head.train_loss`, `mask_loss.rays`).
Everything here is a pure function of arrays in model-input pixels.
"""

import math

import jax
import jax.numpy as jnp

from hc_jax.data import augment

# The radial positions along a ray, as fractions of the first ellipse's
# radius in its direction: (first, last).
SPAN = (0.7, 1.3)


def directions(rays: int) -> jax.Array:
  """`[rays, 2]` unit vectors (x, y) at the angles 2 pi k / rays, k = 0...

  The angle turns +x towards +y, as in `hc_jax.data.augment`.
  """
  angle = 2 * math.pi * jnp.arange(rays, dtype=jnp.float32) / rays
  return jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)


def ellipse_radius(cov: jax.Array, direction: jax.Array) -> jax.Array:
  """`[..., K]` the distance from the centre to the moments' ellipse.

  The ellipse of second moments Sigma is d^T (4 Sigma)^-1 d = 1 (a filled
  ellipse has Sigma = R diag(a^2, b^2) R^T / 4), so along a unit vector u it
  lies at 2 / sqrt(u^T Sigma^-1 u).

  Args:
    cov: `[..., 2, 2]` second central moments.
    direction: `[K, 2]` unit vectors.

  Returns:
    float32 radii, in the units of sqrt(cov).
  """
  a, b, c = cov[..., 0, 0, None], cov[..., 0, 1, None], cov[..., 1, 1, None]
  det = jnp.maximum(a * c - b * b, 1e-6)
  ux, uy = direction[:, 0], direction[:, 1]
  quadratic = (c * ux ** 2 - 2 * b * ux * uy + a * uy ** 2) / det
  return 2.0 / jnp.sqrt(jnp.maximum(quadratic, 1e-12))


def radial_positions(radius: jax.Array, samples: int) -> jax.Array:
  """`[..., K, samples]` distances from the centre: `SPAN` of each radius,
  evenly spaced (their mean is the radius itself)."""
  fraction = jnp.linspace(SPAN[0], SPAN[1], samples, dtype=jnp.float32)
  return radius[..., None] * fraction


def bilinear(features: jax.Array, points: jax.Array) -> jax.Array:
  """Bilinear samples of a feature map at fractional (x, y) positions.

  A position is in array indices (the centre of element [i, j] is at x = j,
  y = i); one beyond the map takes its nearest edge. Differentiable in the
  features (and, almost everywhere, in the positions).

  Args:
    features: `[B, H, W, C]`, H and W at least 2.
    points: `[B, N, 2]` (x, y).

  Returns:
    `[B, N, C]` in the features' dtype.
  """
  batch, height, width, channels = features.shape
  x = jnp.clip(points[..., 0], 0.0, width - 1.0)
  y = jnp.clip(points[..., 1], 0.0, height - 1.0)
  x0 = jnp.clip(jnp.floor(x), 0, width - 2)
  y0 = jnp.clip(jnp.floor(y), 0, height - 2)
  fx = (x - x0)[..., None].astype(features.dtype)
  fy = (y - y0)[..., None].astype(features.dtype)
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  flat = features.reshape(batch, height * width, channels)

  def take(row, col):
    index = (row * width + col)[..., None]
    return jnp.take_along_axis(flat, index, axis=1)

  top = take(y0, x0) * (1 - fx) + take(y0, x0 + 1) * fx
  bottom = take(y0 + 1, x0) * (1 - fx) + take(y0 + 1, x0 + 1) * fx
  return top * (1 - fy) + bottom * fy


def polygon_moments(points: jax.Array) -> tuple[jax.Array, jax.Array,
                                                jax.Array]:
  """Area, centroid and second central moments of the region a polygon closes.

  By Green's theorem over the edges (i, i+1) with c_i = x_i y_(i+1) -
  x_(i+1) y_i: area = sum c_i / 2, the centroid sum (p_i + p_(i+1)) c_i /
  (6 area), and int x^2 = sum (x_i^2 + x_i x_(i+1) + x_(i+1)^2) c_i / 12,
  int xy = sum (2 x_i y_i + x_i y_(i+1) + x_(i+1) y_i + 2 x_(i+1) y_(i+1))
  c_i / 24. Either orientation works (the area's sign cancels).

  The K-gon through K points of a smooth convex curve misses the slivers
  between its edges and the curve: a regular K-gon in a circle has
  (2 + cos(2 pi / K)) / 3 of the circle's second moments. The moments are
  divided by that factor, so the polygon of K points on an ellipse gives
  the ellipse's moments (its HC within 0.1 % at K = 64, tests/test_refine.py).

  Args:
    points: `[..., K, 2]` vertices (x, y) in order, K >= 3; the polygon
      is closed from the last to the first.

  Returns:
    (area `[...]` (signed by the orientation), centroid `[..., 2]`, the
    moments `[..., 2, 2]` per unit area, as `mask_head.raw_moments`'s cov).
  """
  rays = points.shape[-2]
  # About the vertices' mean, for float32 accuracy far from the origin.
  origin = jnp.mean(points, -2, keepdims=True)
  p = points - origin
  q = jnp.roll(p, -1, axis=-2)
  x0, y0, x1, y1 = p[..., 0], p[..., 1], q[..., 0], q[..., 1]
  cross = x0 * y1 - x1 * y0
  area = jnp.sum(cross, -1) / 2
  safe = jnp.where(jnp.abs(area) > 1e-6, area, 1e-6)
  cx = jnp.sum((x0 + x1) * cross, -1) / (6 * safe)
  cy = jnp.sum((y0 + y1) * cross, -1) / (6 * safe)
  sxx = jnp.sum((x0 ** 2 + x0 * x1 + x1 ** 2) * cross, -1) / (12 * safe)
  syy = jnp.sum((y0 ** 2 + y0 * y1 + y1 ** 2) * cross, -1) / (12 * safe)
  sxy = jnp.sum((2 * x0 * y0 + x0 * y1 + x1 * y0 + 2 * x1 * y1) * cross,
                -1) / (24 * safe)
  sxx, syy, sxy = sxx - cx ** 2, syy - cy ** 2, sxy - cx * cy
  inscribed = (2 + math.cos(2 * math.pi / rays)) / 3
  cov = jnp.stack([jnp.stack([sxx, sxy], -1),
                   jnp.stack([sxy, syy], -1)], -2) / inscribed
  center = jnp.stack([cx, cy], -1) + origin[..., 0, :]
  return area, center, cov


def ray_ellipse_distance(center: jax.Array, direction: jax.Array,
                         ellipse_center: jax.Array, shape: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """Where each ray c + t u (t > 0) leaves the ellipse {e + A v : |v| = 1}.

  |A^-1 (c + t u - e)| = 1 is a quadratic in t; its larger root.

  Args:
    center: `[B, 2]` the rays' origin.
    direction: `[K, 2]` unit vectors.
    ellipse_center: `[B, 2]` e.
    shape: `[B, 2, 2]` A (`augment.ellipse_to_matrix`).

  Returns:
    (t `[B, K]`, whether the ray meets the ellipse at a t > 0 `[B, K]`).
  """
  a, b = shape[..., 0, 0], shape[..., 0, 1]
  c, d = shape[..., 1, 0], shape[..., 1, 1]
  det = a * d - b * c
  det = jnp.where(jnp.abs(det) > 1e-9, det, 1e-9)
  inverse = jnp.stack([jnp.stack([d, -b], -1),
                       jnp.stack([-c, a], -1)], -2) / det[..., None, None]
  q = jnp.einsum('bij,bj->bi', inverse, center - ellipse_center)  # [B, 2]
  e = jnp.einsum('bij,kj->bki', inverse, direction)  # [B, K, 2]
  ee = jnp.sum(e * e, -1)
  qe = jnp.sum(q[:, None, :] * e, -1)
  qq = jnp.sum(q * q, -1)[:, None]
  disc = qe ** 2 - ee * (qq - 1)
  t = (-qe + jnp.sqrt(jnp.maximum(disc, 0.0))) / jnp.maximum(ee, 1e-12)
  return t, (disc > 0) & (t > 0)


def ray_loss(outputs: dict[str, jax.Array], true_in: jax.Array,
             known: jax.Array, side: float) -> jax.Array:
  """The refinement's ray term (the config's `mask_loss.rays`).

  The mean absolute difference, over every (image, ray) pair whose ray meets
  the reference ellipse, between each ray's boundary radius and where the
  ray (cast from the first pass's centre) leaves the reference, over `side`
  (the mean input side).

  Args:
    outputs: a refined mask model's outputs ('ray_radius' `[B, K]`,
      'center_coarse' `[B, 2]`).
    true_in: `[B, 5]` reference ellipses in model-input pixels.
    known: `[B]` whether the image has a reference ellipse.
    side: the mean input side, in input pixels.

  Returns:
    The scalar term.
  """
  radius = outputs['ray_radius']
  direction = directions(radius.shape[-1])
  safe_true = jnp.where(known[:, None], true_in, 1.0)
  true_center, true_shape = augment.ellipse_to_matrix(safe_true)
  target, hits = ray_ellipse_distance(
      jax.lax.stop_gradient(outputs['center_coarse']), direction,
      true_center, true_shape)
  hits = hits & known[:, None]
  error = jnp.abs(radius - jax.lax.stop_gradient(target)) / side
  return jnp.sum(jnp.where(hits, error, 0.0)) / jnp.maximum(jnp.sum(hits), 1)
