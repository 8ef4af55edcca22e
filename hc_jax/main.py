"""Trains and evaluates one fold of one configuration.

  python -m hc_jax.main --config=configs/resnet_huber.py [--workdir=DIR]
      [--config.fold=2] [--config.num_epochs=10]

Without --workdir the run goes to runs/<model>_<loss>_fold<k>; running the
same command again resumes it.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory of the run (resumed if present).')
config_flags.DEFINE_config_file(
    'config', None, 'A config file from configs/.', lock_config=True)
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  # pylint: disable=import-outside-toplevel
  import jax
  from hc_jax import hc18
  from hc_jax import train
  config = FLAGS.config
  if config.distributed:
    jax.distributed.initialize()
  workdir = FLAGS.workdir or os.path.join(
      'runs', f'{config.model}_{config.loss}_fold{config.fold}')
  try:
    train.train_and_evaluate(config, workdir)
  except (ValueError, hc18.HC18Error, FloatingPointError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
