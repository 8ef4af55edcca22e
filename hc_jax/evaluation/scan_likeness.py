"""Whether an image looks like an ultrasound scan: three pixel statistics.

  reason = scan_likeness.refusal(image_uint8_2d)  # None for a scan-like one.
  scan_likeness.statistics(image_uint8_2d)        # The statistics themselves.

A B-mode scan is speckled tissue inside a fan on a dark background. Three
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

The phantom scans of `hc_jax.data.synthetic` (what the tests and demos train and
predict on) are rendered as scans (fan, speckle, dark background) and count
as scan-like: they pass every bound. What these statistics cannot tell from
an ultrasound scan is another grey medical image with a black background
(an MR slice, for one); the model's own signals (a mask model's quality, the
plausible range) are the checks left for those.
"""

import math

import numpy as np

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


def statistics(image: np.ndarray) -> dict[str, float]:
  """The three statistics of a 2D uint8 image (see the module doc)."""
  return {'grey_levels': grey_levels(image),
          'neighbour_correlation': neighbour_correlation(image),
          'dark_corners': dark_corners(image)}


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
  if corners < MIN_DARK_CORNERS:
    return (f'no dark background around the scan (its two darkest corners '
            f'are {corners:.0%} near-black, a scan\'s at least '
            f'{MIN_DARK_CORNERS:.0%}): not an ultrasound scan')
  return None
