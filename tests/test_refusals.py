"""Refusals that come early and leave nothing, and the files predict writes.

An input too small for the model is refused before any data is prepared; a
refused run leaves no folder it created; a fault is one line, with orbax's
late reports dropped; predict's CSV has the umask's permissions, and a
predict does not overwrite the CSV another one wrote meanwhile.
"""

import errno
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image
import pytest

from conftest import REPO
from hc_jax import models
from hc_jax import predict
from hc_jax.data import cache as cache_lib
from hc_jax.data import pipeline
from hc_jax.training import config_check
from hc_jax.training import train


def _mask_config(phantom_hc18, image_size):
  from configs import hcnet_mask  # pylint: disable=import-outside-toplevel
  config = hcnet_mask.get_config()
  config.data.hc18_dir, config.data.cache_dir = phantom_hc18
  config.image_size, config.image_width = image_size, 0
  return config


@pytest.mark.parametrize('name', sorted(models.MODELS))
def test_every_model_declares_its_smallest_input(phantom_hc18, name):
  """The config check refuses an input below it, and takes one of it."""
  config = _mask_config(phantom_hc18, 0)
  config.model = name
  config.model_options = {}
  smallest = models.smallest_input(models.from_config(config))
  assert smallest >= 1
  config.image_size = smallest
  config_check.check_config(config)
  config.image_size = smallest - 1
  with pytest.raises(ValueError, match=f'at least {smallest}x{smallest}'):
    config_check.check_config(config)


@pytest.mark.parametrize('image_size', [7, 16])
def test_a_mask_model_input_too_small_is_refused_before_any_data(
    phantom_hc18, tmp_path, image_size):
  """It used to train to exit 0 with a 379-915 mm MAE."""
  config = _mask_config(phantom_hc18, image_size)
  config.data.cache_dir = str(tmp_path / 'cache')
  with pytest.raises(ValueError, match='hcnet_mask cannot take a .* input '
                     '.*: it needs at least 32x32 px'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'cache')
  assert not os.path.exists(tmp_path / 'run')


def test_a_refused_run_leaves_no_folder_it_created(phantom_hc18, tmp_path,
                                                   capsys):
  """Not the workdir, nor the parents it made for it."""
  broken = tmp_path / 'hc18'
  shutil.copytree(phantom_hc18[0], broken)
  victim = sorted((broken / 'training_set').glob('*HC.png'))[0]
  victim.unlink()
  workdir = tmp_path / 'runs' / 'deep' / 'run'
  from hc_jax import main  # pylint: disable=import-outside-toplevel
  code = main.main(['--config=configs/default.py',
                    f'--config.data.hc18_dir={broken}',
                    f'--config.data.cache_dir={tmp_path / "cache"}',
                    '--config.image_size=32', f'--workdir={workdir}'])
  assert code == 2
  assert victim.name in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'runs')


def test_a_synthetic_runs_cache_error_names_the_workdir(tmp_path,
                                                        monkeypatch):
  """A phantom run keeps its cache in its workdir: the message does not send
  the user to --config.data.cache_dir, which it ignores."""
  from configs import demo  # pylint: disable=import-outside-toplevel
  config = demo.get_config()
  config.data.num_synthetic = 20

  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, 'Read-only file system', str(tmp_path))

  monkeypatch.setattr(cache_lib, '_from_tfds', read_only)
  with pytest.raises(cache_lib.CacheError) as error:
    pipeline.prepared_arrays(config, str(tmp_path / 'run'))
  assert '--config.data.cache_dir' not in str(error.value)
  assert '--workdir' in str(error.value)
  assert 'read-only' in str(error.value)


def test_late_event_loop_reports_do_not_follow_the_error_line(tmp_path):
  """orbax, after a failed save (a full disk), leaves tensorstore reporting
  'Event loop is closed' with tracebacks, after the command's one line."""
  script = textwrap.dedent('''
      import sys
      from hc_jax import cli

      class Pending:  # Reports as tensorstore's callbacks do, unraisably.
        def __del__(self):
          raise RuntimeError('Event loop is closed')

      def body():
        Pending()
        raise ValueError('could not save epoch 1 (no space left)')

      sys.exit(cli.run_main(body))
  ''')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO,
                          capture_output=True, text=True, check=False,
                          env={**os.environ, 'PYTHONPATH': REPO})
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      'error: could not save epoch 1 (no space left)'], result.stderr


class _Stub:
  """A predictor whose HC is 1000 px; `during` runs while it predicts."""
  predicts_ellipse = False
  kind = 'hc'
  trained_on_phantoms = False

  def __init__(self, during=None):
    self.during = during

  def __call__(self, images, pixel_sizes_mm, **kwargs):
    if self.during:
      self.during()
    count = len(images)
    return {'hc_px': np.full(count, 1000.0), 'hc_mm': np.full(count, 100.0),
            'hc_mm_sd': np.full(count, np.nan),
            'status': np.full(count, 'ok', object),
            'message': np.full(count, '', object)}


def _scan_dir(tmp_path):
  scans = tmp_path / 'scans'
  scans.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (40, 60), np.uint8)).save(
      scans / 'a.png')
  return scans


def test_predict_csv_has_the_permissions_of_the_umask(tmp_path, monkeypatch):
  scans = _scan_dir(tmp_path)
  monkeypatch.setattr(predict, 'load', lambda *a, **k: _Stub())
  previous = os.umask(0o022)
  try:
    for umask in (0o022, 0o027):
      os.umask(umask)
      out = tmp_path / f'hc{umask:o}.csv'
      predict.main([f'--workdir={tmp_path}', f'--images={scans}',
                    f'--out={out}', '--pixel-sizes=' + str(_sizes(tmp_path))])
      assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask
  finally:
    os.umask(previous)


def _sizes(tmp_path):
  path = tmp_path / 'sizes.csv'
  path.write_text('filename,pixel size(mm)\na.png,0.1\n')
  return path


def test_two_predicts_on_one_out_do_not_both_say_wrote(tmp_path, monkeypatch,
                                                       capsys):
  """The one that finishes second finds the CSV another one wrote since it
  started: it keeps it, and says so in one line (exit 2)."""
  scans = _scan_dir(tmp_path)
  out = tmp_path / 'hc.csv'
  theirs = 'filename,pixel_size_mm,hc_px\nother.png,0.1,5\n'

  def the_other_predict_finishes():
    out.write_text(theirs)

  monkeypatch.setattr(predict, 'load',
                      lambda *a, **k: _Stub(the_other_predict_finishes))
  code = predict.main([f'--workdir={tmp_path}', f'--images={scans}',
                       f'--out={out}'])
  captured = capsys.readouterr()
  assert code == 2
  assert 'wrote' not in captured.out
  errors = [l for l in captured.err.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and 'written by another process' in errors[0]
  assert out.read_text() == theirs
  assert sorted(os.listdir(tmp_path)) == ['hc.csv', 'scans']
  # Alone, it replaces its own earlier CSV as before.
  monkeypatch.setattr(predict, 'load', lambda *a, **k: _Stub())
  assert predict.main([f'--workdir={tmp_path}', f'--images={scans}',
                       f'--out={out}']) == 0
  assert 'a.png' in out.read_text()
