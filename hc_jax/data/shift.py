"""An "other machine" version of HC18: the same heads, seen as another scanner
exports them.

  python -m hc_jax.shifted --out=hc18_other_machine      # writes the copy

A fixed, documented domain shift for measuring how a trained model transfers
and how much fine-tuning on a few labelled scans gives back. Every scan
goes through, in this order (`other_machine`):

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
import os

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


def write(root: str, out: str) -> int:
  """Writes the other-machine copy of an HC18 directory's training set.

  Args:
    root: HC18 in the Zenodo layout.
    out: a new directory (refused if it exists: nothing is overwritten).

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
    Image.fromarray(jpeg_round_trip(other_machine(pixels))).save(
        os.path.join(tmp, folder, record.filename))
    rows.append([record.filename, f'{pixel_size(record.pixel_size_mm, pixels.shape[1]):.9f}',
                 f'{record.hc_mm:.2f}'])
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
