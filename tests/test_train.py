"""End-to-end tests of training: artifacts, resume, faults, devices, configs."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import config_flags, REPO
from hc_jax import train

RESULT_KEYS = ('test_mae_px', 'test_mae_mm', 'test_pmae', 'val_mae_mm')


def _run_main(workdir, flags, env=None, **kwargs):
  command = [sys.executable, '-m', 'hc_jax.main',
             '--config=configs/default.py', f'--workdir={workdir}', *flags]
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})}, **kwargs)


def _results(workdir):
  with open(os.path.join(workdir, train.RESULTS_FILE)) as f:
    return json.load(f)


def test_train_and_evaluate_leaves_a_complete_run(tiny_config, tmp_path):
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(tiny_config, workdir)
  for name in ('config.json', 'folds.json', 'metrics.jsonl', 'results.json',
               train.PREDICTIONS_FILE):
    assert os.path.isfile(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert os.listdir(os.path.join(workdir, 'checkpoints', 'latest')) == ['2']
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert [line['epoch'] for line in lines] == [1, 2, 2]
  assert all(np.isfinite(line['train_loss']) for line in lines[:2])
  # Every image of the test fold is scored once, with consistent columns.
  with open(os.path.join(workdir, 'folds.json')) as f:
    folds = json.load(f)
  test_names = sorted(image['filename'] for image in folds['images']
                      if image['fold'] == tiny_config.fold)
  with open(os.path.join(workdir, train.PREDICTIONS_FILE)) as f:
    rows = list(csv.DictReader(f))
  assert sorted(row['filename'] for row in rows) == test_names
  errors = [abs(float(r['hc_mm_pred']) - float(r['hc_mm_true'])) for r in rows]
  assert results['test_num_images'] == len(test_names)
  assert results['test_mae_mm'] == pytest.approx(np.mean(errors), abs=1e-2)
  assert 1 <= results['selected_epoch'] <= 2


def test_training_lowers_the_loss(tiny_config, tmp_path):
  tiny_config.num_epochs = 20
  train.train_and_evaluate(tiny_config, str(tmp_path / 'run'))
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    losses = [json.loads(line).get('train_loss') for line in f][:20]
  assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:2]), losses


@pytest.mark.slow
def test_learns_on_phantoms(tmp_path):
  """The demo beats predicting the mean HC by a wide margin."""
  from configs import demo  # pylint: disable=import-outside-toplevel
  results = train.train_and_evaluate(demo.get_config(), str(tmp_path / 'run'))
  with open(tmp_path / 'run' / train.PREDICTIONS_FILE) as f:
    true_mm = np.array([float(r['hc_mm_true']) for r in csv.DictReader(f)])
  baseline_mm = np.abs(true_mm - true_mm.mean()).mean()  # Optimistic baseline.
  assert results['test_mae_mm'] < 0.6 * baseline_mm, (results, baseline_mm)


def _num_lines(path):
  try:
    with open(path) as f:
      return sum(1 for line in f if line.strip())
  except FileNotFoundError:
    return 0


@pytest.mark.parametrize('checkpoint_every_seconds', [0, 1e6])
def test_resume_after_kill_matches_uninterrupted_run(
    tiny_config, tmp_path, checkpoint_every_seconds):
  # 0: the latest checkpoint after every epoch, killed after epoch 2's.
  # 1e6: none before the end, killed after epoch 3: the rerun starts over and
  # must drop the best checkpoints the killed run left.
  flags = config_flags(tiny_config) + [
      '--config.num_epochs=5',
      f'--config.checkpoint_every_seconds={checkpoint_every_seconds}']
  whole = _run_main(tmp_path / 'whole', flags)
  whole_out, whole_err = whole.communicate(timeout=300)
  assert whole.returncode == 0, whole_err[-2000:]

  killed_dir = tmp_path / 'killed'
  killed = _run_main(killed_dir, flags)
  if checkpoint_every_seconds:
    ready = lambda: _num_lines(killed_dir / 'metrics.jsonl') >= 3
  else:
    ready = (killed_dir / 'checkpoints' / 'latest' / '2').exists
  deadline = time.time() + 240
  while not ready() and killed.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  killed.send_signal(signal.SIGKILL)
  killed.communicate()
  assert not (killed_dir / train.RESULTS_FILE).exists(), 'finished before kill'
  if checkpoint_every_seconds:
    assert not os.listdir(killed_dir / 'checkpoints' / 'latest')
    assert os.listdir(killed_dir / 'checkpoints' / 'best')

  resumed = _run_main(killed_dir, flags)
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err[-2000:]
  assert ('resuming after epoch' in out) == (not checkpoint_every_seconds)
  expected, actual = _results(tmp_path / 'whole'), _results(killed_dir)
  for key in RESULT_KEYS + ('selected_epoch',):
    assert actual[key] == pytest.approx(expected[key], rel=1e-4), key
  with open(killed_dir / 'metrics.jsonl') as f:
    epochs = [json.loads(line)['epoch'] for line in f]
  assert epochs == [1, 2, 3, 4, 5, 5]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
  workdir = tmp_path / 'run'
  flags = config_flags(tiny_config)
  first = _run_main(workdir, flags + ['--config.num_epochs=1'])
  assert first.wait(timeout=300) == 0
  # Resume with an absurd learning rate: the loss overflows in epoch 2.
  second = _run_main(workdir, flags + ['--config.num_epochs=3',
                                       '--config.learning_rate=1e30'])
  _, err = second.communicate(timeout=300)
  assert second.returncode == 2
  assert 'loss is' in err and 'at step' in err and 'Traceback' not in err
  assert sorted(os.listdir(workdir / 'checkpoints' / 'latest')) == ['1']


@pytest.mark.parametrize('flag, message', [
    ('--config.model=resnet18', 'unknown model'),
    ('--config.loss=l1', 'unknown loss'),
    ('--config.fold=5', 'fold must be in [0, 4]'),
    ('--config.checkpoint_every_seconds=-1', 'checkpoint_every_seconds must'),
    ('--config.data.hc18_dir=/no/such/dir', 'holds no'),
])
def test_bad_config_gives_one_clear_line(tiny_config, tmp_path, flag, message):
  process = _run_main(tmp_path / 'run', config_flags(tiny_config) + [flag])
  _, err = process.communicate(timeout=120)
  assert process.returncode == 2
  assert 'Traceback' not in err
  assert message in err.strip().splitlines()[-1]


def test_misspelt_config_field_is_an_error(tiny_config, tmp_path):
  process = _run_main(tmp_path / 'run', ['--config.num_epoch=3'])
  _, err = process.communicate(timeout=120)
  assert process.returncode != 0 and 'num_epoch' in err


def test_one_and_eight_devices_agree(tiny_config, tmp_path):
  flags = config_flags(tiny_config)
  runs = {}
  for devices in (1, 8):
    workdir = tmp_path / f'devices{devices}'
    process = _run_main(workdir, flags, env={
        'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'})
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert f'{devices} cpu device(s)' in out
    runs[devices] = _results(workdir)
  for key in RESULT_KEYS:
    assert runs[8][key] == pytest.approx(runs[1][key], rel=1e-3), key


@pytest.mark.parametrize('backend, fast', [('cpu', True), ('gpu', False),
                                           ('tpu', False)])
def test_fast_layers_only_on_cpu(tiny_config, monkeypatch, backend, fast):
  monkeypatch.setattr(train.jax, 'default_backend', lambda: backend)
  for name in ('cnn_263k', 'cnn_1m', 'vgg16', 'resnet50'):
    tiny_config.model = name
    assert train.create_model(tiny_config).fast_layers is fast, name
