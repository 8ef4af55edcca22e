"""The scan-likeness statistics on HC18 scans and on images that are not scans.

  python benchmarks/scan_likeness.py [--hc18_dir=DIR] [--quality]

Computes `hc_jax.evaluation.scan_likeness.statistics` of every HC18 scan (training_set
and test_set PNGs, not the annotations; the copy beside the checkout,
$HC18_DIR or --hc18_dir), of the shipped sample scans, of phantom scans
(`hc_jax.data.phantom.render_scan`, at HC18's size and at the tests' small
sizes), of the frames of an ultrasound cine bundled with pydicom, and of
non-scans made here: uniform and Gaussian noise at several sizes (also noise
filling only a phantom's fan), salt-and-pepper, smooth gradients,
checkerboards, text-like stripes, and the pictures bundled with matplotlib
and pydicom (a photograph, a drawing, a logo, an MR slice, a CT slice,
colour bars). Prints, per kind, the range of each statistic and how many
images `scan_likeness.refusal` refuses, as a markdown table, then each
picture's row. `--quality` adds the shipped model's mask quality (the mean
over its five members) on the non-scans and the shipped samples.
"""

import argparse
import glob
import gzip
import math
import os

import numpy as np
from PIL import Image

from hc_jax import archive as archive_lib
from hc_jax.data import hc18
from hc_jax.data import phantom
from hc_jax.evaluation import dicom
from hc_jax.evaluation import scan_likeness

DARK = scan_likeness.DARK_LEVEL


def _u8(values) -> np.ndarray:
  return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _phantom(rng, height, width) -> np.ndarray:
  a = rng.uniform(0.11, 0.43) * height
  return phantom.render_scan(
      rng, height, width, rng.uniform(0.37, 0.63) * width,
      rng.uniform(0.43, 0.57) * height, a, a * rng.uniform(0.65, 1.0),
      rng.uniform(0, math.pi))


def phantoms(rng) -> list[np.ndarray]:
  return ([_phantom(rng, 540, 800) for _ in range(20)] +
          [_phantom(rng, 64, 96) for _ in range(5)] +
          [_phantom(rng, 32, 48) for _ in range(5)])


def negatives(rng) -> dict[str, list[np.ndarray]]:
  """{kind: images} of the non-scans made here."""
  sizes = ((128, 192), (300, 400), (540, 800), (1080, 1600))
  kinds = {
      'uniform noise': [rng.integers(0, 256, s, dtype=np.uint8)
                        for s in sizes],
      'Gaussian noise (mean 128, SD 40)': [_u8(rng.normal(128, 40, s))
                                           for s in sizes],
      'Gaussian noise (mean 20, SD 30)': [_u8(rng.normal(20, 30, s))
                                          for s in sizes],
  }
  fans = []
  for _ in range(3):
    scan = _phantom(rng, 540, 800)
    noise = rng.integers(DARK + 1, 256, scan.shape, dtype=np.uint8)
    fans.append(np.where(scan > DARK, noise, scan))
  kinds['uniform noise inside a phantom fan'] = fans
  salt = []
  for share in (0.05, 0.2):
    grey = np.full((540, 800), 128, np.uint8)
    draw = rng.random(grey.shape)
    grey[draw < share / 2], grey[draw > 1 - share / 2] = 0, 255
    black = np.where(rng.random(grey.shape) < share, 255, 0).astype(np.uint8)
    salt += [grey, black]
  kinds['salt and pepper'] = salt
  y, x = np.mgrid[0:540, 0:800]
  kinds['smooth gradients'] = [
      _u8(x / 799 * 255), _u8(y / 539 * 255),
      _u8(255 * np.hypot(x - 400, y - 270) / 482),
      _u8(127 + 127 * np.sin(x / 40) * np.cos(y / 30)),
      _u8(255 - 255 * np.hypot(x - 400, y + 100) / 900)]
  kinds['checkerboards'] = [_u8(255 * ((x // s + y // s) % 2))
                            for s in (1, 4, 16, 64)]
  stripes = []
  for period, width in ((12, 3), (20, 8), (6, 1)):
    stripes.append(np.where(y % period < width, 0, 255).astype(np.uint8))
  text = np.full((540, 800), 250, np.uint8)
  for row in range(20, 520, 24):  # Lines of 'words': dark specks on white.
    col = 20
    while col < 760:
      length = min(int(rng.integers(10, 60)), 780 - col)
      word = text[row:row + 12, col:col + length]
      word[rng.random(word.shape) < 0.45] = 0
      word[:, ::3] = 250
      col += length + 8
  kinds['text-like stripes'] = stripes + [text]
  return kinds


def pictures() -> dict[str, np.ndarray]:
  """{name: grey image} of the pictures bundled with installed packages."""
  out = {}
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    data = os.path.join(os.path.dirname(matplotlib.__file__), 'mpl-data',
                        'sample_data')
    for name in ('grace_hopper.jpg', 'Minduka_Present_Blue_Pack.png',
                 'logo2.png'):
      out[f'matplotlib {name}'] = np.asarray(
          Image.open(os.path.join(data, name)).convert('L'))
    with gzip.open(os.path.join(data, 's1045.ima.gz')) as f:
      mri = np.frombuffer(f.read(), np.uint16).reshape(256, 256)
    out['matplotlib s1045.ima (MR slice)'] = _u8(mri / mri.max() * 255)
  except (ImportError, OSError):
    pass
  for name in ('CT_small.dcm', 'MR_small.dcm', 'SC_rgb_rle.dcm',
               'JPEG2000.dcm'):
    try:
      out[f'pydicom {name}'] = dicom.read_frame(_pydicom_file(name))[0]
    except (ImportError, OSError, ValueError, dicom.DicomError):
      pass
  return out


def _pydicom_file(name: str) -> str:
  import pydicom  # pylint: disable=import-outside-toplevel
  return os.path.join(os.path.dirname(pydicom.__file__), 'data', 'test_files',
                      name)


def ultrasound_cine() -> list[np.ndarray]:
  """The 30 frames of pydicom's examples_ybr_color.dcm (an ultrasound cine)."""
  try:
    path = _pydicom_file('examples_ybr_color.dcm')
    info = dicom.read_info(path)
    return [dicom.read_frame(path, k)[0] for k in range(info.frames)]
  except (ImportError, OSError, ValueError, dicom.DicomError):
    return []


def read_pngs(paths) -> list[np.ndarray]:
  return [hc18.read_grayscale(path)[0] for path in paths]


def _range(values, digits) -> str:
  values = np.asarray(values, np.float64)
  if np.isnan(values).all():
    return 'n/a'
  low, high = np.nanmin(values), np.nanmax(values)
  text = f'{low:.{digits}f}' if low == high else (
      f'{low:.{digits}f} – {high:.{digits}f}')
  return text + (' (some n/a)' if np.isnan(values).any() else '')


def row(kind: str, images, quality=None) -> str:
  stats = [scan_likeness.statistics(image) for image in images]
  refused = sum(scan_likeness.refusal(image) is not None for image in images)
  cells = [kind, str(len(images)), str(refused),
           _range([s['grey_levels'] for s in stats], 0),
           _range([s['neighbour_correlation'] for s in stats], 3),
           _range([s['dark_corners'] for s in stats], 3)]
  if quality is not None:
    cells.append(_range(quality, 3))
  return '| ' + ' | '.join(cells) + ' |'


def mask_quality(images) -> np.ndarray:
  """The shipped model's quality on each image, refused or not."""
  from hc_jax.evaluation import loading  # pylint: disable=import-outside-toplevel
  predictor = loading.load()
  inputs = np.stack([predictor.preprocess(image) for image in images])
  # pylint: disable-next=protected-access
  return predictor._outputs([inputs])['quality'].mean(axis=(0, 1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--hc18_dir', default=None)
  parser.add_argument('--quality', action='store_true')
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  groups = {}  # kind: (images, is a scan)
  root = args.hc18_dir or hc18.default_dir()
  for split in ('training_set', 'test_set'):
    paths = sorted(p for p in glob.glob(os.path.join(root or '', split,
                                                     '*.png'))
                   if not p.endswith('_Annotation.png'))
    if paths:
      groups[f'HC18 {split}'] = (read_pngs(paths), True)
  groups['shipped samples'] = (read_pngs(sorted(glob.glob(os.path.join(
      archive_lib.SAMPLE_IMAGES_DIR, '*.png')))), True)
  groups['phantoms (800x540, 96x64, 48x32)'] = (phantoms(rng), True)
  cine = ultrasound_cine()
  if cine:
    groups['pydicom ultrasound cine (320x240)'] = (cine, True)
  for kind, images in negatives(rng).items():
    groups[kind] = (images, False)
  named = pictures()
  groups['pictures (below)'] = (list(named.values()), False)
  header = ['kind', 'images', 'refused', 'grey_levels',
            'neighbour_correlation', 'dark_corners']
  if args.quality:
    header.append('mask quality (shipped model)')
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  for kind, (images, is_scan) in groups.items():
    quality = None
    if args.quality and (not is_scan or kind == 'shipped samples'):
      quality = mask_quality(images)
    elif args.quality:
      quality = [math.nan]
    print(row(kind, images, quality))
  print()
  quality = (mask_quality(list(named.values())) if args.quality else
             [None] * len(named))
  print('| picture | size | grey_levels | neighbour_correlation | '
        'dark_corners | refused because |' + (
            ' mask quality |' if args.quality else ''))
  print('|---|---|---|---|---|---|' + ('---|' if args.quality else ''))
  for (name, image), image_quality in zip(named.items(), quality):
    stats = scan_likeness.statistics(image)
    reason = scan_likeness.refusal(image) or 'not refused'
    print(f'| {name} | {image.shape[1]}x{image.shape[0]} | '
          f'{stats["grey_levels"]} | {stats["neighbour_correlation"]:.3f} | '
          f'{stats["dark_corners"]:.3f} | {reason.split(" (")[0]} |' + (
              f' {image_quality:.3f} |' if args.quality else ''))
  print(f'\nbounds: grey_levels >= {scan_likeness.MIN_GREY_LEVELS}, '
        f'neighbour_correlation >= '
        f'{scan_likeness.MIN_NEIGHBOUR_CORRELATION:g}, dark_corners >= '
        f'{scan_likeness.MIN_DARK_CORNERS:g}')


if __name__ == '__main__':
  main()
