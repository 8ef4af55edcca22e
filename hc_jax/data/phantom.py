"""Drawing phantom scans: an elliptical skull in ultrasound-like speckle.

  scan = phantom.render_scan(rng, height, width, cx, cy, a, b, angle_rad)
  annotation = phantom.draw_ellipse_outline(height, width, cx, cy, a, b,
                                            angle_rad)

The scan is uint8: soft tissue in a sector-shaped field of view, a darker
brain with a midline, a bright skull ring whose centreline is the ellipse,
all under Rayleigh speckle. The annotation is HC18's: a closed 1-pixel
outline, 255 on 0. `hc_jax.data.phantom_set` lays such scans out as HC18. This
module needs only numpy and PIL.
"""

import functools
import math

import numpy as np
from PIL import Image

from hc_jax.data.ellipse import ramanujan_perimeter


def _chebyshev_adjacent(p, q):
  return abs(p[0] - q[0]) <= 1 and abs(p[1] - q[1]) <= 1


def ellipse_outline_pixels(center_x, center_y, a, b, angle_rad):
  """Pixels of a closed, 1-pixel wide, 8-connected ellipse outline.

  The parametric ellipse is sampled densely, rounded to pixels, and then
  thinned: a pixel is dropped whenever its two neighbours along the curve
  already touch (8-connectivity), so no corner pixels of 4-connected staircases
  remain.

  Args:
    center_x: column of the centre, in pixels.
    center_y: row of the centre, in pixels.
    a: first semi-axis, in pixels (along `angle_rad`).
    b: second semi-axis, in pixels.
    angle_rad: angle of the `a` axis, from +x (columns) towards +y (rows).

  Returns:
    An int array of shape (num_pixels, 2) of (row, column) in curve order; may
    extend outside any image.
  """
  num_samples = max(64, int(math.ceil(4.0 * float(ramanujan_perimeter(a, b)))))
  t = np.linspace(0.0, 2.0 * np.pi, num_samples, endpoint=False)
  cos_angle, sin_angle = math.cos(angle_rad), math.sin(angle_rad)
  x = center_x + a * np.cos(t) * cos_angle - b * np.sin(t) * sin_angle
  y = center_y + a * np.cos(t) * sin_angle + b * np.sin(t) * cos_angle
  points = np.stack([np.rint(y), np.rint(x)], axis=1).astype(np.int64)
  # Consecutive duplicates, cyclically.
  keep = np.any(points != np.roll(points, 1, axis=0), axis=1)
  keep[0] |= not keep.any()  # A sub-pixel ellipse is one pixel.
  points = [tuple(p) for p in points[keep].tolist()]

  outline = []
  for point in points:
    while len(outline) >= 2 and _chebyshev_adjacent(outline[-2], point):
      outline.pop()
    if outline and outline[-1] == point:
      continue
    outline.append(point)
  # Thin across the seam where the curve closes on itself.
  changed = True
  while changed and len(outline) > 4:
    changed = False
    if _chebyshev_adjacent(outline[-2], outline[0]):
      outline.pop()
      changed = True
    if _chebyshev_adjacent(outline[-1], outline[1]):
      outline.pop(0)
      changed = True
  return np.asarray(outline, dtype=np.int64)


def draw_ellipse_outline(height, width, center_x, center_y, a, b, angle_rad):
  """Draws an ellipse as an HC18 annotation: a 1-pixel outline, 255 on 0.

  Args:
    height: image height (rows).
    width: image width (columns).
    center_x: column of the centre, in pixels.
    center_y: row of the centre, in pixels.
    a: first semi-axis, in pixels (along `angle_rad`).
    b: second semi-axis, in pixels.
    angle_rad: angle of the `a` axis, from +x (columns) towards +y (rows).

  Returns:
    uint8 array of shape (height, width): 255 on the closed, 8-connected,
    1-pixel wide outline, 0 elsewhere (outline parts off the image are cut).
  """
  annotation = np.zeros((height, width), dtype=np.uint8)
  pixels = ellipse_outline_pixels(center_x, center_y, a, b, angle_rad)
  rows, cols = pixels[:, 0], pixels[:, 1]
  inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
  annotation[rows[inside], cols[inside]] = 255
  return annotation


def ellipse_distance_px(rows, cols, center_x, center_y, a, b, angle_rad):
  """Approximate signed distance in pixels to an ellipse (negative inside).

  Uses the first-order approximation (q - 1) / |grad q| of the normalised
  radius q = sqrt((u / a)^2 + (v / b)^2), exact on the ellipse itself.

  Args:
    rows: array of row coordinates.
    cols: array of column coordinates, broadcastable with `rows`.
    center_x: column of the centre.
    center_y: row of the centre.
    a: first semi-axis, in pixels (along `angle_rad`).
    b: second semi-axis, in pixels.
    angle_rad: angle of the `a` axis, from +x towards +y.

  Returns:
    A tuple (distance_px, along_minor_px, normalised_radius) of float32 arrays;
    `along_minor_px` is the coordinate along the `b` axis (for the midline).
  """
  dx = cols - np.float32(center_x)
  dy = rows - np.float32(center_y)
  cos_angle, sin_angle = np.float32(math.cos(angle_rad)), np.float32(
      math.sin(angle_rad))
  along_major = dx * cos_angle + dy * sin_angle
  along_minor = -dx * sin_angle + dy * cos_angle
  normalised_radius = np.sqrt((along_major / a) ** 2 + (along_minor / b) ** 2)
  # |grad q| lies in [1 / max(a, b), 1 / min(a, b)]; clamping keeps the centre finite.
  gradient = np.sqrt((along_major / a**2) ** 2 + (along_minor / b**2) ** 2)
  gradient = np.maximum(gradient / np.maximum(normalised_radius, 1e-6),
                        1.0 / max(a, b))
  distance = (normalised_radius - 1.0) / gradient
  return distance.astype(np.float32), along_minor, normalised_radius


@functools.lru_cache(maxsize=8)
def _fan_mask(height, width):
  """Soft sector-shaped field of view, apex above the top centre of the image."""
  rows = np.arange(height, dtype=np.float32)[:, None]
  cols = np.arange(width, dtype=np.float32)[None, :]
  apex_row, apex_col = -0.3 * height, 0.5 * width
  depth = np.hypot(rows - apex_row, cols - apex_col)
  beam_angle = np.abs(np.arctan2(cols - apex_col, rows - apex_row))
  half_angle, edge = np.float32(np.deg2rad(48.0)), np.float32(np.deg2rad(2.0))
  lateral = np.clip((half_angle - beam_angle) / edge, 0.0, 1.0)
  far_depth = 1.25 * height
  axial = np.clip((far_depth - depth) / 10.0, 0.0, 1.0)
  attenuation = np.exp(-depth / (3.0 * height))
  mask = (lateral * axial * attenuation).astype(np.float32)
  mask.setflags(write=False)
  return mask


def _speckle(rng, height, width):
  """Unit-mean Rayleigh speckle, correlated over ~2 pixels by upsampling."""
  coarse_height, coarse_width = height // 2 + 1, width // 2 + 1
  uniform = rng.random((coarse_height, coarse_width), dtype=np.float32)
  rayleigh = np.sqrt(-2.0 * np.log1p(-uniform)) * np.float32(
      math.sqrt(2.0 / math.pi))
  upsampled = Image.fromarray(rayleigh).resize((width, height), Image.BILINEAR)
  return np.asarray(upsampled, dtype=np.float32)


def render_scan(rng, height, width, center_x, center_y, a, b, angle_rad):
  """Renders a phantom ultrasound scan whose skull ring centreline is the ellipse.

  Args:
    rng: numpy Generator for the speckle and the tissue levels.
    height: image height (rows).
    width: image width (columns).
    center_x: column of the ellipse centre.
    center_y: row of the ellipse centre.
    a: first semi-axis, in pixels (along `angle_rad`).
    b: second semi-axis, in pixels.
    angle_rad: angle of the `a` axis, from +x towards +y.

  Returns:
    uint8 array of shape (height, width).
  """
  tissue_level = rng.uniform(30.0, 55.0)
  brain_level = rng.uniform(12.0, 25.0)
  skull_level = rng.uniform(170.0, 230.0)
  skull_sigma_px = rng.uniform(2.0, 4.0)  # Ring full width ~2.4 sigma: 5-10 px.
  intensity = tissue_level * _fan_mask(height, width)

  # Only the bounding box of the head (plus the ring's half width) is touched.
  margin = 4.0 * skull_sigma_px + 2.0
  cos_angle, sin_angle = math.cos(angle_rad), math.sin(angle_rad)
  half_extent_x = math.hypot(a * cos_angle, b * sin_angle) + margin
  half_extent_y = math.hypot(a * sin_angle, b * cos_angle) + margin
  row0 = max(0, int(center_y - half_extent_y))
  row1 = min(height, int(math.ceil(center_y + half_extent_y)) + 1)
  col0 = max(0, int(center_x - half_extent_x))
  col1 = min(width, int(math.ceil(center_x + half_extent_x)) + 1)
  rows = np.arange(row0, row1, dtype=np.float32)[:, None]
  cols = np.arange(col0, col1, dtype=np.float32)[None, :]
  distance, along_minor, normalised_radius = ellipse_distance_px(
      rows, cols, center_x, center_y, a, b, angle_rad)

  head = intensity[row0:row1, col0:col1]
  inside = np.clip(0.5 - distance, 0.0, 1.0)  # Anti-aliased interior.
  head = head * (1.0 - inside) + brain_level * inside
  midline = np.exp(-0.5 * (along_minor / 1.5) ** 2) * (normalised_radius < 0.85)
  head = head + 0.8 * tissue_level * midline
  skull = np.exp(-0.5 * (distance / skull_sigma_px) ** 2)
  head = np.maximum(head, skull_level * skull)
  intensity = intensity.copy()
  intensity[row0:row1, col0:col1] = head

  scan = intensity * _speckle(rng, height, width)
  scan += rng.normal(0.0, 2.0, size=(height, width)).astype(np.float32)
  return np.clip(np.rint(scan), 0, 255).astype(np.uint8)
