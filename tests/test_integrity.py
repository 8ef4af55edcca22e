"""Files changed behind hc_jax's back are noticed, not believed.

A run's config.json edited after training (its checkpoint's manifest
records the model config it trained with), a damaged best checkpoint (one
line that says what to do), and a wrong entry in the cache's
file_hashes.json (checked against the bytes, not believed).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from conftest import REPO
from hc_jax import predict
from hc_jax import workdir as workdir_lib
from hc_jax.data import cache as cache_lib
from hc_jax.data import digests
from hc_jax.data import phantom_set
from hc_jax.training import manifest
from hc_jax.training import train


@pytest.fixture(scope='module')
def run(phantom_hc18, tmp_path_factory):
  """A finished one-epoch run of the tiny config."""
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.data.hc18_dir, config.data.cache_dir = phantom_hc18
  config.image_size = 32
  config.num_epochs = 1
  config.batch_size = config.eval_batch_size = 8
  workdir = str(tmp_path_factory.mktemp('integrity') / 'run')
  train.train_and_evaluate(config, workdir)
  return workdir


def _copy(run_dir, tmp_path):
  copy = tmp_path / 'run'
  shutil.copytree(run_dir, copy)
  return copy


def _edit_config(run_dir, **changes):
  path = os.path.join(run_dir, workdir_lib.CONFIG_FILE)
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, 'w') as f:
    json.dump(config, f)


def _predict_cli(run_dir, tmp_path):
  scan = tmp_path / 'a.png'
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (48, 64), np.uint8)).save(scan)
  return subprocess.run(
      [sys.executable, '-m', 'hc_jax.predict', f'--workdir={run_dir}',
       f'--images={scan}', f'--out={tmp_path / "p.csv"}'],
      cwd=REPO, capture_output=True, text=True, check=False)


def test_the_manifest_records_the_model_config(run):
  step_dir = workdir_lib.best_checkpoint(run)
  config = workdir_lib.read_json(os.path.join(run, workdir_lib.CONFIG_FILE))
  assert manifest.config_digest(step_dir) == (
      workdir_lib.model_config_digest(config))


@pytest.mark.parametrize('changes', [
    {'resize_mode': 'letterbox'}, {'image_size': 48}, {'image_width': 48},
    {'dtype': 'bfloat16'}, {'model_options': {'conv_features': [8, 16]}}])
def test_a_config_json_edited_after_training_is_refused(run, tmp_path,
                                                        changes):
  copy = _copy(run, tmp_path)
  _edit_config(copy, **changes)
  with pytest.raises(workdir_lib.PredictError,
                     match='config.json was changed after training'):
    predict.load(str(copy))


def test_the_command_line_refuses_an_edited_config_in_one_line(run,
                                                               tmp_path):
  copy = _copy(run, tmp_path)
  _edit_config(copy, resize_mode='letterbox')
  result = _predict_cli(copy, tmp_path)
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and 'config.json was changed after training' in (
      errors[0])
  assert not (tmp_path / 'p.csv').exists()


def test_edits_that_do_not_change_the_model_still_load(run, tmp_path):
  """Fields a resumed run may change (num_epochs...) or that predict does
  not use; and checkpoints from before the digest was recorded."""
  copy = _copy(run, tmp_path)
  _edit_config(copy, num_epochs=300, learning_rate=0.5)
  predict.load(str(copy))
  step_dir = workdir_lib.best_checkpoint(str(copy))
  manifest.write(step_dir)  # As an older hc_jax wrote it: no digest.
  _edit_config(copy, resize_mode='letterbox')
  assert predict.load(str(copy)).resize_mode == 'letterbox'


def test_a_damaged_best_checkpoint_says_what_to_do(run, tmp_path):
  copy = _copy(run, tmp_path)
  state = os.path.join(workdir_lib.best_checkpoint(str(copy)), 'state')
  files = [os.path.join(folder, name) for folder, _, names in os.walk(state)
           for name in names]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.seek(os.path.getsize(biggest) // 2)
    f.write(b'\0damaged\0')
  result = _predict_cli(copy, tmp_path)
  assert result.returncode == 2, result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, result.stderr
  assert 'damaged' in errors[0] and str(copy) in errors[0]
  assert 'train the run again' in errors[0] and 'restore it' in errors[0]


def test_a_wrong_remembered_hash_is_checked_against_the_bytes(tmp_path,
                                                              capsys):
  """A damaged file_hashes.json entry that is still valid JSON neither
  prepares a fresh copy under another digest nor makes the run's data look
  other than it trained on; the entry is mended."""
  root = str(tmp_path / 'hc18')
  phantom_set.write_hc18(root, num_train=12, num_test=4, seed=3)
  cache = str(tmp_path / 'cache')
  _, info = cache_lib.prepare(root, (32, 32), 'stretch', cache)
  hashes_path = os.path.join(cache, digests.HASHES_FILE)
  with open(hashes_path) as f:
    hashes = json.load(f)
  victim = sorted(hashes)[3]
  hashes[victim][3] = '0' * 64  # Same size and times, another hash.
  with open(hashes_path, 'w') as f:
    json.dump(hashes, f)
  capsys.readouterr()
  _, again = cache_lib.prepare(root, (32, 32), 'stretch', cache)
  assert again['content_digest'] == info['content_digest']
  assert sorted(os.listdir(cache)) == sorted(
      [digests.HASHES_FILE, f'hc18-{info["content_digest"]}'])
  assert 'hashed them again' in capsys.readouterr().err
  with open(hashes_path) as f:
    assert json.load(f)[victim][3] != '0' * 64
