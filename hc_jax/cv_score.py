"""Cross-validation scores of trained runs, alone or as a per-fold ensemble.

  python -m hc_jax.cv_score --runs=runs/grid/hcnet_label \
      [--runs=runs/grid/hcnet_ellipse ...] [--tta_flip] [--name=NAME] \
      [--out=per_image.csv] [--worst=10] [--summary_csv=FILE] [--hc18_dir=DIR]

Each entry of `--runs` (comma-separated or repeated) is one member of the
ensemble: a run directory (it holds config.json), a directory of fold runs
`fold<k>/` as `hc_jax.grid` writes them, or a shipped model's archive
(`--runs=hc_jax/shipped/hcnet_mask.npz`); `hc_jax.evaluation.cv_runs` says
how members are found and checked (same folds, one fold assignment), and
`hc_jax.evaluation.cv` how they are scored, from the original PNGs of
HC18's training_set/ (`--hc18_dir`; by default the runs' own copy, checked
to be the one they trained on). With `--tta_flip` each run's prediction is
the mean over the scan and its left-right mirror.

It prints one line per fold (images, MAE in mm), the errors pooled over every
scored image (MAE in mm, px and per cent, each ± SD; the median and worst
error in mm; how many predictions are below half or above 1.5 times the true
HC), and the worst images with each member's own prediction. `--out` writes
one row per image (`cv.IMAGE_COLUMNS` and one `hc_mm_<member>` column per
member), `--summary_csv` appends one row (`cv.SUMMARY_COLUMNS`). Bad input
(no runs, unfinished runs, members with other folds or fold assignments, a
missing image) is a one-line `error:` and exit status 2. Runs trained with
`score_test=False` (their test fold kept unseen while settings are chosen on
validation) are refused unless `--unseen_test_ok`.
"""

import argparse
import sys
from typing import Sequence

from hc_jax import cli
from hc_jax.evaluation import cv
from hc_jax.evaluation import cv_report
from hc_jax.evaluation import cv_runs

def _parse_args(argv) -> argparse.Namespace:
  parser = cli.ArgumentParser(
      prog='python -m hc_jax.cv_score',
      description='Score trained fold runs on their own test folds, alone or '
      'as an ensemble of runs trained on the same folds.')
  parser.add_argument('--runs', action='append', required=True,
                      help='members, comma-separated or repeated: each a run '
                      'directory or a directory of fold<k>/ runs')
  parser.add_argument('--tta_flip', '--tta-flip', dest='tta_flip',
                      action='store_true',
                      help='average each run over the scan and its mirror')
  parser.add_argument('--name', help='name of this scoring (default: the '
                      'members\' names joined by +, and +flip)')
  parser.add_argument('--out', help='per-image CSV to write')
  parser.add_argument('--worst', type=int, default=cv_report.DEFAULT_WORST,
                      help=f'images to list, largest error first (default '
                      f'{cv_report.DEFAULT_WORST})')
  parser.add_argument('--summary_csv', '--summary-csv', dest='summary_csv',
                      help='CSV to append one summary row to')
  parser.add_argument('--hc18_dir', '--hc18-dir', dest='hc18_dir',
                      help='HC18 directory (default: the runs\' own)')
  parser.add_argument('--shifted_copy', '--shifted-copy', action='store_true',
                      help='--hc18_dir is a shifted copy of the runs\' HC18 '
                      '(python -m hc_jax.shifted: the same names, HC values '
                      'and folds), not the copy they trained on')
  parser.add_argument('--unseen_test_ok', '--unseen-test-ok',
                      dest='unseen_test_ok', action='store_true',
                      help='also score runs trained with score_test=False '
                      '(their test fold kept unseen during tuning)')
  parser.add_argument('--part', choices=cv.PARTS, default='test',
                      help='score each fold\'s test images (default) or its '
                      'validation part, carved from its training folds, for '
                      'choosing settings')
  parser.add_argument('--moments', choices=('plain', 'window'),
                      help='mask models: the moment pass to use, if not the '
                      'one trained with (no parameter depends on it)')
  parser.add_argument('--window_radius', '--window-radius',
                      dest='window_radius', type=float,
                      help='mask models: the window\'s normalised radius of '
                      'moments=window, if not the one trained with')
  parser.add_argument('--quality_thresholds', '--quality-thresholds',
                      dest='quality_thresholds',
                      help='models with a quality signal: comma-separated '
                      'quality thresholds to print the flag table for (what '
                      'flagging quality below each catches); "stored": each '
                      'fold\'s model\'s own, chosen on its validation part')
  args = parser.parse_args(argv)
  try:
    args.quality_thresholds = [
        x.strip() if x.strip() == cv_report.STORED else float(x)
        for x in (args.quality_thresholds or '').split(',') if x.strip()]
  except ValueError:
    parser.error(f'--quality_thresholds must be numbers or '
                 f'{cv_report.STORED!r}, got {args.quality_thresholds!r}')
  args.runs = [root.strip() for spec in args.runs for root in spec.split(',')
               if root.strip()]
  if not args.runs:
    parser.error('--runs names no runs')
  if args.worst < 0:
    parser.error(f'--worst must be >= 0, got {args.worst}')
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (0, or 2 for bad input)."""
  args = _parse_args(argv)
  return cli.run_main(lambda: _score(args))


def _score(args: argparse.Namespace) -> None:
  """Scores, prints and writes what `args` ask for."""
  # pylint: disable=import-outside-toplevel
  from hc_jax.evaluation import output_files
  # Fails fast, before TensorFlow is imported.
  cv_runs.check_members(args.runs, args.unseen_test_ok or args.part == 'val',
                        args.hc18_dir)
  if args.out:
    output_files.check_writable(args.out, '--out')
  if args.summary_csv:
    cv_report.check_summary_csv(args.summary_csv)
  cli.quiet_logs()
  options = {k: v for k, v in (('moments', args.moments),
                               ('window_radius', args.window_radius))
             if v is not None}
  scores = cv.score(args.runs, tta_flip=args.tta_flip,
                    hc18_dir=args.hc18_dir,
                    progress=lambda line: print(line, flush=True),
                    unseen_test_ok=args.unseen_test_ok, part=args.part,
                    model_options=options or None,
                    shifted_copy=args.shifted_copy)
  name = args.name or '+'.join(scores.members) + (
      '+flip' if args.tta_flip else '') + ''.join(
          f'+{k}={v}' for k, v in options.items()) + (
              '+val' if args.part == 'val' else '')
  print(cv_report.format_report(scores, name, args.worst))
  if args.quality_thresholds:
    print(cv_report.format_flag_table(cv_report.flag_table(
        scores.rows, args.quality_thresholds)))
  if args.out:
    cv_report.write_rows(args.out, scores)
    print(f'wrote {args.out}')
  if args.summary_csv:
    cv_report.append_summary(args.summary_csv, scores.summary_row(name))
    print(f'appended to {args.summary_csv}')


if __name__ == '__main__':
  sys.exit(main())
