"""The GPU recipe of docs/gpu.md, end to end on the CPU, at tiny sizes.

A machine with TensorFlow exports the prepared data once
(`python -m hc_jax.prepare`); the GPU machine, which has no TensorFlow and no
TFDS, trains the grid from that file (`python -m hc_jax.grid --stack
--config.data.prepared=FILE`). Here the second step runs in a subprocess in
which TensorFlow, TFDS and Keras cannot be found (a `sitecustomize.py` hides
them from every import finder, as if they were not installed).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from hc_jax.data import cache as cache_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ('configs/cnn263k_mse.py', 'configs/cnn263k_mae.py')
FOLDS = (0, 1)
HIDE_TENSORFLOW = '''"""Hides TensorFlow, TFDS and Keras, as on a machine without them."""
import sys

HIDDEN = ('tensorflow', 'tensorflow_datasets', 'tf_keras', 'keras')


def _hidden(name):
  return name.split('.')[0].replace('-', '_').lower() in HIDDEN


class _Hide:
  """Wraps an import finder: hidden packages are neither found nor listed."""

  def __init__(self, finder):
    self._finder = finder

  def find_spec(self, name, path=None, target=None):
    if _hidden(name) or not hasattr(self._finder, 'find_spec'):
      return None
    return self._finder.find_spec(name, path, target)

  def find_distributions(self, context=None):
    if not hasattr(self._finder, 'find_distributions'):
      return []
    return [d for d in self._finder.find_distributions(context)
            if not _hidden(d.metadata['Name'] or '')]

  def __getattr__(self, name):
    return getattr(self._finder, name)


sys.meta_path[:] = [_Hide(finder) for finder in sys.meta_path]
'''


def tf_free_env(directory) -> dict[str, str]:
  """Environment for a subprocess in which TensorFlow cannot be imported.

  Args:
    directory: where to write the `sitecustomize.py` that hides it.
  """
  directory = os.path.join(str(directory), 'hide_tensorflow')
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'sitecustomize.py'), 'w') as f:
    f.write(HIDE_TENSORFLOW)
  path = os.pathsep.join(p for p in (directory, REPO,
                                     os.environ.get('PYTHONPATH')) if p)
  # Compiling dominates these tiny runs; XLA's optimisations only cost time.
  return {**os.environ, 'PYTHONPATH': path, 'TF_CPP_MIN_LOG_LEVEL': '2',
          'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'}


def _python(args, env=None, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def test_tensorflow_is_hidden(tmp_path):
  result = _python(['-c', '\n'.join([
      'import importlib.metadata, importlib.util',
      "assert importlib.util.find_spec('tensorflow') is None",
      "assert importlib.util.find_spec('tensorflow_datasets') is None",
      'try:',
      "  importlib.metadata.version('tensorflow')",
      "  raise SystemExit('tensorflow still listed')",
      'except importlib.metadata.PackageNotFoundError:',
      '  pass',
      'import tensorflow'])], env=tf_free_env(tmp_path))
  assert result.returncode == 1, result.stderr
  assert "ModuleNotFoundError: No module named 'tensorflow'" in result.stderr


def test_training_modules_import_without_tensorflow(tmp_path):
  modules = ('training.train', 'training.trainer', 'grid', 'data.pipeline',
             'data.cache', 'data.augment', 'training.checkpoint', 'cli',
             'evaluation.cv_table')
  result = _python(['-c', '; '.join(
      [f'import hc_jax.{name}' for name in modules] +
      ['import sys',
       "print(sorted(m for m in sys.modules if m.startswith('tensorflow')))"])],
                   env=tf_free_env(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == '[]'


@pytest.fixture(scope='module')
def export(phantom_hc18, tmp_path_factory):
  """The phantom scans exported at 32x32, as step 1 of docs/gpu.md makes it
  (on a machine with TensorFlow)."""
  hc18_dir, cache_dir = phantom_hc18
  out = tmp_path_factory.mktemp('export')
  result = _python(['-m', 'hc_jax.prepare', f'--config={CONFIGS[0]}',
                    f'--out={out}', '--override', 'image_size=32',
                    '--override', f'data.hc18_dir={hc18_dir}',
                    '--override', f'data.cache_dir={cache_dir}'])
  assert result.returncode == 0, result.stderr[-3000:]
  path = os.path.join(str(out), 'hc18_32x32_stretch.npz')
  assert f'--config.data.prepared={path}' in result.stdout
  return path


def test_export_holds_the_prepared_scans(export):
  arrays, info = cache_lib.load(export)
  assert arrays['images'].shape == (60, 32, 32, 1)
  assert arrays['images'].dtype == np.uint8
  assert info['image_hw'] == [32, 32] and info['resize_mode'] == 'stretch'
  assert info['source_digest']


def _grid(root, export, env, *flags):
  return _python(['-m', 'hc_jax.grid', f'--configs={",".join(CONFIGS)}',
                  f'--folds={",".join(map(str, FOLDS))}', f'--root={root}',
                  f'--config.data.prepared={export}', *flags], env=env)


def test_grid_trains_from_the_export_without_tensorflow(export, tmp_path):
  env = tf_free_env(tmp_path)
  root = tmp_path / 'grid'
  result = _grid(root, export, env, '--stack', '--config.image_size=32',
                 '--config.num_epochs=2', '--config.eval_batch_size=8')
  assert result.returncode == 0, result.stderr[-3000:]
  runs = [root / os.path.basename(c)[:-3] / f'fold{k}' for c in CONFIGS
          for k in FOLDS]
  for workdir in runs:
    for name in ('results.json', 'predictions_test.csv', 'metrics.jsonl'):
      assert (workdir / name).is_file(), f'{workdir} has no {name}'
    results = json.loads((workdir / 'results.json').read_text())
    assert results['num_members'] == 4  # All four runs in one step.
    assert results['num_epochs'] == 2
    assert np.isfinite(results['test_mae_mm'])
    config = json.loads((workdir / 'config.json').read_text())
    assert config['data']['prepared'] == export
  assert 'members_per_call=auto' in result.stdout  # vmap and map both ran.

  (root / 'results.md').unlink()
  result = _python(['-m', 'hc_jax.grid', f'--root={root}', '--aggregate_only'],
                   env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  table = (root / 'results.md').read_text()
  for config in CONFIGS:
    assert f'| {os.path.basename(config)[:-3]} | cnn_263k |' in table, table
  assert '2/5' in table


def test_grid_refuses_an_export_of_another_size(export, tmp_path):
  result = _grid(tmp_path / 'grid', export, tf_free_env(tmp_path), '--stack',
                 '--config.image_size=64', '--config.num_epochs=1')
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith('error: ') and 'holds (32, 32) images' in (
      lines[-1]), result.stderr[-3000:]


@pytest.mark.skipif(jax.default_backend() != 'cpu',
                    reason='checks the refusal on a machine without a GPU')
def test_grid_require_accelerator_stops_on_a_cpu(export, tmp_path):
  result = _grid(tmp_path / 'grid', export, tf_free_env(tmp_path), '--stack',
                 '--require_accelerator', '--config.image_size=32')
  assert result.returncode == 2
  assert 'error: JAX found no GPU or TPU' in result.stderr
  assert not (tmp_path / 'grid').exists()


def test_the_dense_model_trains_stacked_from_the_export_without_tensorflow(
    export, tmp_path):
  """docs/gpu.md's dense-model recipe: two folds of hcnet_mask in one step."""
  env = tf_free_env(tmp_path)
  root = tmp_path / 'grid'
  result = _python(['-m', 'hc_jax.grid', '--configs=configs/hcnet_mask.py',
                    '--folds=0,1', f'--root={root}', '--stack',
                    f'--config.data.prepared={export}',
                    '--config.image_size=32', '--config.image_width=0',
                    '--config.model_options.widths=(4,8,8,8)',
                    '--config.num_epochs=1', '--config.eval_batch_size=8',
                    '--config.members_per_call=vmap'], env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  for fold in (0, 1):
    results = json.loads((root / 'hcnet_mask' / f'fold{fold}' /
                          'results.json').read_text())
    assert results['num_members'] == 2
    assert np.isfinite(results['test_mae_mm'])
