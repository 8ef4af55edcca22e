"""Head-circumference error metrics, as the paper reports them (NumPy only).

MAE in pixels of the original image, MAE in mm and percentage MAE, each with
its standard deviation over images.
"""

import csv
import os
from typing import Mapping, Sequence

import numpy as np

PREDICTION_COLUMNS = ('filename', 'subject_id', 'pixel_size_mm', 'hc_mm_true',
                      'hc_mm_pred', 'error_mm', 'hc_px_true', 'hc_px_pred')


def hc_errors(hc_px_true, hc_px_pred, pixel_size_mm) -> dict[str, float]:
  """Summarises head-circumference errors over images.

  Args:
    hc_px_true: reference HC, px of the original image, [N].
    hc_px_pred: predicted HC, same units, [N].
    pixel_size_mm: each image's pixel size, [N].

  Returns:
    {'mae_px', 'mae_px_std', 'mae_mm', 'mae_mm_std', 'pmae', 'pmae_std',
    'bias_mm', 'num_images'}: means and (population) standard deviations of
    the absolute errors; pmae in percent of the true HC; bias is the mean
    signed error (pred - true).
  """
  true_px = np.asarray(hc_px_true, np.float64)
  pred_px = np.asarray(hc_px_pred, np.float64)
  pixel_size = np.asarray(pixel_size_mm, np.float64)
  if not true_px.size:
    raise ValueError('no images to score')
  abs_px = np.abs(pred_px - true_px)
  error_mm = (pred_px - true_px) * pixel_size
  abs_pct = 100.0 * abs_px / true_px
  return {
      'mae_px': float(abs_px.mean()), 'mae_px_std': float(abs_px.std()),
      'mae_mm': float(np.abs(error_mm).mean()),
      'mae_mm_std': float(np.abs(error_mm).std()),
      'pmae': float(abs_pct.mean()), 'pmae_std': float(abs_pct.std()),
      'bias_mm': float(error_mm.mean()),
      'num_images': int(true_px.size),
  }


def format_errors(errors: Mapping[str, float]) -> str:
  """One line: 'MAE 12.34±5.67 px, 1.23±0.45 mm, 2.34±1.2 %'."""
  return (f"MAE {errors['mae_px']:.2f}±{errors['mae_px_std']:.2f} px, "
          f"{errors['mae_mm']:.2f}±{errors['mae_mm_std']:.2f} mm, "
          f"{errors['pmae']:.2f}±{errors['pmae_std']:.2f} % "
          f"(n={errors['num_images']})")


def write_predictions(path: str, rows: Sequence[Mapping[str, object]]) -> None:
  """Writes per-image predictions as CSV (`PREDICTION_COLUMNS`), atomically."""
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=PREDICTION_COLUMNS)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: row[k] for k in PREDICTION_COLUMNS})
  os.replace(tmp, path)


def prediction_rows(filename, subject_id, pixel_size_mm, hc_px_true,
                    hc_px_pred) -> list[dict[str, object]]:
  """Per-image rows for `write_predictions` from parallel arrays."""
  rows = []
  for name, subject, size, true_px, pred_px in zip(
      filename, subject_id, pixel_size_mm, hc_px_true, hc_px_pred):
    true_mm, pred_mm = float(true_px) * float(size), float(pred_px) * float(
        size)
    rows.append({
        'filename': name.decode() if isinstance(name, bytes) else str(name),
        'subject_id': int(subject), 'pixel_size_mm': float(size),
        'hc_mm_true': round(true_mm, 3), 'hc_mm_pred': round(pred_mm, 3),
        'error_mm': round(pred_mm - true_mm, 3),
        'hc_px_true': round(float(true_px), 3),
        'hc_px_pred': round(float(pred_px), 3),
    })
  return rows
