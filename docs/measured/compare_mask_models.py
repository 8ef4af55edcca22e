"""hcnet_mask with and without the boundary refinement on the five test folds,
from the per-image predictions kept here: pooled MAE, per fold, by pixel
size, the tail, the worst 10, and a paired two-sided Wilcoxon signed-rank
test (absolute errors in mm, paired by scan).

  python docs/measured/compare_mask_models.py

Reads docs/measured/hcnet_mask/test_folds_shipped.csv (`python -m
hc_jax.cv_score --runs=hc_jax/shipped/hcnet_mask.npz --out=...`) and
docs/measured/hcnet_mask_refine/test_folds.csv (`python -m hc_jax.cv_score
--runs=runs/mask_levers/hcnet_mask_refine --out=...`).
"""

import csv
import os

import numpy as np
from scipy import stats

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {'hcnet_mask': 'hcnet_mask/test_folds_shipped.csv',
          'hcnet_mask_refine': 'hcnet_mask_refine/test_folds.csv'}
PIXEL_BINS = ((0.0, 0.10, '< 0.10'), (0.10, 0.15, '0.10–0.15'),
              (0.15, 0.20, '0.15–0.20'), (0.20, 0.25, '0.20–0.25'),
              (0.25, 1.0, '≥ 0.25'))


def _rows(path):
  with open(os.path.join(HERE, path), newline='') as f:
    return {row['filename']: row for row in csv.DictReader(f)}


def _summary(name, rows, names):
  error = np.array([float(rows[n]['error_mm']) for n in names])
  true = np.array([float(rows[n]['hc_mm_true']) for n in names])
  pred = np.array([float(rows[n]['hc_mm_pred']) for n in names])
  ratio = pred / true
  px = np.array([float(rows[n]['pixel_size_mm']) for n in names])
  print(f'{name}: {len(names)} images, MAE {np.abs(error).mean():.2f} ± '
        f'{np.abs(error).std():.2f} mm, median {np.median(np.abs(error)):.2f}, '
        f'bias {error.mean():+.2f}; > 5 mm: {(np.abs(error) > 5).sum()}; '
        f'outside 0.9-1.1x: {((ratio < 0.9) | (ratio > 1.1)).sum()}; '
        f'at >= 0.2 mm/px: {np.abs(error[px >= 0.2]).mean():.2f} mm; '
        f'every error capped at 5 mm: {np.minimum(np.abs(error), 5).mean():.2f}')
  folds = np.array([int(rows[n]['fold']) for n in names])
  print('  per fold: ' + ', '.join(
      f'{k}: {np.abs(error[folds == k]).mean():.2f}' for k in range(5)))
  return np.abs(error)


def main():
  models = {name: _rows(path) for name, path in MODELS.items()}
  names = sorted(set.intersection(*(set(rows) for rows in models.values())))
  errors = {name: _summary(name, rows, names) for name, rows in models.items()}
  a, b = errors.values()
  print(f'paired Wilcoxon on {len(names)} scans: p = '
        f'{stats.wilcoxon(a, b).pvalue:.2g}')
  base = models['hcnet_mask']
  px = np.array([float(base[n]['pixel_size_mm']) for n in names])
  hc = np.array([float(base[n]['hc_mm_true']) for n in names])
  print('\n| pixel size (mm) | images | mean HC (mm) | ' +
        ' | '.join(f'{name} MAE (mm)' for name in models) + ' |')
  print('| --- | --- | --- | ' + ' | '.join('---' for _ in models) + ' |')
  for low, high, label in PIXEL_BINS:
    keep = (px >= low) & (px < high)
    print(f'| {label} | {keep.sum()} | {hc[keep].mean():.0f} | ' + ' | '.join(
        f'{e[keep].mean():.2f}' for e in errors.values()) + ' |')
  name = 'hcnet_mask_refine'
  rows = models[name]
  worst = sorted(names, key=lambda n: -errors[name][names.index(n)])[:10]
  print(f'\nworst 10 of {name}:\n| fold | file | true (mm) | predicted (mm) | '
        'error (mm) | quality | hcnet_mask error (mm) |\n| --- | --- | --- | '
        '--- | --- | --- | --- |')
  for n in worst:
    row = rows[n]
    print(f'| {row["fold"]} | {n} | {float(row["hc_mm_true"]):.1f} | '
          f'{float(row["hc_mm_pred"]):.1f} | {float(row["error_mm"]):+.1f} | '
          f'{float(row["quality"]):.3f} | {float(base[n]["error_mm"]):+.1f} |')


if __name__ == '__main__':
  main()
