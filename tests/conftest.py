"""Shared fixtures: a small phantom HC18 directory and fast configs."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `from configs import ...` as in python -m hc_jax.main.
  sys.path.insert(0, REPO)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


@pytest.fixture(scope='session')
def phantom_hc18(tmp_path_factory):
  """A phantom HC18 directory (60 train, 6 test images) and a TFDS dir."""
  from hc_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('phantom_hc18')
  synthetic.write_hc18(str(root / 'hc18'), num_train=60, num_test=6, seed=1)
  return str(root / 'hc18'), str(root / 'tfds')


@pytest.fixture
def tiny_config(phantom_hc18):
  """The default config shrunk to seconds: 32x32 images, 2 epochs."""
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.data.hc18_dir, config.data.cache_dir = phantom_hc18
  config.image_size = 32
  config.num_epochs = 2
  config.batch_size = 8
  config.eval_batch_size = 8
  config.log_every_steps = 1000
  return config


def config_flags(config) -> list[str]:
  """The command-line overrides that turn configs/default.py into `config`."""
  return [f'--config.data.hc18_dir={config.data.hc18_dir}',
          f'--config.data.cache_dir={config.data.cache_dir}',
          f'--config.image_size={config.image_size}',
          f'--config.num_epochs={config.num_epochs}',
          f'--config.eval_batch_size={config.eval_batch_size}',
          f'--config.log_every_steps={config.log_every_steps}']
