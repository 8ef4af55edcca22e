"""The report and CSVs of a cross-validation scoring (`cv.Scores`).

`format_report` is the summary and the worst images as
`python -m hc_jax.cv_score` prints them; `flag_table` what flagging a mask
model's low quality catches; `write_rows` the per-image CSV
(`cv.IMAGE_COLUMNS` and one `hc_mm_<member>` column per member) and
`append_summary` one `cv.SUMMARY_COLUMNS` row of a summary CSV.
"""

import csv
import os
from typing import Sequence

import numpy as np

from hc_jax import log
from hc_jax import workdir as workdir_lib
from hc_jax.evaluation import cv
from hc_jax.evaluation import cv_runs

# Errors (mm) whose catching by the quality flag is tabulated.
FLAG_ERRORS_MM = (5.0, 10.0, 20.0)
DEFAULT_WORST = 10
# The flag table's threshold meaning the one stored with each fold's model
# (chosen on its validation part).
STORED = 'stored'


def flag_table(rows: Sequence[dict], thresholds: Sequence[float]
               ) -> list[dict]:
  """What flagging `quality < threshold` catches, per threshold.

  Args:
    rows: per-image rows with 'quality', 'error_mm' and 'min_quality' (the
      threshold stored with the model that predicted the row).
    thresholds: quality thresholds; `STORED` for each row's stored one.

  Returns:
    One dict per threshold: 'threshold', 'flagged' (images), 'flagged_pct',
    and for each error E of `FLAG_ERRORS_MM` 'over_<E>' (images with
    |error| > E mm) and 'caught_<E>' (of those, flagged); 'good_flagged'
    (flagged images with |error| <= the first E).
  """
  quality = np.array([row['quality'] for row in rows], np.float64)
  error = np.abs(np.array([row['error_mm'] for row in rows], np.float64))
  table = []
  stored = np.array([row.get('min_quality', np.nan) for row in rows],
                    np.float64)
  for threshold in thresholds:
    if threshold == STORED:
      flagged = quality < stored
      name = threshold
    else:
      flagged = quality < threshold
      name = float(threshold)
    entry = {'threshold': name, 'flagged': int(flagged.sum()),
             'flagged_pct': 100.0 * float(flagged.mean())}
    for limit in FLAG_ERRORS_MM:
      over = error > limit
      entry[f'over_{limit:g}'] = int(over.sum())
      entry[f'caught_{limit:g}'] = int((over & flagged).sum())
    entry['good_flagged'] = int((flagged & (error <= FLAG_ERRORS_MM[0])).sum())
    table.append(entry)
  return table


def format_flag_table(table: Sequence[dict]) -> str:
  """The flag table as Markdown."""
  head = ('| quality below | flagged | ' + ' | '.join(
      f'caught of > {e:g} mm' for e in FLAG_ERRORS_MM) +
          f' | flagged with error <= {FLAG_ERRORS_MM[0]:g} mm |')
  lines = [head, '|' + ' --- |' * (3 + len(FLAG_ERRORS_MM))]
  for entry in table:
    threshold = entry['threshold']
    cells = [f'{threshold:.3f}' if threshold != STORED else
             'stored (each fold\'s own)',
             f'{entry["flagged"]} ({entry["flagged_pct"]:.1f} %)']
    cells += [f'{entry[f"caught_{e:g}"]} / {entry[f"over_{e:g}"]}'
              for e in FLAG_ERRORS_MM]
    cells.append(str(entry['good_flagged']))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def format_report(scores: cv.Scores, name: str, worst: int = DEFAULT_WORST
                  ) -> str:
  """The summary and the table of the `worst` images, as printed."""
  lines = [
      f'{name}: {scores.num_images} images, {len(scores.folds)} fold(s), '
      f'{len(scores.members)} member(s), flip TTA '
      f'{"on" if scores.tta_flip else "off"}',
      f'  MAE {scores.mae_mm:.2f} ± {scores.mae_mm_std:.2f} mm, '
      f'{scores.mae_px:.2f} ± {scores.mae_px_std:.2f} px, '
      f'{scores.pmae:.2f} ± {scores.pmae_std:.2f} %; bias '
      f'{scores.bias_mm:+.2f} mm',
      f'  median {scores.median_mm:.2f} mm, worst {scores.worst_mm:.2f} mm '
      f'({scores.worst_file}); {scores.num_gross} prediction(s) outside '
      f'{cv.GROSS_RATIO[0]:g}x-{cv.GROSS_RATIO[1]:g}x the true HC, '
      f'{scores.num_outside_10pct} outside {cv.CLOSE_RATIO[0]:g}x-'
      f'{cv.CLOSE_RATIO[1]:g}x']
  if worst > 0:
    header = ['fold', 'filename', 'true_mm', 'pred_mm', 'error_mm',
              'pixel_mm'] + (scores.member_columns if len(scores.members) > 1
                             else [])
    table = [header]
    for row in scores.worst(worst):
      table.append([str(row['fold']), row['filename'],
                    f'{row["hc_mm_true"]:.1f}', f'{row["hc_mm_pred"]:.1f}',
                    f'{row["error_mm"]:+.1f}', f'{row["pixel_size_mm"]:.4f}']
                   + [f'{row[c]:.1f}' for c in header[6:]])
    widths = [max(len(cells[i]) for cells in table)
              for i in range(len(header))]
    lines.append(f'worst {len(table) - 1}:')
    for cells in table:
      lines.append('  ' + '  '.join(
          cell.ljust(width) if i == 1 else cell.rjust(width)
          for i, (cell, width) in enumerate(zip(cells, widths))).rstrip())
  return '\n'.join(lines)


def _fmt(value) -> object:
  return round(value, 3) if isinstance(value, float) else value


def write_rows(path: str, scores: cv.Scores) -> None:
  """Writes the per-image CSV (values rounded to 1e-3), atomically."""
  # pylint: disable-next=import-outside-toplevel
  from hc_jax.evaluation import output_files
  rows = [{key: (value if key == 'pixel_size_mm' else _fmt(value))
           for key, value in row.items()} for row in scores.rows]
  try:
    output_files.write_csv(
        path, list(cv.IMAGE_COLUMNS) + scores.member_columns, rows, '--out')
  except workdir_lib.PredictError as e:
    raise cv_runs.ScoreError(str(e)) from None


def check_summary_csv(path: str) -> None:
  """Raises cv_runs.ScoreError unless `path` can take a summary row
  (`cv.SUMMARY_COLUMNS`)."""
  if os.path.isdir(path):
    raise cv_runs.ScoreError(f'--summary_csv {path} is a directory')
  if os.path.isfile(path) and os.path.getsize(path):
    try:
      with open(path, newline='', encoding='utf-8') as f:
        header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
      raise cv_runs.ScoreError(f'--summary_csv {path} cannot be read '
                               f'({log.error_line(e)})') from None
    if tuple(header) not in (cv.SUMMARY_COLUMNS, cv.OLD_SUMMARY_COLUMNS):
      raise cv_runs.ScoreError(
          f'--summary_csv {path} has other columns than '
          f'{",".join(cv.SUMMARY_COLUMNS)}')
  elif not os.path.isdir(os.path.dirname(os.path.abspath(path))):
    raise cv_runs.ScoreError(
        f'--summary_csv {path}: its directory does not exist')


def append_summary(path: str, row: dict) -> None:
  """Appends one `cv.SUMMARY_COLUMNS` row (and the header to a new file)."""
  check_summary_csv(path)
  new = not os.path.isfile(path) or not os.path.getsize(path)
  columns = cv.SUMMARY_COLUMNS
  if not new:
    with open(path, newline='', encoding='utf-8') as f:
      columns = tuple(next(csv.reader(f), cv.SUMMARY_COLUMNS))
  try:
    with open(path, 'a', newline='', encoding='utf-8') as f:
      writer = csv.DictWriter(f, fieldnames=columns)
      if new:
        writer.writeheader()
      writer.writerow({key: _fmt(row[key]) for key in columns})
  except OSError as e:
    raise cv_runs.ScoreError(f'--summary_csv {path} cannot be written '
                             f'({e.strerror or e})') from None
