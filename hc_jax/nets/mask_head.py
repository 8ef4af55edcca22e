"""The output of a dense (mask) model: the head's ellipse by moments, in the graph.

A mask model (`hc_jax.nets.hcnet_mask.HCNetMask`, 'hcnet_mask') returns a head-mask
logit map on a grid of `stride` x `stride` cells over the model input (and a
margin around it, so that a head cut by the image border can be completed).
Everything from the map to millimetres is a pure, differentiable function
here, computed in the same jitted graph as the network:

* the soft mask p = sigmoid(logits) gives a centroid mu and second central
  moments Sigma (cell centres at `grid_coordinates`, in model-input pixels,
  corrected for the cells' extent, `CELL_VARIANCE`);
* a filled ellipse with semi-axes a, b has Sigma = R diag(a^2, b^2) R^T / 4,
  so the ellipse is the centre mu, semi-axes 2 sqrt(lambda), angle of the
  major eigenvector (`ellipse_from_moments`);
* its HC in ORIGINAL pixels (the resize geometry x_in = sx x + ox undone)
  is Ramanujan's perimeter, taken in closed form from Sigma without an
  eigen-decomposition (`hc_px_from_moments`; finite gradients for a circle);
* times the pixel size, mm.

`moments` can run a second pass (`window`): the moments of p under a soft
window around the first pass's ellipse (normalised radius < `window_radius`),
so that a stray blob far from the head does not move them.

`render_ellipses` draws the filled reference ellipse on the same grid by pixel
coverage (anti-aliased: each cell covered by a fraction, from a 4x4 sub-cell
sampling of a one-sub-cell-wide linear edge), so that the target's own
moments reproduce the ellipse's HC (tested on HC18 to < 0.1 mm).

`quality` is the soft IoU between p and the ellipse its own moments give: 1
for a mask that is exactly an ellipse, lower when it has holes, blobs or a
shape no ellipse fits; predict turns a low value into the `uncertain` status.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp

from hc_jax.data import augment
from hc_jax.nets import boundary

# The terms of `train_loss` (the config's `mask_loss` weights).
LOSS_TERMS = ('bce', 'dice', 'hc', 'ellipse', 'shape', 'rays')
# Moment passes a model may use.
MOMENT_MODES = ('plain', 'window')
# Sub-cells per side of the coverage rendering.
SUBSAMPLE = 4
# The smallest mask mass (in cells) the moments divide by.
MIN_MASS = 1e-3
# Added to the cell-centre second moments, in stride^2: a covered cell spreads
# its mass by +1/12 around its centre, but a partly covered edge cell holds
# its mass on the inner side of its centre, which the centre puts too far
# out by 1/6 on average (a uniform edge position within the cell); net -1/12.
# With it the moments of `render_ellipses` reproduce the ellipse's perimeter
# with no mean bias (tests/test_mask.py).
CELL_VARIANCE = -1.0 / 12.0


class MaskHeadError(ValueError):
  """Arrays whose shapes a mask head cannot take."""


def grid_coordinates(rows: int, cols: int, stride: int, margin: int = 0
                     ) -> tuple[jax.Array, jax.Array]:
  """Cell centres `(x [cols], y [rows])` in model-input pixels.

  Cell j covers the input pixels stride*(j - m) ... stride*(j - m) + stride
  - 1 (m = `margin` cells before pixel 0); pixel centres are at integers, so
  its centre is at stride*(j - m) + (stride - 1) / 2.
  """
  x = stride * (jnp.arange(cols, dtype=jnp.float32) - margin) + (stride - 1) / 2
  y = stride * (jnp.arange(rows, dtype=jnp.float32) - margin) + (stride - 1) / 2
  return x, y


def raw_moments(weights: jax.Array, stride: int, margin: int = 0
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mass `[...]`, centroid `[..., 2]` (x, y) and covariance `[..., 2, 2]`.

  Args:
    weights: `[..., rows, cols]` non-negative cell weights (a soft mask).
    stride: input pixels per cell.
    margin: cells before the input's first pixel.

  Returns:
    The mass in cells, the centroid and the second central moments in
    model-input pixels (corrected for the cells' extent, `CELL_VARIANCE`).
  """
  rows, cols = weights.shape[-2:]
  x, y = grid_coordinates(rows, cols, stride, margin)
  weights = weights.astype(jnp.float32)
  mass = jnp.sum(weights, axis=(-2, -1))
  safe = jnp.maximum(mass, MIN_MASS)
  wx = jnp.sum(weights, axis=-2)  # [..., cols]
  wy = jnp.sum(weights, axis=-1)  # [..., rows]
  cx = jnp.sum(wx * x, -1) / safe
  cy = jnp.sum(wy * y, -1) / safe
  dx = x - cx[..., None]
  dy = y - cy[..., None]
  sxx = jnp.sum(wx * dx ** 2, -1) / safe
  syy = jnp.sum(wy * dy ** 2, -1) / safe
  sxy = jnp.einsum('...ij,...i,...j->...', weights, dy, dx) / safe
  cell = CELL_VARIANCE * stride ** 2
  cov = jnp.stack([jnp.stack([sxx + cell, sxy], -1),
                   jnp.stack([sxy, syy + cell], -1)], -2)
  return mass, jnp.stack([cx, cy], -1), cov


def normalised_radius(center: jax.Array, cov: jax.Array, rows: int, cols: int,
                      stride: int, margin: int = 0) -> jax.Array:
  """`[..., rows, cols]` r of each cell centre under the moments' ellipse.

  r^2 = d^T (4 Sigma)^-1 d: 1 on the ellipse, 0 at its centre.
  """
  x, y = grid_coordinates(rows, cols, stride, margin)
  dx = x - center[..., 0, None, None]
  dy = y[:, None] - center[..., 1, None, None]
  a, b, c = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]
  det = jnp.maximum(a * c - b * b, 1e-6)
  inv_a, inv_b, inv_c = (c / det)[..., None,
                                  None], (-b / det)[..., None,
                                                    None], (a / det)[..., None,
                                                                     None]
  r2 = (inv_a * dx ** 2 + 2 * inv_b * dx * dy + inv_c * dy ** 2) / 4.0
  return jnp.sqrt(jnp.maximum(r2, 0.0) + 1e-12)


def moments(prob: jax.Array, stride: int, margin: int = 0,
            mode: str = 'plain', window_radius: float = 1.4,
            window_softness: float = 0.05
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The moments a model reports: `raw_moments`, or a windowed second pass.

  Args:
    prob: `[..., rows, cols]` soft mask in [0, 1].
    stride, margin: the grid (see `grid_coordinates`).
    mode: 'plain' or 'window' (moments of prob x a soft window
      sigmoid((window_radius - r) / window_softness) around the first pass's
      ellipse; the head itself, r <= 1, is inside it).
    window_radius: the window's normalised radius.
    window_softness: its edge width, in normalised radius.

  Returns:
    `(mass, center, cov)` as `raw_moments`.
  """
  if mode not in MOMENT_MODES:
    raise MaskHeadError(f'moments must be one of {", ".join(MOMENT_MODES)}; '
                        f'got {mode!r}')
  mass, center, cov = raw_moments(prob, stride, margin)
  if mode == 'window':
    rows, cols = prob.shape[-2:]
    radius = normalised_radius(center, cov, rows, cols, stride, margin)
    window = jax.nn.sigmoid((window_radius - radius) / window_softness)
    mass, center, cov = raw_moments(prob * window, stride, margin)
  return mass, center, cov


def _sqrt_2x2(matrix: jax.Array) -> jax.Array:
  """The symmetric square root of SPD 2x2 matrices, in closed form."""
  a, b, c = matrix[..., 0, 0], matrix[..., 0, 1], matrix[..., 1, 1]
  root_det = jnp.sqrt(jnp.maximum(a * c - b * b, 1e-12))
  scale = jnp.sqrt(a + c + 2 * root_det)
  eye = jnp.eye(2, dtype=matrix.dtype)
  return (matrix + root_det[..., None, None] * eye) / scale[..., None, None]


def shape_matrix(cov: jax.Array) -> jax.Array:
  """The ellipse's symmetric shape matrix P = 2 Sigma^(1/2) = R diag(a, b) R^T."""
  return 2.0 * _sqrt_2x2(cov)


def ellipse_from_moments(center: jax.Array, cov: jax.Array) -> jax.Array:
  """`[..., 5]` ellipses `[cx, cy, a, b, angle]` (a >= b, angle in [0, pi)).

  In the conventions of `hc_jax.data.augment`: the angle turns +x towards +y and a
  lies along it. For reporting and overlays; the HC uses
  `hc_px_from_moments`, which needs no eigenvectors.
  """
  sxx, sxy, syy = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]
  mean = (sxx + syy) / 2
  half = jnp.sqrt(((sxx - syy) / 2) ** 2 + sxy ** 2)
  major = 2 * jnp.sqrt(jnp.maximum(mean + half, 1e-12))
  minor = 2 * jnp.sqrt(jnp.maximum(mean - half, 1e-12))
  angle = jnp.mod(0.5 * jnp.arctan2(2 * sxy, sxx - syy), math.pi)
  angle = jnp.where(angle >= math.pi, angle - math.pi, angle)
  return jnp.stack([center[..., 0], center[..., 1], major, minor, angle], -1)


def hc_px_from_moments(cov: jax.Array, resize: jax.Array) -> jax.Array:
  """HC in ORIGINAL pixels of the ellipse whose moments (input px) are `cov`.

  With D = diag(1/sx, 1/sy), the original ellipse has moments D Sigma D, so
  B B^T = 4 D Sigma D; Ramanujan's perimeter from |B|_F^2 = 4 tr(D Sigma D)
  and det B = 4 sqrt(det(D Sigma D)), as in `ellipse_head.hc_px`.

  Args:
    cov: `[..., 2, 2]` second central moments in model-input pixels.
    resize: `[..., 4]` of `[sx, sy, ox, oy]`.

  Returns:
    float32 `[...]`.
  """
  resize = jnp.asarray(resize, jnp.float32)
  sx, sy = resize[..., 0], resize[..., 1]
  a = cov[..., 0, 0] / sx ** 2
  b = cov[..., 0, 1] / (sx * sy)
  c = cov[..., 1, 1] / sy ** 2
  frobenius = 4 * (a + c)
  det = 4 * jnp.sqrt(jnp.maximum(a * c - b * b, 1e-12))
  sum_sq = frobenius + 2 * det
  diff_sq = jnp.maximum(frobenius - 2 * det, 0.0)
  total = jnp.sqrt(sum_sq)
  return math.pi * (5 * sum_sq + diff_sq) / (
      3 * total + jnp.sqrt(4 * sum_sq - diff_sq))


def render_ellipses(ellipses_in: jax.Array, rows: int, cols: int, stride: int,
                    margin: int = 0) -> jax.Array:
  """Filled ellipses `[..., rows, cols]` in [0, 1] by cell coverage.

  Each cell is split into SUBSAMPLE x SUBSAMPLE sub-cells; each sub-cell's
  coverage is a linear ramp of its signed distance to the ellipse (first
  order: (r - 1) / |grad r|), one sub-cell wide. A NaN ellipse (an image
  without one) renders as zeros.

  Args:
    ellipses_in: `[..., 5]` ellipses in model-input pixels.
    rows, cols, stride, margin: the grid.

  Returns:
    float32 coverage maps.
  """
  known = jnp.all(jnp.isfinite(ellipses_in), -1)
  safe = jnp.where(known[..., None], ellipses_in,
                   jnp.asarray([0.0, 0.0, 1.0, 1.0, 0.0], jnp.float32))
  center, shape = augment.ellipse_to_matrix(safe)  # x = c + A u, |u| <= 1.
  inverse = jnp.linalg.inv(shape)
  sub = stride / SUBSAMPLE
  offsets = (jnp.arange(SUBSAMPLE, dtype=jnp.float32) + 0.5) * sub - stride / 2
  x, y = grid_coordinates(rows, cols, stride, margin)
  xs = (x[:, None] + offsets[None, :]).reshape(-1)  # [cols * S]
  ys = (y[:, None] + offsets[None, :]).reshape(-1)  # [rows * S]
  dx = xs - center[..., 0, None, None]
  dy = ys[:, None] - center[..., 1, None, None]
  dx = jnp.broadcast_to(dx, dy.shape[:-1] + (xs.shape[0],))
  dy = jnp.broadcast_to(dy, dx.shape)
  inv = inverse[..., None, None, :, :]
  u = inv[..., 0, 0] * dx + inv[..., 0, 1] * dy
  v = inv[..., 1, 0] * dx + inv[..., 1, 1] * dy
  r = jnp.sqrt(u ** 2 + v ** 2 + 1e-12)
  # grad r = A^-T (u, v) / r.
  gx = (inv[..., 0, 0] * u + inv[..., 1, 0] * v) / r
  gy = (inv[..., 0, 1] * u + inv[..., 1, 1] * v) / r
  distance = (r - 1) / jnp.maximum(jnp.sqrt(gx ** 2 + gy ** 2), 1e-9) / sub
  cover = jnp.clip(0.5 - distance, 0.0, 1.0)
  lead = cover.shape[:-2]
  cover = cover.reshape(lead + (rows, SUBSAMPLE, cols, SUBSAMPLE)).mean(
      (-3, -1))
  return jnp.where(known[..., None, None], cover, 0.0)


def quality(prob: jax.Array, center: jax.Array, cov: jax.Array, stride: int,
            margin: int = 0) -> jax.Array:
  """`[...]` soft IoU of the mask and the ellipse of its own moments."""
  rows, cols = prob.shape[-2:]
  ellipse = render_ellipses(ellipse_from_moments(center, cov), rows, cols,
                            stride, margin)
  inter = jnp.sum(jnp.minimum(prob, ellipse), (-2, -1))
  union = jnp.sum(jnp.maximum(prob, ellipse), (-2, -1))
  return inter / jnp.maximum(union, MIN_MASS)


def own_ellipse_disagreement(prob: jax.Array, center: jax.Array,
                              cov: jax.Array, stride: int, margin: int = 0
                              ) -> jax.Array:
  """`[B]` 1 - soft IoU of the mask and the filled ellipse of its own moments.

  A shape term that needs no label: 0 for a mask that is a filled ellipse,
  larger for a ring, holes or blobs. The ellipse is a fixed target (no
  gradient through the moments), so the term moves the mask towards the
  ellipse its moments already give rather than the ellipse towards the mask.
  """
  rows, cols = prob.shape[-2:]
  target = jax.lax.stop_gradient(render_ellipses(
      ellipse_from_moments(center, cov), rows, cols, stride, margin))
  inter = jnp.sum(jnp.minimum(prob, target), (-2, -1))
  union = jnp.sum(jnp.maximum(prob, target), (-2, -1))
  return 1.0 - inter / jnp.maximum(union, MIN_MASS)


def geometry(logits: jax.Array, stride: int, margin: int, mode: str = 'plain',
             window_radius: float = 1.4) -> dict[str, jax.Array]:
  """A mask model's outputs from its logit map: the dict its `__call__` returns.

  Returns:
    {'logits': `[B, rows, cols]`, 'mass': `[B]`, 'center': `[B, 2]`,
    'cov': `[B, 2, 2]` (input px), 'ellipse_in': `[B, 5]`, 'quality': `[B]`}.
  """
  logits = logits.astype(jnp.float32)
  prob = jax.nn.sigmoid(logits)
  mass, center, cov = moments(prob, stride, margin, mode, window_radius)
  return {'logits': logits, 'mass': mass, 'center': center, 'cov': cov,
          'ellipse_in': ellipse_from_moments(center, cov),
          'quality': jax.lax.stop_gradient(
              quality(prob, center, cov, stride, margin))}


def hc_px(outputs: dict[str, jax.Array], resize: jax.Array) -> jax.Array:
  """`[B]` HC in original pixels of a mask model's outputs."""
  return hc_px_from_moments(outputs['cov'], resize)


def bce(logits: jax.Array, target: jax.Array) -> jax.Array:
  """`[B]` mean binary cross-entropy per image (soft targets)."""
  per_cell = (jnp.maximum(logits, 0) - logits * target +
              jnp.log1p(jnp.exp(-jnp.abs(logits))))
  return jnp.mean(per_cell, (-2, -1))


def soft_dice(prob: jax.Array, target: jax.Array) -> jax.Array:
  """`[B]` 1 - soft Dice per image."""
  inter = jnp.sum(prob * target, (-2, -1))
  total = jnp.sum(prob, (-2, -1)) + jnp.sum(target, (-2, -1))
  return 1.0 - (2 * inter + 1.0) / (total + 1.0)


def train_loss(outputs: dict[str, jax.Array], ellipse_true: jax.Array,
               resize: jax.Array, hc_true_target: jax.Array,
               normaliser_px: jax.Array, stride: int, margin: int,
               base_loss: Callable[[jax.Array, jax.Array], jax.Array],
               weights: dict[str, float]) -> jax.Array:
  """The loss of one batch of a mask model, as `hc_jax.training.train` uses it.

  `weights['bce'] x BCE + weights['dice'] x (1 - Dice)` of the mask against
  the rendered (augmented) reference ellipse, `+ weights['hc'] x` the
  config's loss on the moments' normalised HC, `+ weights['ellipse'] x` the
  distance of the moments' centre and shape matrix to the reference's, over
  the mean input side (as `ellipse_head.shape_distance`).

  Args:
    outputs: the model's outputs (`geometry`).
    ellipse_true: `[B, 5]` (augmented) true ellipses in ORIGINAL pixels; a
      NaN row (no ellipse) adds only the HC term.
    resize: `[B, 4]`.
    hc_true_target: `[B]` true HC over the normaliser.
    normaliser_px: the run's normaliser.
    stride, margin: the model's grid.
    base_loss: the config's HC loss.
    weights: {'bce', 'dice', 'hc', 'ellipse', 'shape', 'rays'}.

  Returns:
    The scalar loss.

  Raises:
    MaskHeadError: a 'rays' weight for outputs without 'ray_radius'.
  """
  from hc_jax.nets import ellipse_head  # pylint: disable=import-outside-toplevel
  logits = outputs['logits']
  rows, cols = logits.shape[-2:]
  true_in = ellipse_head.to_input_pixels(ellipse_true, resize)
  known = jnp.all(jnp.isfinite(true_in), -1)
  target = jax.lax.stop_gradient(
      render_ellipses(true_in, rows, cols, stride, margin))
  count = jnp.maximum(jnp.sum(known), 1)
  per_image = (weights.get('bce', 1.0) * bce(logits, target) +
               weights.get('dice', 1.0) *
               soft_dice(jax.nn.sigmoid(logits), target))
  loss = jnp.sum(jnp.where(known, per_image, 0.0)) / count
  hc_pred = hc_px(outputs, resize) / normaliser_px
  loss = loss + weights.get('hc', 1.0) * base_loss(hc_pred, hc_true_target)
  if weights.get('ellipse', 0.0):
    safe_true = jnp.where(known[:, None], true_in, 1.0)
    _, true_shape = augment.ellipse_to_matrix(safe_true)
    true_p = _sqrt_2x2(true_shape @ jnp.swapaxes(true_shape, -1, -2))
    pred_p = shape_matrix(outputs['cov'])
    side = (rows + cols) * stride / 2.0
    distance = (jnp.sum(jnp.abs(outputs['center'] - safe_true[:, :2]), -1) +
                jnp.sum(jnp.abs(pred_p - true_p), (-2, -1))) / side
    loss = loss + weights['ellipse'] * jnp.sum(
        jnp.where(known, distance, 0.0)) / count
  if weights.get('shape', 0.0):
    loss = loss + weights['shape'] * jnp.mean(own_ellipse_disagreement(
        jax.nn.sigmoid(logits), outputs['center'], outputs['cov'], stride,
        margin))
  if weights.get('rays', 0.0):
    if 'ray_radius' not in outputs:
      raise MaskHeadError('mask_loss.rays needs a model with a boundary '
                          'refinement (model_options.refine_rays > 0)')
    loss = loss + weights['rays'] * boundary.ray_loss(
        outputs, true_in, known, (rows + cols) * stride / 2.0)
  return loss
