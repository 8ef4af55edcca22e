"""Figures of a run or of a cross-validation grid (matplotlib, written as PNG).

  python -m hc_jax.plots --root=runs/grid --out=docs/figures \
      [--hc18_dir=DIR] [--config=cnn263k_mse|all]

For a grid root (ROOT/<config>/fold<k>/) the figures are of the best
configuration (lowest pooled MAE in mm, as `hc_jax.grid` picks it), of the one
named by --config, or of each with --config=all; a single finished run works
too. Per configuration, with the test folds pooled:

  <label>_scatter.png          predicted vs true HC (mm), identity line
  <label>_bland_altman.png     difference vs mean, bias and 95 % limits
  <label>_error_by_trimester.png  absolute error (mm) by trimester, box plots
  <label>_learning_curves.png  train loss and validation MAE (mm) per fold
  <label>_worst_cases.png      the scans with the largest errors (when the
                               images can be found)

Trimesters are of the gestational age that Hadlock's formula gives for the
TRUE HC (1st < 14 weeks, 2nd 14 to 28, 3rd >= 28). The figures themselves are
`hc_jax.evaluation.figures`; this module picks the runs and writes them all.
"""

import os
import sys
from typing import Sequence

from hc_jax import workdir as workdir_lib
from hc_jax.evaluation import cv_table
from hc_jax.evaluation import figures


def configurations(root: str, config: str | None = None
                   ) -> list[tuple[str, list[str]]]:
  """(label, finished fold workdirs) of what to plot under `root`.

  Args:
    root: a finished run, a ROOT/<config> directory of folds, or a grid.
    config: for a grid, a config name, 'all', or None for the best one.

  Raises:
    ValueError: when there is nothing finished to plot.
  """
  label = os.path.basename(os.path.normpath(root))
  if cv_table.finished(root):
    return [(label, [root])]
  if not os.path.isdir(root):
    raise ValueError(f'{root} does not exist')
  if workdir_lib.fold_dirs(root):
    done = [
        w for w in workdir_lib.fold_dirs(root).values()
        if cv_table.finished(w)
    ]
    if not done:
      raise ValueError(f'{root} has no finished fold runs')
    return [(label, done)]
  rows = [row for row in cv_table.grid_rows(root) if row['num_images']]
  if config not in (None, 'all'):
    rows = [row for row in rows if row['config'] == config]
    if not rows:
      raise ValueError(f'{root} has no finished runs of config {config!r}')
  elif config is None:
    rows = [row for row in rows if row['best']]
  if not rows:
    raise ValueError(f'{root} has no finished runs')
  return [(row['config'], [os.path.join(root, row['config'], f'fold{k}')
                           for k in row['folds']]) for row in rows]


def plot_all(root: str, out: str, hc18_dir: str | None = None,
             config: str | None = None) -> list[str]:
  """Writes every figure of the runs under `root` into `out`.

  Args:
    root: a run, a config directory of folds, or a grid (see `configurations`).
    out: directory for the PNGs.
    hc18_dir: where the scans are, for the worst cases (optional).
    config: for a grid, which configuration (None: the best; 'all').

  Returns:
    The paths written.
  """
  paths = []
  for label, workdirs in configurations(root, config):
    predictions = cv_table.pool_predictions(workdirs)
    title = f'{label} ({len(workdirs)} fold(s))'
    stem = os.path.join(out, label)
    paths.append(figures.scatter_hc(predictions, f'{stem}_scatter.png',
                                    title))
    paths.append(figures.bland_altman(predictions,
                                      f'{stem}_bland_altman.png', title))
    paths.append(figures.error_by_trimester(
        predictions, f'{stem}_error_by_trimester.png', title))
    if any(figures.read_metrics(w) for w in workdirs):
      paths.append(figures.learning_curves(
          workdirs, f'{stem}_learning_curves.png', title))
    worst = figures.worst_cases(predictions, f'{stem}_worst_cases.png',
                                hc18_dir, title=title)
    if worst:
      paths.append(worst)
    else:
      print(f'{label}: no scans found, worst cases skipped (pass --hc18_dir)')
  return paths


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (default: sys.argv[1:]); returns the exit status.

  0 when the figures were written; 2, after one line on stderr, for a bad
  command line or a root that holds no finished run.
  """
  from hc_jax import cli  # pylint: disable=import-outside-toplevel
  cli.quiet_logs(tensorflow=False)
  parser = cli.ArgumentParser(prog='python -m hc_jax.plots',
                              description=__doc__.splitlines()[0])
  parser.add_argument('--root', required=True,
                      help='A grid directory, or one run.')
  parser.add_argument('--out', required=True, help='Directory for the PNGs.')
  parser.add_argument('--hc18_dir', default=None,
                      help='HC18 directory with the scans (worst cases).')
  parser.add_argument('--config', default=None,
                      help="A grid's config to plot, or 'all' (default: best).")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)

  def run():
    for path in plot_all(args.root, args.out, args.hc18_dir, args.config):
      print(path)
    return 0

  return cli.run_main(run)


if __name__ == '__main__':
  sys.exit(main())
