"""Cross-validation grid: configs × folds, one run after another, then a table.

  python -m hc_jax.grid --configs=configs/cnn263k_mse.py,configs/cnn263k_mae.py \
      --folds=0,1,2,3,4 --root=runs/grid [--config.num_epochs=100 ...]
  python -m hc_jax.grid --root=runs/grid --aggregate_only

Each run is `train.train_and_evaluate(config, ROOT/<config stem>/fold<k>)` in
this process. `--config.KEY=VALUE` (as for `hc_jax.main`) changes a field
of every config; a misspelt field is an error.
Running the command again skips finished runs and resumes unfinished ones,
under `hc_jax.main`'s rule (`config_check.check_resume`): a rerun may change
only the fields that do not change what is trained (more epochs extend a
finished run); a workdir that was run with a different config is an error,
not a silent mix.

The table is the paper's: for each configuration, MAE in px, percentage MAE
and MAE in mm, each mean ± SD over every image of the test folds pooled (not a
mean of fold means), the folds and images present (rows short of
`num_folds` folds are flagged), and a two-sided paired Wilcoxon signed-rank
test of the best configuration (lowest pooled MAE in mm; complete rows are
preferred) against each other one, on per-image absolute errors in mm paired
by filename. It is printed and written to ROOT/results.md and ROOT/results.csv.
"""

import argparse
import json
import os
import sys
from typing import Any, Sequence

from hc_jax import workdir as workdir_lib
from hc_jax.evaluation import cv_table


def load_config(path: str, overrides: Sequence[str] = ()):
  """Loads a config file as `hc_jax.main` does, with `KEY=VALUE` overrides.

  Args:
    path: a config file with `get_config()` (e.g. configs/resnet_huber.py).
    overrides: e.g. ('num_epochs=10', 'data.hc18_dir=/data/hc18'); values are
      parsed by the field's type, as `--config.KEY=VALUE` flags are.

  Returns:
    The locked ml_collections.ConfigDict.

  Raises:
    cli.UsageError: (a ValueError) for a missing file or a bad override, in
      one line.
  """
  from hc_jax import cli  # pylint: disable=import-outside-toplevel
  return cli.load_config(path, overrides)


def config_stem(path: str) -> str:
  """configs/cnn263k_mse.py -> 'cnn263k_mse' (the run's directory name)."""
  return os.path.splitext(os.path.basename(path))[0]


def plan(config_paths: Sequence[str], folds: Sequence[int], root: str,
         overrides: Sequence[str] = (), seeds: Sequence[int] = ()
         ) -> list[tuple[Any, str]]:
  """Loads and checks every (config, fold) run; returns (config, workdir)s.

  With `seeds`, every run is repeated per seed, in ROOT/<stem>_seed<s>/.
  """
  from hc_jax.training import config_check  # pylint: disable=import-outside-toplevel
  stems = [config_stem(path) for path in config_paths]
  if len(set(stems)) != len(stems):
    raise ValueError(f'config file names must differ: {list(config_paths)}')
  runs = []
  for path, stem in zip(config_paths, stems):
    for seed, fold in [(s, f) for s in (seeds or [None]) for f in folds]:
      extra = [f'fold={fold}'] + ([] if seed is None else [f'seed={seed}'])
      config = load_config(path, list(overrides) + extra)
      config_check.check_config(config)
      name = stem if seed is None else f'{stem}_seed{seed}'
      workdir = os.path.join(root, name, f'fold{fold}')
      config_check.check_resume(config, workdir)
      runs.append((config, workdir))
  return runs


def stack_groups(runs: Sequence[tuple[Any, str]]) -> list[list[int]]:
  """Indices of runs that can train as members of one step (configs equal
  but for `config_check.MEMBER_FIELDS`)."""
  from hc_jax.training import config_check  # pylint: disable=import-outside-toplevel
  groups = {}
  for i, (config, _) in enumerate(runs):
    key = json.dumps(
        {
            k: v
            for k, v in workdir_lib.flatten(config.to_dict()).items()
            if k not in config_check.MEMBER_FIELDS
        },
        sort_keys=True,
        default=str)
    groups.setdefault(key, []).append(i)
  return list(groups.values())


def run_grid(config_paths: Sequence[str], folds: Sequence[int], root: str,
             overrides: Sequence[str] = (), shard: tuple[int, int] = (0, 1),
             stack: bool = False, seeds: Sequence[int] = ()
             ) -> dict[str, list[str]]:
  """Trains every config on every fold, skipping finished runs.

  All configs are loaded and checked before the first run starts. A run that
  stops on a NaN loss is reported and the grid goes on; a run that another
  process holds (its workdir lock) is skipped; any other error stops the
  grid.

  Args:
    config_paths: config files.
    folds: test folds to run.
    root: the grid directory; runs go to ROOT/<config stem>/fold<k>.
    overrides: `KEY=VALUE` changes applied to every config.
    shard: `(i, n)`: this process takes every n-th run from the i-th (a job
      array over several machines; `--aggregate_only` gathers the table).
    stack: train the runs that differ only in fold, loss or seed as members
      of one jitted step (`train.train_members`): fills a GPU better.
    seeds: repeat every run with each of these seeds (ROOT/<stem>_seed<s>),
      e.g. for an ensemble per fold whose members never saw its test fold.

  Returns:
    {'trained': [...], 'skipped': [...], 'failed': [...]} workdirs.
  """
  # pylint: disable=import-outside-toplevel
  from hc_jax.training import lock
  from hc_jax.training import train
  index, count = shard
  if not 0 <= index < count:
    raise ValueError(
        f'--shard must be i/n with 0 <= i < n, got {index}/{count}')
  runs = plan(config_paths, folds, root, overrides, seeds)[index::count]
  done = {'trained': [], 'skipped': [], 'failed': []}
  pending = []
  for config, workdir in runs:
    if train.finished_results(config, workdir) is not None:
      print(f'{workdir}: finished, skipped', flush=True)
      done['skipped'].append(workdir)
    else:
      pending.append((config, workdir))
  groups = stack_groups(pending) if stack else [[i] for i in range(
      len(pending))]
  for n, group in enumerate(groups, 1):
    workdirs = [pending[i][1] for i in group]
    print(f'[{n}/{len(groups)}] {", ".join(workdirs)}', flush=True)
    try:
      train.train_members([pending[i][0] for i in group], workdirs)
    except lock.LockedError as e:
      print(f'[{n}/{len(groups)}] skipped: {e}', flush=True)
      done['skipped'] += workdirs
      continue
    except FloatingPointError as e:
      print(f'[{n}/{len(groups)}] failed: {e}', flush=True)
      done['failed'] += workdirs
      continue
    done['trained'] += workdirs
  return done


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  from hc_jax import cli  # pylint: disable=import-outside-toplevel
  parser = cli.ArgumentParser(
      prog='python -m hc_jax.grid', description=__doc__.splitlines()[0],
      epilog='--config.KEY=VALUE  set a config field for every run '
      '(repeatable), as python -m hc_jax.main takes it, e.g. '
      '--config.num_epochs=100 --config.data.hc18_dir=/data/hc18')
  parser.add_argument('--configs', default='',
                      help='Comma-separated config files.')
  parser.add_argument('--folds', default='0,1,2,3,4',
                      help='Comma-separated test folds.')
  parser.add_argument('--root', required=True, help='The grid directory.')
  # `--override KEY=VALUE`: the earlier spelling of `--config.KEY=VALUE`,
  # still read so that recorded commands run; not shown.
  parser.add_argument('--override', action='append', default=[],
                      metavar='KEY=VALUE', help=argparse.SUPPRESS)
  parser.add_argument('--aggregate_only', action='store_true',
                      help='Only write the table of the runs under --root.')
  parser.add_argument('--shard', default='0/1', metavar='I/N',
                      help='Take every N-th run from the I-th, e.g. a job '
                      'array over N machines (default 0/1: all).')
  parser.add_argument('--seeds', default='',
                      help='Comma-separated seeds: each run once per seed, '
                      'in ROOT/<config>_seed<s>/fold<k>.')
  parser.add_argument('--stack', action='store_true',
                      help='Train runs that differ only in fold, loss or '
                      'seed at once, as members of one jitted step (GPU).')
  cli.add_losses_module_flag(parser)
  parser.add_argument('--require_accelerator', action='store_true',
                      help='Stop at once if JAX finds no GPU or TPU.')
  args, unknown = parser.parse_known_args(argv)
  for arg in unknown:  # --config.KEY=VALUE, as hc_jax.main takes them.
    if not arg.startswith('--config.'):
      parser.error(f'unrecognised argument {arg}')
    args.override.append(arg[len('--config.'):])
  if not args.aggregate_only and not args.configs:
    parser.error('--configs is required unless --aggregate_only')
  try:
    args.folds = [int(fold) for fold in args.folds.split(',') if fold.strip()]
  except ValueError:
    parser.error(f'--folds must be comma-separated integers, not {args.folds}')
  args.configs = [path for path in args.configs.split(',') if path.strip()]
  try:
    args.seeds = [int(seed) for seed in args.seeds.split(',') if seed.strip()]
  except ValueError:
    parser.error(f'--seeds must be comma-separated integers, not {args.seeds}')
  try:
    index, count = (int(x) for x in args.shard.split('/'))
  except ValueError:
    parser.error(f'--shard must be I/N, e.g. 0/4, not {args.shard}')
  args.shard = (index, count)
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status."""
  from hc_jax import cli  # pylint: disable=import-outside-toplevel
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  # TensorFlow (quietly) once the first config has loaded: a mistake in the
  # command line or config is one line within a second.
  cli.quiet_logs(tensorflow=False)
  # Bad input (hc18.HC18Error is a ValueError too): one line, exit 2.
  return cli.run_main(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
  """Trains the grid that `args` asks for and writes its tables."""
  from hc_jax import cli  # pylint: disable=import-outside-toplevel
  failed = []
  if args.require_accelerator:
    import jax  # pylint: disable=import-outside-toplevel
    if jax.default_backend() == 'cpu':
      raise ValueError(f'JAX found no GPU or TPU ({jax.devices()}); check '
                       'the CUDA or TPU set-up')
  if not args.aggregate_only:
    # Process settings (allocator, jax.distributed, TF off the GPUs) from
    # the first config; the grid's runs share them.
    cli.setup_process(load_config(args.configs[0], args.override))
    from hc_jax import losses  # pylint: disable=import-outside-toplevel
    for spec in args.losses_module:  # Before any config is checked.
      losses.import_module(spec)
    failed = run_grid(args.configs, args.folds, args.root, args.override,
                      shard=args.shard, stack=args.stack,
                      seeds=args.seeds)['failed']
  rows = cv_table.grid_rows(args.root)
  md_path, csv_path = cv_table.write_tables(rows, args.root)
  print(cv_table.format_markdown(rows))
  print(f'wrote {md_path} and {csv_path}')
  if failed:
    print(f'error: {len(failed)} run(s) failed: {", ".join(failed)}',
          file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  from hc_jax import cli  # pylint: disable=import-outside-toplevel
  cli.exit_process(main())
