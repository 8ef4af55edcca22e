"""Shifted versions of HC18: the same heads, as another scanner or another
export shows them.

  python -m hc_jax.shifted --out=hc18_other_machine      # another machine
  python -m hc_jax.shifted --how=reframed --out=hc18_reframed   # re-framed

Re-framed (`reframe`): each scan zoomed in (cropped back to its size),
zoomed out (on a black border) or cut to its sector (no dark corners), as
exports differ in field of view; the head stays inside.

The other machine: a fixed, documented domain shift for measuring how a
trained model transfers and how much fine-tuning on a few labelled scans
gives back. Every scan goes through, in this order (`other_machine`):

1. gain curve: grey levels g -> 255 (g / 255) ^ GAMMA (GAMMA = 0.6: the
   mid-tones brighter, a different time-gain/log compression);
2. blur: a Gaussian of BLUR_SIGMA = 1.5 original pixels (a lower-resolution
   probe);
3. zoomed out: the whole scan shrunk by ZOOM = 0.75 (bilinear) and centred on
   a black canvas of the original size (a wider field of view), so each
   pixel is 1 / ZOOM times as many millimetres (the CSV's pixel size is
   divided by ZOOM; the HC in mm is unchanged);
4. a JPEG export of quality JPEG_QUALITY = 50 (lossy), decoded again and
   kept as PNG (the artefacts baked in, the HC18 layout kept).

No randomness: the copy is the same on every machine. The copy is in the
HC18 layout (`training_set/NNN_[k]HC.png`, without annotations, its CSV, and
an empty test set), so the shifted scans keep their names, subjects and
folds, and every hc_jax command reads it as it reads HC18
(`--config.data.hc18_dir=<out>`, `cv_score --hc18_dir=<out>`).
"""

import csv
import io
import math
import os
import zlib

import numpy as np
from PIL import Image
from PIL import ImageFilter

from hc_jax.data import hc18

GAMMA = 0.6
BLUR_SIGMA = 1.5
ZOOM = 0.75
JPEG_QUALITY = 50


def other_machine(pixels: np.ndarray) -> np.ndarray:
  """`[H, W]` uint8 scan as the other machine shows it (before the JPEG)."""
  grey = 255.0 * (pixels.astype(np.float64) / 255.0) ** GAMMA
  image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
  image = image.filter(ImageFilter.GaussianBlur(BLUR_SIGMA))
  height, width = pixels.shape
  small = image.resize((round(width * ZOOM), round(height * ZOOM)),
                       Image.BILINEAR)
  canvas = Image.new('L', (width, height), 0)
  canvas.paste(small, ((width - small.width) // 2,
                       (height - small.height) // 2))
  return np.asarray(canvas)


def pixel_size(pixel_size_mm: float, width: int) -> float:
  """The shifted scan's pixel size: the original's over the zoom actually
  applied (the rounded width)."""
  return pixel_size_mm * width / round(width * ZOOM)


def jpeg_round_trip(pixels: np.ndarray) -> np.ndarray:
  """The pixels after a JPEG export of quality JPEG_QUALITY."""
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=JPEG_QUALITY)
  buffer.seek(0)
  with Image.open(buffer) as image:
    return np.asarray(image.convert('L'))


# Re-framing (`reframe`): how an export frames the same scan.
FRAMINGS = ('zoom_in', 'zoom_out', 'sector_crop')
ZOOM_IN = (1.05, 1.25)
ZOOM_OUT = (0.8, 0.95)
# Kept around the head's ellipse when a framing crops: this many pixels.
HEAD_MARGIN_PX = 8
# Grey level above which a pixel belongs to the sector (sector_crop).
SECTOR_LEVEL = 12


def _head_box(ellipse) -> tuple[float, float, float, float]:
  """(x0, y0, x1, y1) of an ellipse `Ellipse`'s bounding box."""
  a, b, t = ellipse.semi_axis_a, ellipse.semi_axis_b, ellipse.angle_rad
  half_w = math.hypot(a * math.cos(t), b * math.sin(t))
  half_h = math.hypot(a * math.sin(t), b * math.cos(t))
  return (ellipse.center_x - half_w, ellipse.center_y - half_h,
          ellipse.center_x + half_w, ellipse.center_y + half_h)


def _offset(rng, size: int, canvas: int, low: float, high: float) -> int:
  """Where a `size`-long image starts on a `canvas`-long one (negative:
  cropped) so that its span [low, high] stays inside, at random."""
  first = max(canvas - size, math.ceil(HEAD_MARGIN_PX - low))
  last = min(0, math.floor(canvas - HEAD_MARGIN_PX - high))
  if size <= canvas:  # Zoomed out: the scan fits, with a border.
    first, last = 0, canvas - size
  if first > last:  # The head does not fit with its margin: centre it.
    return round((canvas - low - high) / 2)
  return int(rng.integers(first, last + 1))


def reframe(pixels: np.ndarray, ellipse, name: str
            ) -> tuple[np.ndarray, float]:
  """One scan as another export frames it: (pixels, zoom).

  The framing is drawn from the scan's name (the same on every machine):
  `zoom_in` (x1.05-1.25, cropped back to the scan's size), `zoom_out`
  (x0.8-0.95 on a black border) or `sector_crop` (cut to the sector's
  bounding box, no dark corners, a different size and aspect). The head's
  reference ellipse (original pixels) stays inside with HEAD_MARGIN_PX;
  the pixel size of the result is the original's over `zoom`.
  """
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  framing = FRAMINGS[int(rng.integers(len(FRAMINGS)))]
  height, width = pixels.shape
  x0, y0, x1, y1 = _head_box(ellipse)
  if framing == 'sector_crop':
    rows = np.nonzero((pixels > SECTOR_LEVEL).mean(1) > 0.2)[0]
    cols = np.nonzero((pixels > SECTOR_LEVEL).mean(0) > 0.2)[0]
    top = min(rows[0] if len(rows) else 0, max(0, int(y0) - HEAD_MARGIN_PX))
    bottom = max(rows[-1] + 1 if len(rows) else height,
                 min(height, int(y1) + HEAD_MARGIN_PX + 1))
    left = min(cols[0] if len(cols) else 0, max(0, int(x0) - HEAD_MARGIN_PX))
    right = max(cols[-1] + 1 if len(cols) else width,
                min(width, int(x1) + HEAD_MARGIN_PX + 1))
    return pixels[top:bottom, left:right].copy(), 1.0
  zoom = float(rng.uniform(*(ZOOM_IN if framing == 'zoom_in' else ZOOM_OUT)))
  size = (round(width * zoom), round(height * zoom))
  zoom = size[0] / width
  image = Image.fromarray(pixels).resize(size, Image.BILINEAR)
  left = _offset(rng, size[0], width, x0 * zoom, x1 * zoom)
  top = _offset(rng, size[1], height, y0 * zoom, y1 * zoom)
  canvas = Image.new('L', (width, height), 0)
  canvas.paste(image, (left, top))
  return np.asarray(canvas), zoom


def write(root: str, out: str, how: str = 'other_machine') -> int:
  """Writes the other-machine (or re-framed) copy of an HC18 directory's
  training set.

  Args:
    root: HC18 in the Zenodo layout.
    out: a new directory (refused if it exists: nothing is overwritten).
    how: 'other_machine' (`other_machine`, then a JPEG export) or
      'reframed' (`reframe`).

  Returns:
    The number of scans written.
  """
  if os.path.exists(out):
    raise ValueError(f'{out} exists; the shifted copy goes to a new '
                     'directory')
  records, problems = hc18.scan_split(root, 'train')
  if problems:
    raise hc18.HC18Error(root, problems)
  tmp = out + '.partial'
  folder, csv_name = hc18.SPLITS['train']
  os.makedirs(os.path.join(tmp, folder), exist_ok=True)
  rows = []
  for record in records:
    pixels, _ = hc18.read_grayscale(record.image_path)
    if how == 'reframed':
      shifted, zoom = reframe(pixels, record.ellipse, record.filename)
      size_mm = record.pixel_size_mm / zoom
    else:
      shifted = jpeg_round_trip(other_machine(pixels))
      size_mm = pixel_size(record.pixel_size_mm, pixels.shape[1])
    Image.fromarray(shifted).save(os.path.join(tmp, folder, record.filename))
    rows.append([record.filename, f'{size_mm:.9f}', f'{record.hc_mm:.2f}'])
  with open(os.path.join(tmp, csv_name), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['filename', 'pixel size(mm)', 'head circumference (mm)'])
    writer.writerows(rows)
  test_folder, test_csv = hc18.SPLITS['test']
  os.makedirs(os.path.join(tmp, test_folder), exist_ok=True)
  with open(os.path.join(tmp, test_csv), 'w', newline='') as f:
    f.write('filename,pixel size(mm)\n')
  os.replace(tmp, out)
  return len(rows)
