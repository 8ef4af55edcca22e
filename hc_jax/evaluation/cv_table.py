"""The cross-validation tables' rows: test errors pooled over the folds.

`pooled_errors` is what every cross-validation row reports of a set of
per-image predictions pooled over test folds (never a mean of fold means):
`metrics.hc_errors`, the median and the worst absolute error in mm. It makes
the rows of the grid's table here and the scores of `hc_jax.evaluation.cv`
(`python -m hc_jax.cv_score`).

The grid's table: `grid_rows(root)` reads every `ROOT/<config>/fold<k>/` run
(as `hc_jax.grid` and `hc_jax.training.train` leave them) and makes one row
per configuration: MAE in px, percentage MAE and MAE in mm, each mean ± SD
over every image of the test folds pooled, the median and worst absolute
error in mm, the folds and images present (rows short of `num_folds` folds are
flagged), and a two-sided paired Wilcoxon signed-rank test of the best
configuration (lowest pooled MAE in mm; complete rows are preferred) against
each other one, on per-image absolute errors in mm paired by filename.
`write_tables` writes it as ROOT/results.md and ROOT/results.csv.
"""

import csv
import json
import math
import os
import warnings
from typing import Any, Sequence

import numpy as np
from scipy import stats

from hc_jax import metrics
from hc_jax import workdir as workdir_lib

TABLE_COLUMNS = ('config', 'model', 'loss', 'folds', 'num_folds',
                 'num_folds_expected', 'num_images', 'mae_px', 'mae_px_std',
                 'pmae', 'pmae_std', 'mae_mm', 'mae_mm_std', 'median_mm',
                 'worst_mm', 'worst_file', 'bias_mm', 'best',
                 'wilcoxon_num_pairs', 'wilcoxon_p', 'complete')


def read_predictions(path: str) -> dict[str, np.ndarray]:
  """Reads a predictions_test.csv into columns (str or float64 arrays)."""
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  missing = [c for c in metrics.PREDICTION_COLUMNS if rows and c not in rows[0]]
  if missing:
    raise ValueError(f'{path} lacks the column(s) {", ".join(missing)}')
  columns = {}
  for name in metrics.PREDICTION_COLUMNS:
    values = [row[name] for row in rows]
    columns[name] = (np.array(values, dtype=str) if name == 'filename'
                     else np.array(values, dtype=np.float64))
  return columns


def finished(workdir: str) -> bool:
  return all(
      os.path.isfile(os.path.join(workdir, name))
      for name in (workdir_lib.RESULTS_FILE, workdir_lib.PREDICTIONS_FILE))


def pool_predictions(workdirs: Sequence[str]) -> dict[str, np.ndarray]:
  """The test predictions of several finished runs, one row per image.

  Args:
    workdirs: runs of one configuration on different test folds.

  Returns:
    The columns of predictions_test.csv concatenated, plus 'workdir'.

  Raises:
    ValueError: when an image is in the test fold of two runs (the runs then
      do not share one fold assignment and must not be pooled).
  """
  parts = []
  for workdir in workdirs:
    part = read_predictions(os.path.join(workdir, workdir_lib.PREDICTIONS_FILE))
    part['workdir'] = np.full(len(part['filename']), workdir, dtype=object)
    parts.append(part)
  names = list(metrics.PREDICTION_COLUMNS) + ['workdir']
  pooled = {name: np.concatenate([part[name] for part in parts])
            if parts else np.array([]) for name in names}
  unique, counts = np.unique(pooled['filename'], return_counts=True)
  if (counts > 1).any():
    raise ValueError(f'{", ".join(unique[counts > 1][:5])} in the test fold of '
                     f'more than one of {", ".join(workdirs)}')
  return pooled


def absolute_errors_mm(predictions: dict[str, np.ndarray]) -> np.ndarray:
  """Per-image |predicted - true| HC in mm, as in `metrics.hc_errors`."""
  return np.abs(predictions['hc_px_pred'] - predictions['hc_px_true']
                ) * predictions['pixel_size_mm']


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def pooled_errors(hc_px_true, hc_px_pred, pixel_size_mm, filenames
                  ) -> dict[str, Any]:
  """The errors of per-image predictions pooled over folds.

  Args:
    hc_px_true, hc_px_pred: reference and predicted HC in px, [N] (N > 0).
    pixel_size_mm: each image's pixel size, [N].
    filenames: each image's name, [N].

  Returns:
    `metrics.hc_errors` plus 'median_mm' and 'worst_mm' (the median and the
    largest absolute error in mm) and 'worst_file' (the image of the latter).
  """
  hc_px_true = np.asarray(hc_px_true, np.float64)
  hc_px_pred = np.asarray(hc_px_pred, np.float64)
  pixel_size_mm = np.asarray(pixel_size_mm, np.float64)
  errors = metrics.hc_errors(hc_px_true, hc_px_pred, pixel_size_mm)
  errors_mm = np.abs(hc_px_pred - hc_px_true) * pixel_size_mm
  worst = int(np.argmax(errors_mm))
  errors.update(median_mm=float(np.median(errors_mm)),
                worst_mm=float(errors_mm[worst]),
                worst_file=str(filenames[worst]))
  return errors


def config_dirs(root: str) -> list[str]:
  """The configurations of a grid directory: its subdirectories holding fold
  runs (`ROOT/<config>/fold<k>`), sorted."""
  return [os.path.join(root, name) for name in sorted(os.listdir(root))
          if os.path.isdir(os.path.join(root, name))
          and workdir_lib.fold_dirs(os.path.join(root, name))]


def summarise_config(config_dir: str) -> tuple[dict[str, Any], dict]:
  """One row of the table (without the test) and the pooled predictions."""
  workdirs = workdir_lib.fold_dirs(config_dir)
  done = {fold: w for fold, w in workdirs.items() if finished(w)}
  info = {}  # model, loss, num_folds: the same in every run of the config.
  for workdir in workdirs.values():
    for name in (workdir_lib.CONFIG_FILE, workdir_lib.RESULTS_FILE):
      if os.path.isfile(os.path.join(workdir, name)):
        info.update(_read_json(os.path.join(workdir, name)))
  row = {'config': os.path.basename(config_dir),
         'model': info.get('model', '?'), 'loss': info.get('loss', '?'),
         'folds': sorted(done), 'num_folds': len(done),
         'num_folds_expected': int(info.get('num_folds', 5)),
         'best': False, 'wilcoxon_num_pairs': 0, 'wilcoxon_p': math.nan}
  pooled = pool_predictions(list(done.values()))
  if len(pooled['filename']):
    row.update(pooled_errors(pooled['hc_px_true'], pooled['hc_px_pred'],
                             pooled['pixel_size_mm'], pooled['filename']))
  else:
    row.update(dict.fromkeys(('mae_px', 'mae_px_std', 'mae_mm', 'mae_mm_std',
                              'pmae', 'pmae_std', 'bias_mm', 'median_mm',
                              'worst_mm'), math.nan), worst_file='',
               num_images=0)
  row['complete'] = row['num_folds'] >= row['num_folds_expected']
  # Runs that a time budget stopped before their planned epochs.
  epochs = [
      _read_json(os.path.join(w, workdir_lib.RESULTS_FILE))
      for w in done.values()
  ]
  row['cut_folds'] = sorted(
      fold for fold, r in zip(done, epochs)
      if r.get('num_epochs', 0) < r.get('planned_epochs', 0))
  return row, pooled


def paired_wilcoxon(best: dict[str, np.ndarray], other: dict[str, np.ndarray]
                    ) -> tuple[int, float]:
  """Wilcoxon signed-rank test on absolute errors (mm) of shared images.

  Args:
    best, other: pooled predictions of two configurations.

  Returns:
    (number of images in both, two-sided p-value; NaN without shared images).
  """
  best_errors = dict(zip(best['filename'], absolute_errors_mm(best)))
  other_errors = dict(zip(other['filename'], absolute_errors_mm(other)))
  shared = sorted(set(best_errors) & set(other_errors))
  if not shared:
    return 0, math.nan
  with warnings.catch_warnings():  # scipy warns when every difference is 0.
    warnings.simplefilter('ignore', RuntimeWarning)
    result = stats.wilcoxon([best_errors[f] for f in shared],
                            [other_errors[f] for f in shared])
  return len(shared), float(result.pvalue)


def grid_rows(root: str) -> list[dict[str, Any]]:
  """The table's rows for every configuration under ROOT, best one marked.

  Args:
    root: a grid directory (ROOT/<config stem>/fold<k>/ runs).

  Returns:
    Rows sorted by model, loss and config name, with the keys of
    `TABLE_COLUMNS` (plus 'folds').

  Raises:
    ValueError: when ROOT holds no fold<k> runs.
  """
  if not os.path.isdir(root):
    raise ValueError(f'grid root {root!r} does not exist')
  configs = config_dirs(root)
  if not configs:
    raise ValueError(f'{root} holds no <config>/fold<k> runs')
  rows, pooled = [], {}
  for config_dir in configs:
    row, predictions = summarise_config(config_dir)
    rows.append(row)
    pooled[row['config']] = predictions
  scored = [row for row in rows if row['num_images']]
  candidates = [row for row in scored if row['complete']] or scored
  if candidates:
    best = min(candidates, key=lambda row: row['mae_mm'])
    best['best'] = True
    for row in scored:
      if row is not best:
        row['wilcoxon_num_pairs'], row['wilcoxon_p'] = paired_wilcoxon(
            pooled[best['config']], pooled[row['config']])
  rows.sort(key=lambda row: (row['model'], row['loss'], row['config']))
  return rows


def _mean_sd(row: dict[str, Any], key: str) -> str:
  if not row['num_images']:
    return '–'
  return f'{row[key]:.2f} ± {row[key + "_std"]:.2f}'


def _p_value(row: dict[str, Any]) -> str:
  if row['best']:
    return 'best'
  if math.isnan(row['wilcoxon_p']):
    return '–'
  p_text = '< 0.001' if row['wilcoxon_p'] < 1e-3 else f'{row["wilcoxon_p"]:.3f}'
  if row['wilcoxon_num_pairs'] < row['num_images']:
    p_text += f' (n={row["wilcoxon_num_pairs"]})'
  return p_text


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
  """The table in markdown, with a note on what its numbers are."""
  lines = ['| Config | Model | Loss | Folds | Images | MAE (px) | PMAE (%) | '
           'MAE (mm) | median (mm) | worst (mm) | Wilcoxon p vs best | Note |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for row in rows:
    notes = [] if row['complete'] else [
        f'incomplete: {row["num_folds"]}/{row["num_folds_expected"]} folds']
    if row.get('cut_folds'):
      notes.append('fewer epochs than planned (time budget) in folds '
                   + ' '.join(str(k) for k in row['cut_folds']))
    note = '; '.join(notes)
    lines.append(
        f'| {row["config"]} | {row["model"]} | {row["loss"]} | '
        f'{row["num_folds"]}/{row["num_folds_expected"]} | {row["num_images"]} '
        f'| {_mean_sd(row, "mae_px")} | {_mean_sd(row, "pmae")} | '
        f'{_mean_sd(row, "mae_mm")} | {row["median_mm"]:.2f} | '
        f'{row["worst_mm"]:.2f} | {_p_value(row)} | {note} |')
  lines += ['', 'Mean ± SD over every image of the test folds pooled. p: '
            'two-sided paired Wilcoxon signed-rank test of the per-image '
            'absolute errors (mm) against the best configuration (lowest '
            'pooled MAE in mm among complete rows), on the images both have.']
  return '\n'.join(lines) + '\n'


def write_tables(rows: Sequence[dict[str, Any]], root: str) -> tuple[str, str]:
  """Writes ROOT/results.md and ROOT/results.csv; returns their paths."""
  md_path = os.path.join(root, 'results.md')
  csv_path = os.path.join(root, 'results.csv')
  with open(md_path, 'w') as f:
    f.write(format_markdown(rows))
  with open(csv_path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, extrasaction='ignore')
    writer.writeheader()
    for row in rows:
      writer.writerow({**row, 'folds': ' '.join(str(k) for k in row['folds'])})
  return md_path, csv_path
