"""Regression targets: HC in pixels of the original image over a normaliser.

Plain arithmetic that works on Python floats and NumPy, TF or JAX arrays, and
imports nothing heavy, so the TensorFlow-free paths share it. The target does
not depend on how the image was brought to the model's size (any of
`RESIZE_MODES`): it is always HC in pixels of the ORIGINAL image, so a
prediction converts back with the same normaliser and the image's own pixel
size in every mode.
"""

# 'stretch': the whole image to a square (the paper); 'letterbox': aspect
# kept, zero-padded. See hc_jax.preprocess.resize.
RESIZE_MODES = ('stretch', 'letterbox')

def hc_target(hc_px, normaliser_px):
  """Regression target from HC in pixels of the original image.

  Args:
    hc_px: head circumference in original-image pixels.
    normaliser_px: constant that brings the target near 1.

  Returns:
    `hc_px / normaliser_px`.
  """
  return hc_px / normaliser_px


def hc_px_from_target(target, normaliser_px):
  """HC in original-image pixels from a target or prediction."""
  return target * normaliser_px


def hc_mm_from_target(target, normaliser_px, pixel_size_mm):
  """HC in millimetres from a target or prediction.

  Args:
    target: target or prediction, as made by `hc_target`.
    normaliser_px: the same constant used to make the target.
    pixel_size_mm: pixel size of the original image, in mm.

  Returns:
    `target * normaliser_px * pixel_size_mm`, for either resize mode.
  """
  return target * normaliser_px * pixel_size_mm
