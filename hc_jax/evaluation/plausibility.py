"""How well predict's statuses single out bad predictions, on CV test folds.

  python -m hc_jax.plausibility --root=runs/grid [--hc18_dir=DIR]

For every finished `ROOT/<config>/fold<k>` run, the run's own predictor
(`hc_jax.evaluation.loading.load`, exactly what `python -m hc_jax.predict`
uses) is applied to the scans of its test fold, read from the HC18 copy, and each
prediction's status ('ok', 'implausible', 'refused') is set beside its error
against the reference HC. Per configuration the table counts, for errors
above 5, 10 and 20 mm, how many predictions there are and how many a status
other than 'ok' caught, and how many good predictions (error <= 5 mm) were
flagged. Each fold's run has never seen its test fold, so the statuses are
judged on unseen scans. The ensemble status 'uncertain' needs several models
that have not seen the scan (e.g. seeds of one fold), which a 5-fold grid
does not have; it is not measured here.
"""

import os
from typing import Any, Sequence

import numpy as np

from hc_jax import workdir as workdir_lib
from hc_jax.data import hc18
from hc_jax.evaluation import cv_table

THRESHOLDS_MM = (5.0, 10.0, 20.0)


def fold_statuses(run: str, images_dir: str) -> dict[str, np.ndarray]:
  """The predictor's statuses and errors on one run's test fold."""
  from hc_jax.evaluation import loading  # pylint: disable=import-outside-toplevel
  predictions = cv_table.read_predictions(
      os.path.join(run, workdir_lib.PREDICTIONS_FILE))
  predictor = loading.load(run)
  images = []
  for name in predictions['filename']:
    image, problem = hc18.read_grayscale(os.path.join(images_dir, name))
    if problem:
      raise ValueError(f'{name}: {problem}')
    images.append(image)
  out = predictor(images, list(predictions['pixel_size_mm']))
  true_mm = predictions['hc_px_true'] * predictions['pixel_size_mm']
  return {'filename': predictions['filename'], 'status': out['status'],
          'error_mm': np.abs(out['hc_mm'] - true_mm),
          'csv_error_mm': cv_table.absolute_errors_mm(predictions)}


def config_row(config_dir: str, images_dir: str) -> dict[str, Any]:
  """Counts of caught bad and flagged good predictions over a config's folds."""
  folds = [fold_statuses(run, images_dir) for _, run in sorted(
      workdir_lib.fold_dirs(config_dir).items()) if cv_table.finished(run)]
  if not folds:
    return {'config': os.path.basename(config_dir), 'num_images': 0}
  status = np.concatenate([f['status'] for f in folds])
  # Refused images have no prediction: they count with the flagged ones,
  # and their error is the one the training run's own CSV records.
  error = np.concatenate([np.where(np.isnan(f['error_mm']), f['csv_error_mm'],
                                   f['error_mm']) for f in folds])
  flagged = status != 'ok'
  row = {'config': os.path.basename(config_dir), 'num_folds': len(folds),
         'num_images': int(len(status)),
         'statuses': {s: int(n) for s, n in zip(*np.unique(
             status, return_counts=True))}}
  for threshold in THRESHOLDS_MM:
    bad = error > threshold
    row[f'over_{threshold:g}'] = int(bad.sum())
    row[f'caught_{threshold:g}'] = int((bad & flagged).sum())
  good = error <= THRESHOLDS_MM[0]
  row['good'] = int(good.sum())
  row['good_flagged'] = int((good & flagged).sum())
  row['worst_ok_mm'] = float(error[~flagged].max()) if (~flagged).any() else (
      float('nan'))
  return row


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
  header = ['config', 'folds', 'images'] + [
      f'> {t:g} mm: caught' for t in THRESHOLDS_MM] + [
          'good (<= 5 mm) flagged', 'worst error still ok (mm)', 'statuses']
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(header)]
  for row in rows:
    if not row['num_images']:
      continue
    cells = [row['config'], str(row['num_folds']), str(row['num_images'])]
    cells += [f'{row[f"caught_{t:g}"]} / {row[f"over_{t:g}"]}'
              for t in THRESHOLDS_MM]
    cells += [f'{row["good_flagged"]} / {row["good"]}',
              f'{row["worst_ok_mm"]:.1f}',
              ', '.join(f'{k} {v}' for k, v in sorted(row['statuses'].items()))]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
