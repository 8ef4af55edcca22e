"""The label-only dense model's loss table from the per-image predictions kept
here: pooled test MAE per loss, and paired two-sided Wilcoxon signed-rank
tests (absolute errors in mm, paired by scan) between the losses and against
the shipped hcnet_mask's fold models on the same scans.

  python docs/measured/compare_losses.py

Reads docs/measured/hcnet_mask_label_<loss>/fold<k>/predictions_test.csv (as
`python -m hc_jax.main` writes them) and
docs/measured/hcnet_mask/test_folds_shipped.csv (`python -m hc_jax.cv_score
--runs=hc_jax/shipped/hcnet_mask.npz --out=...`).
"""

import csv
import glob
import os

import numpy as np
from scipy import stats

HERE = os.path.dirname(os.path.abspath(__file__))
LOSSES = ('mae', 'mse', 'huber')


def _errors(paths):
  """{filename: (fold, |error| mm)} of prediction CSVs."""
  out = {}
  for path in paths:
    fold = int(os.path.basename(os.path.dirname(path))[len('fold'):]) if (
        'fold' in os.path.basename(os.path.dirname(path))) else None
    with open(path, newline='') as f:
      for row in csv.DictReader(f):
        error = (float(row['error_mm']) if 'error_mm' in row else
                 float(row['hc_mm_pred']) - float(row['hc_mm_true']))
        out[row['filename']] = (int(row.get('fold', fold)), abs(error))
  return out


def main():
  models = {f'hcnet_mask_label, {loss}': _errors(sorted(glob.glob(
      os.path.join(HERE, f'hcnet_mask_label_{loss}', 'fold*',
                   'predictions_test.csv')))) for loss in LOSSES}
  models['hcnet_mask (shipped fold models)'] = _errors(
      [os.path.join(HERE, 'hcnet_mask', 'test_folds_shipped.csv')])
  print('| model | folds | images | MAE mm | median mm | errors > 10 mm | '
        'per fold |')
  print('| --- | --- | --- | --- | --- | --- | --- |')
  for name, errors in models.items():
    if not errors:
      continue
    e = np.array([v for _, v in errors.values()])
    folds = sorted({k for k, _ in errors.values()})
    per_fold = ', '.join(
        f'{np.mean([v for k, v in errors.values() if k == fold]):.2f}'
        for fold in folds)
    print(f'| {name} | {" ".join(map(str, folds))} | {len(e)} | '
          f'{e.mean():.2f} ± {e.std():.2f} | {np.median(e):.2f} | '
          f'{int((e > 10).sum())} | {per_fold} |')
  print()
  print('| pair | scans (folds) | MAE mm | Wilcoxon p |')
  print('| --- | --- | --- | --- |')
  names = [n for n, e in models.items() if e]
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      shared = sorted(set(models[a]) & set(models[b]))
      if len(shared) < 10:
        continue
      x = np.array([models[a][f][1] for f in shared])
      y = np.array([models[b][f][1] for f in shared])
      folds = ' '.join(map(str, sorted({models[a][f][0] for f in shared})))
      p = stats.wilcoxon(x, y).pvalue
      print(f'| {a} vs {b} | {len(shared)} ({folds}) | {x.mean():.2f} vs '
            f'{y.mean():.2f} | {p:.2g} |')


if __name__ == '__main__':
  main()
