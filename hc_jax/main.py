"""Trains and evaluates one fold of one configuration.

  python -m hc_jax.main --config=configs/cnn263k_mse.py [--workdir=DIR]
      [--config.fold=2] [--config.num_epochs=10]

Without --workdir the run goes to runs/<config file's name>_fold<k> (e.g.
runs/resnet_huber_fold0 for configs/resnet_huber.py); running the same
command again resumes it. Any config field can be set with
`--config.KEY=VALUE`; a misspelt field, a missing config file or a bad value
ends with one line on stderr and exit status 2.

This module owns the process: its log levels, `jax.distributed`, TensorFlow's
view of the GPUs and the CPU allocator (`cli.setup_process`); the training
itself is `train.train_and_evaluate(config, workdir)`.
"""

import argparse
import os
import sys
import textwrap
from typing import Sequence

from hc_jax import cli
from hc_jax import workdir as workdir_lib


def default_workdir(config_path: str, fold: int) -> str:
  """runs/<config file's stem>_fold<k>, e.g. runs/resnet_huber_fold0."""
  stem = os.path.splitext(os.path.basename(config_path))[0]
  return os.path.join('runs', f'{stem}_fold{fold}')


def help_epilog(config_path: str | None = None) -> str:
  """What `--help` says after the flags: the config files in configs/, the
  fields of `config_path` (default: configs/default.py) with their values,
  and where a run goes without --workdir."""
  lines = [f'--config=FILE (required): a config file; those in '
           f'{cli.shown_path(cli.CONFIGS_DIR)}/ (each one\'s docstring says '
           'what it trains):']
  lines += textwrap.wrap(', '.join(cli.config_files()), initial_indent='  ',
                         subsequent_indent='  ')
  lines.append('  (hcnet_mask.py: the recommended model; demo.py: a demo on '
               'phantom scans, minutes on a CPU)')
  shown = config_path or os.path.join(cli.CONFIGS_DIR, 'default.py')
  try:
    fields = workdir_lib.flatten(cli.load_config(shown).to_dict())
  except ValueError:  # A config that does not load: its error says why.
    fields = {}
  if fields:
    lines += ['', f'--config.KEY=VALUE: change one field of the config; the '
              f'fields, as {cli.shown_path(shown)} sets them:']
    lines += [f'  {key} = {value!r}' for key, value in sorted(fields.items())]
  lines += ['', 'Without --workdir the run goes to runs/<config file>_fold<k> '
            f'(e.g. {default_workdir("configs/hcnet_mask.py", 0)}); the same '
            'command again resumes it.']
  return '\n'.join(textwrap.fill(line, 79, subsequent_indent='  ')
                   if len(line) > 79 else line for line in lines)


def _parse_args(argv: Sequence[str]):
  path, overrides, rest = cli.split_config_args(argv)
  wants_help = any(arg in ('-h', '--help') for arg in rest)
  parser = cli.ArgumentParser(
      prog='python -m hc_jax.main', description=__doc__.splitlines()[0],
      usage='%(prog)s --config=FILE [--config.KEY=VALUE ...] [--workdir=DIR]',
      epilog=help_epilog(path) if wants_help else None,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default=None,
                      help='directory of the run (resumed if present; '
                      'default runs/<config file>_fold<k>)')
  cli.add_losses_module_flag(parser)
  args = parser.parse_args(rest)
  if path is None:
    parser.error('--config=FILE is required, e.g. '
                 '--config=configs/cnn263k_mse.py')
  args.config, args.overrides = path, overrides
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (default: sys.argv[1:]); returns the exit status.

  Exit status 0 when the run finished; 2, after one line on stderr, for a
  mistake in the command line or the config, missing data or a diverged run;
  130 after Ctrl-C (143 after SIGTERM), after one line saying where the run
  stopped and what it saved (`cli.OneLineErrors`).
  """
  cli.quiet_logs(tensorflow=False)  # setup_process imports it, quietly.
  with cli.OneLineErrors() as outcome:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    config = cli.load_config(args.config, args.overrides)
    # What the next half minute goes to, before the imports and compilation.
    print(f'{args.config}: starting JAX and TensorFlow (then the data and the '
          'compilation; about 30 s on a CPU)...', file=sys.stderr, flush=True)
    cli.setup_process(config)
    # pylint: disable=import-outside-toplevel
    from hc_jax import losses
    from hc_jax.training import train
    for spec in args.losses_module:  # After setup_process: may import jax.
      losses.import_module(spec)
    workdir = args.workdir or default_workdir(args.config, config.fold)
    train.train_and_evaluate(config, workdir)
  return outcome.status


if __name__ == '__main__':
  cli.exit_process(main())
