"""Shared fixtures: a small phantom HC18 directory and fast configs."""

import os
import shutil
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `from configs import ...` as in python -m hc_jax.main.
  sys.path.insert(0, REPO)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Compiling, not running, dominates these small programs: unoptimised XLA
# compiles them several times faster and passes every test. Set here, before
# jax is imported, so the commands the tests start inherit it too; a test
# marked `xla_optimized` compiles with the optimisations a user's run has.
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 in the environment runs all of them so.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# One compilation cache for the test run: its workers and the commands the
# tests start compile a program once (many train the same tiny model).
_JAX_CACHE = None
if ('PYTEST_XDIST_WORKER' not in os.environ
    and 'JAX_COMPILATION_CACHE_DIR' not in os.environ):
  _JAX_CACHE = tempfile.mkdtemp(prefix='hc_jax-tests-jax-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _JAX_CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')


def pytest_unconfigure(config):
  del config  # Unused.
  if _JAX_CACHE:
    shutil.rmtree(_JAX_CACHE, ignore_errors=True)


# The longest modules first (about 40 s to 100 s of work each), so that the
# parallel workers, each running whole modules (`--dist loadfile` in
# setup.cfg), finish together; the others follow in their usual order.
_LONGEST_FIRST = ('test_train.py', 'test_mask.py', 'test_refine.py',
                  'test_reliability.py', 'test_predict.py', 'test_own_data.py',
                  'test_benchmarks.py', 'test_gpu_path.py', 'test_leftovers.py',
                  'test_fast_layers.py', 'test_models.py', 'test_notebooks.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _xla_optimized(request):
  """For a test marked `xla_optimized`: XLA's optimisations on, as a user's
  run has them, for what it compiles; restored afterwards."""
  if request.node.get_closest_marker('xla_optimized') is None:
    yield
    return
  import jax  # pylint: disable=import-outside-toplevel
  flag = 'jax_disable_most_optimizations'
  previous = jax.config.read(flag)
  jax.config.update(flag, False)
  try:
    yield
  finally:
    jax.config.update(flag, previous)


@pytest.fixture(scope='session')
def phantom_hc18(tmp_path_factory):
  """A phantom HC18 directory (60 train, 6 test images) and a TFDS dir."""
  from hc_jax.data import phantom_set  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('phantom_hc18')
  phantom_set.write_hc18(str(root / 'hc18'), num_train=60, num_test=6, seed=1)
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
  return config


def tiny_mask_config(name: str, hc18_dir: str, cache_dir: str):
  """configs/<name>.py (a mask model) shrunk to seconds: 32x48 input,
  widths (4, 8, 8, 8), 2 epochs."""
  import importlib  # pylint: disable=import-outside-toplevel
  config = importlib.import_module(f'configs.{name}').get_config()
  config.data.hc18_dir, config.data.cache_dir = hc18_dir, cache_dir
  config.image_size, config.image_width = 32, 48
  config.model_options.widths = (4, 8, 8, 8)
  config.model_options.margin = 4
  config.num_epochs = 2
  config.warmup_epochs = 1
  config.eval_batch_size = 8
  return config


def config_flags(config) -> list[str]:
  """The command-line overrides that turn configs/default.py into `config`."""
  return [f'--config.data.hc18_dir={config.data.hc18_dir}',
          f'--config.data.cache_dir={config.data.cache_dir}',
          f'--config.image_size={config.image_size}',
          f'--config.num_epochs={config.num_epochs}',
          f'--config.eval_batch_size={config.eval_batch_size}']


ZENODO_API = 'https://zenodo.org/api/records/1327317'


def fake_zenodo(hc18_root: str, out_dir: str, zip_top_folder: bool = True
                ) -> dict[str, str]:
  """The four Zenodo files of an HC18 copy, as the record serves them.

  Writes `training_set.zip`, `test_set.zip` (each with its images under a
  top folder named like the split, as Zenodo's have, or at its root), the two
  CSVs and the record's API answer (`record.json`: names, links, sizes and
  'md5:' checksums) into `out_dir`.

  Returns:
    {url: local file}: the record's API address and each file's link, for
    an opener that serves them without a network.
  """
  # pylint: disable=import-outside-toplevel
  import hashlib
  import json
  import zipfile
  os.makedirs(out_dir, exist_ok=True)
  served = {}
  for folder in ('training_set', 'test_set'):
    path = os.path.join(out_dir, folder + '.zip')
    with zipfile.ZipFile(path, 'w') as archive:
      for name in sorted(os.listdir(os.path.join(hc18_root, folder))):
        archive.write(os.path.join(hc18_root, folder, name),
                      f'{folder}/{name}' if zip_top_folder else name)
    served[folder + '.zip'] = path
  for name in ('training_set_pixel_size_and_HC.csv',
               'test_set_pixel_size.csv'):
    served[name] = shutil.copy(os.path.join(hc18_root, name), out_dir)
  files, urls = [], {}
  for name, path in served.items():
    with open(path, 'rb') as f:
      md5 = hashlib.md5(f.read()).hexdigest()
    url = f'{ZENODO_API}/files/{name}/content'
    files.append({'key': name, 'size': os.path.getsize(path),
                  'checksum': f'md5:{md5}', 'links': {'self': url}})
    urls[url] = path
  record = os.path.join(out_dir, 'record.json')
  with open(record, 'w') as f:
    json.dump({'id': 1327317, 'files': files}, f)
  urls[ZENODO_API] = record
  return urls
