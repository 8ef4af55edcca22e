"""A prediction's CSV row and overlay, as `python -m hc_jax.predict` writes.

  prediction_rows.fill_row(row, out, i, predictor, no_mm, ellipses_mm)
  prediction_rows.write_overlay(overlays, row, file_name, image, out, i,
                                predictor.kind)

`out` is a `hc_jax.evaluation.inference.Predictor`'s output for a chunk of
scans, `i` one of them. The row gets its HC (px, mm, SD), status and
message, its gestational age (Hadlock) unless implausible, and the cells of
the model's kind (`hc_jax.nets.kinds`: an ellipse model's `ELLIPSE_COLUMNS`,
a quality); the overlay is the scan with what its kind draws (the ellipse,
a mask's outline) and those lines (`hc_jax.evaluation.scan_files`).
"""

import math
import os

from hc_jax import workdir as workdir_lib
from hc_jax.evaluation import gestational_age
from hc_jax.evaluation import scan_files
from hc_jax.nets import kinds

# Added after `hc_jax.predict.COLUMNS` for an ellipse model (its kind's).
ELLIPSE_COLUMNS = kinds.ELLIPSE_COLUMNS


def _fmt(value: float, digits: int) -> str:
  return '' if value is None or not math.isfinite(value) else (
      f'{value:.{digits}f}')


def fill_row(row: dict, out: dict, i: int, predictor, no_mm: str,
             ellipses_mm: dict[str, list]) -> None:
  """Sets a row's cells from image `i` of the predictor's output `out` (its
  kind's cells too), and the ellipse in mm in `ellipses_mm` where the model
  gives one and the pixel size is known."""
  row.update(status=out['status'][i], message=out['message'][i])
  if row['status'] == 'refused':
    return
  if no_mm:
    row['message'] = '; '.join(filter(None, [row['message'], no_mm]))
  row.update(hc_px=_fmt(out['hc_px'][i], 3),
             hc_mm=_fmt(out['hc_mm'][i], 3),
             hc_mm_sd=_fmt(out['hc_mm_sd'][i], 3))
  row.update(kinds.get(predictor.kind).cells(out, i))
  if 'ellipse_mm' in out and math.isfinite(out['ellipse_mm'][i][0]):
    ellipses_mm[row['filename']] = list(out['ellipse_mm'][i])
  if row['status'] != 'implausible':
    ga_weeks = gestational_age.hadlock_ga_weeks(out['hc_mm'][i])
    row.update(ga_weeks=_fmt(ga_weeks, 2),
               ga_flag=gestational_age.ga_flag(ga_weeks))


def write_overlay(overlays: str, row: dict, file_name: str, image, out: dict,
                  i: int, kind) -> None:
  """Writes the overlay of image `i` of `out` under `overlays`, with what
  the model's `kind` (a `hc_jax.nets.kinds.Kind` or its name) draws.

  Raises:
    PredictError: when it cannot be written.
  """
  shapes = kinds.get(kind).overlay(out, i)
  # A frame k of file.dcm: file_framek_prediction.png.
  overlay = os.path.join(
      overlays, os.path.splitext(file_name)[0]
      + row['filename'][len(file_name):].replace('#', '_frame')
      + scan_files.OVERLAY_SUFFIX)
  try:
    os.makedirs(os.path.dirname(overlay), exist_ok=True)
    scan_files.write_overlay(
        image, _overlay_lines(row), overlay, shapes['ellipse'],
        shapes['outline'])
  except OSError as e:
    raise workdir_lib.PredictError(
        f'overlay {overlay} cannot be written '
        f'({e.strerror or e})') from None


def _overlay_lines(row) -> list[str]:
  if not row['hc_mm']:
    lines = [f'HC {float(row["hc_px"]):.1f} px (pixel size unknown)']
  else:
    spread = f' ± {float(row["hc_mm_sd"]):.1f}' if row['hc_mm_sd'] else ''
    lines = [f'HC {float(row["hc_mm"]):.1f}{spread} mm']
    if row['ga_weeks']:
      lines.append(f'GA {row["ga_weeks"]} weeks (Hadlock)')
  if row['ga_flag']:
    lines.append(row['ga_flag'])
  if row['status'] != 'ok':
    lines.append(f'{row["status"].upper()}: {row["message"]}')
  return lines
