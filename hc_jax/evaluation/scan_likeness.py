"""Whether an image looks like an ultrasound scan: four pixel statistics.

  reason = scan_likeness.refusal(image_uint8_2d)  # None for a scan-like one.
  scan_likeness.statistics(image_uint8_2d)        # The statistics themselves.

A B-mode scan is speckled tissue inside a fan on a dark background. Four
statistics of the grey image say whether an image is like that, each with a
bound chosen on every HC18 scan (the 900 training and 335 test images) with a
wide margin, and on images that are not scans
(`python benchmarks/scan_likeness.py` measures them all; docs/results.md,
"Refusing what is not a scan", has the table):

  grey_levels           grey levels each holding at least `LEVEL_SHARE` of
                        the pixels; at least `MIN_GREY_LEVELS` (HC18: 61 or
                        more). Drawings, checkerboards, stripes, text and
                        salt-and-pepper use a handful.
  neighbour_correlation Pearson correlation of horizontally and vertically
                        adjacent pixels, both brighter than `DARK_LEVEL` (the
                        tissue, not the background); at least
                        `MIN_NEIGHBOUR_CORRELATION` (HC18: 0.953 or more).
                        Speckle spans several pixels; noise is uncorrelated
                        (about 0), also when it fills only a fan.
  dark_corners          of the image's four corners (each an eighth of its
                        height and width), the mean share of pixels at or
                        below `DARK_LEVEL` in the two darkest; at least
                        `MIN_DARK_CORNERS` (HC18: 0.726 or more). The fan
                        leaves two corners black whichever way it points;
                        photographs and gradients have no such background.
  speckle_correlation   asked only of an image without dark corners (a scan
                        exported cropped to its sector): the correlation of
                        horizontally adjacent pixels of its fine texture (the
                        image less its `SPECKLE_WINDOW`-pixel local mean),
                        inside the tissue; at least `MIN_SPECKLE_CORRELATION`
                        (HC18's 1235 scans cropped inside their fan, two
                        ways: 0.84 or more).
                        Speckle grains span several pixels, so its fine
                        texture is smooth; a photograph's is grain and
                        compression noise (0.66-0.71 on those measured). A
                        texture of SD below `MIN_TEXTURE_SD` grey levels
                        (a smooth gradient) counts as none.

The phantom scans of `hc_jax.data.phantom_set` (what the tests and demos
train and predict on) are rendered as scans (fan, speckle, dark background) and count
as scan-like: they pass every bound. What these statistics cannot tell from
an ultrasound scan is another grey medical image with a black background
(an MR slice, for one); the model's own signals (a mask model's quality, the
plausible range) are the checks left for those.
"""

import math

import numpy as np
from scipy import ndimage

# Grey level at or below which a pixel is background (near-black).
DARK_LEVEL = 10
# A grey level is in use when it holds at least this share of the pixels.
LEVEL_SHARE = 1e-3
# The bounds, chosen on HC18 (minima 61, 0.953 and 0.726 over its 1235
# scans) and on non-scans (drawings and patterns at most 10 grey levels, noise
# a correlation of at most 0.015, gradients and photographs dark corners of
# at most 0.34; see the module doc).
MIN_GREY_LEVELS = 24
MIN_NEIGHBOUR_CORRELATION = 0.5
MIN_DARK_CORNERS = 0.5
# Fine texture: the image less its local mean over this many pixels square;
# tissue is where no pixel of a window this size is background.
SPECKLE_WINDOW = 9
# Fine texture weaker than this (SD in grey levels) is flat: a smooth
# gradient's (under 0.6), not speckle (HC18 crops: 2.6 or more).
MIN_TEXTURE_SD = 1.5
MIN_SPECKLE_CORRELATION = 0.8
# Each corner is this fraction of the image's height and width.
CORNER_FRACTION = 1 / 8
# Fewer adjacent tissue pixel pairs than this give no correlation (NaN).
MIN_PAIRS = 64


def grey_levels(image: np.ndarray) -> int:
  """How many grey levels hold at least `LEVEL_SHARE` of the pixels."""
  counts = np.bincount(np.asarray(image, np.uint8).ravel(), minlength=256)
  return int((counts >= max(1.0, LEVEL_SHARE * image.size)).sum())


def neighbour_correlation(image: np.ndarray) -> float:
  """Correlation of adjacent pixels brighter than `DARK_LEVEL` (NaN if too
  few such pairs, or if they are all one grey)."""
  image = np.asarray(image)
  tissue = image > DARK_LEVEL
  across = tissue[:, 1:] & tissue[:, :-1]
  down = tissue[1:] & tissue[:-1]
  if across.sum() + down.sum() < MIN_PAIRS:
    return math.nan
  first = np.concatenate([image[:, :-1][across], image[:-1][down]]).astype(
      np.float64)
  second = np.concatenate([image[:, 1:][across], image[1:][down]]).astype(
      np.float64)
  first -= first.mean()
  second -= second.mean()
  norm = math.sqrt(float(first @ first) * float(second @ second))
  return float(first @ second) / norm if norm > 0 else math.nan


def dark_corners(image: np.ndarray) -> float:
  """Mean share of near-black pixels in the image's two darkest corners."""
  image = np.asarray(image)
  height, width = image.shape
  rows = max(1, round(height * CORNER_FRACTION))
  cols = max(1, round(width * CORNER_FRACTION))
  shares = sorted(float((corner <= DARK_LEVEL).mean()) for corner in (
      image[:rows, :cols], image[:rows, -cols:], image[-rows:, :cols],
      image[-rows:, -cols:]))
  return (shares[-1] + shares[-2]) / 2


def speckle_correlation(image: np.ndarray) -> float:
  """Correlation of horizontally adjacent pixels of the image's fine texture
  (the image less its local mean) inside the tissue; NaN if too few such
  pairs, or if the texture is flat (SD below `MIN_TEXTURE_SD`)."""
  image = np.asarray(image)
  values = image.astype(np.float64)
  texture = values - ndimage.uniform_filter(values, SPECKLE_WINDOW)
  tissue = ndimage.minimum_filter(image, SPECKLE_WINDOW) > DARK_LEVEL
  pairs = tissue[:, 1:] & tissue[:, :-1]
  if pairs.sum() < MIN_PAIRS or texture[tissue].std() < MIN_TEXTURE_SD:
    return math.nan
  first = texture[:, :-1][pairs] - texture[:, :-1][pairs].mean()
  second = texture[:, 1:][pairs] - texture[:, 1:][pairs].mean()
  norm = math.sqrt(float(first @ first) * float(second @ second))
  return float(first @ second) / norm if norm > 0 else math.nan


def statistics(image: np.ndarray) -> dict[str, float]:
  """The four statistics of a 2D uint8 image (see the module doc)."""
  return {'grey_levels': grey_levels(image),
          'neighbour_correlation': neighbour_correlation(image),
          'dark_corners': dark_corners(image),
          'speckle_correlation': speckle_correlation(image)}


def refusal(image: np.ndarray) -> str | None:
  """Why a 2D uint8 image does not look like an ultrasound scan, or None."""
  levels = grey_levels(image)
  if levels < MIN_GREY_LEVELS:
    return (f'only {levels} grey levels in use (a scan has at least '
            f'{MIN_GREY_LEVELS}): a drawing or pattern, not an ultrasound scan')
  correlation = neighbour_correlation(image)
  if not correlation >= MIN_NEIGHBOUR_CORRELATION:  # NaN too.
    return (f'neighbouring pixels are uncorrelated (correlation '
            f'{correlation:.2f}, a scan\'s is at least '
            f'{MIN_NEIGHBOUR_CORRELATION:g}): noise, not an ultrasound scan')
  corners = dark_corners(image)
  if corners >= MIN_DARK_CORNERS:
    return None
  # No dark background: a scan cropped to its sector still has speckle.
  speckle = speckle_correlation(image)
  if not speckle >= MIN_SPECKLE_CORRELATION:  # NaN too.
    return (f'no dark background around the scan (its two darkest corners '
            f'are {corners:.0%} near-black, a scan\'s at least '
            f'{MIN_DARK_CORNERS:.0%}) and no speckle in its texture '
            f'(correlation {speckle:.2f}, a cropped scan\'s at least '
            f'{MIN_SPECKLE_CORRELATION:g}): not an ultrasound scan')
  return None
