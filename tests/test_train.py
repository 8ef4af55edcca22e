"""End-to-end tests of training: artifacts, resume, faults, devices, configs."""

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import config_flags, REPO
from hc_jax import workdir as workdir_lib
from hc_jax.training import manifest
from hc_jax.training import step as step_lib
from hc_jax.training import train

RESULT_KEYS = ('test_mae_px', 'test_mae_mm', 'test_pmae', 'val_mae_mm')


def _run_main(workdir, flags, env=None, **kwargs):
  command = [sys.executable, '-m', 'hc_jax.main',
             '--config=configs/default.py', f'--workdir={workdir}', *flags]
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})}, **kwargs)


def _results(workdir):
  with open(os.path.join(workdir, workdir_lib.RESULTS_FILE)) as f:
    return json.load(f)


def test_train_and_evaluate_leaves_a_complete_run(tiny_config, tmp_path):
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(tiny_config, workdir)
  for name in ('config.json', 'folds.json', 'metrics.jsonl', 'results.json',
               workdir_lib.PREDICTIONS_FILE):
    assert os.path.isfile(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert '2' in os.listdir(os.path.join(workdir, 'checkpoints', 'latest'))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert [line['epoch'] for line in lines] == [1, 2, 2]
  assert all(np.isfinite(line['train_loss']) for line in lines[:2])
  # Every image of the test fold is scored once, with consistent columns.
  with open(os.path.join(workdir, 'folds.json')) as f:
    folds = json.load(f)
  test_names = sorted(image['filename'] for image in folds['images']
                      if image['fold'] == tiny_config.fold)
  with open(os.path.join(workdir, workdir_lib.PREDICTIONS_FILE)) as f:
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
  with open(tmp_path / 'run' / workdir_lib.PREDICTIONS_FILE) as f:
    true_mm = np.array([float(r['hc_mm_true']) for r in csv.DictReader(f)])
  baseline_mm = np.abs(true_mm - true_mm.mean()).mean()  # Optimistic baseline.
  assert results['test_mae_mm'] < 0.6 * baseline_mm, (results, baseline_mm)


def _num_lines(path):
  try:
    with open(path) as f:
      return sum(1 for line in f if line.strip())
  except FileNotFoundError:
    return 0


# A losses module for the runs a test interrupts: mse, with each step held
# for HC_JAX_TEST_STEP_SECONDS (0 when unset) in a host callback, so that a
# signal lands in the middle of an epoch; the values are mse's.
_SLOW_LOSSES = """
import os, time
import jax
from hc_jax import losses

def _hold():
  time.sleep(float(os.environ.get('HC_JAX_TEST_STEP_SECONDS', '0')))

@losses.register('slow_mse')
def slow_mse(predictions, targets, mask=None):
  jax.debug.callback(_hold)
  return losses.mse(predictions, targets, mask)
"""


def _epoch_lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items()
             if not k.endswith('seconds')} for line in f]


@pytest.mark.parametrize('stop, checkpoint_every_seconds', [
    ('kill', 0), pytest.param('kill', 1e6, marks=pytest.mark.slow),
    pytest.param('ctrl-c', 1e6, marks=pytest.mark.slow)])
def test_resume_after_kill_matches_uninterrupted_run(
    tiny_config, tmp_path, stop, checkpoint_every_seconds):
  # kill, 0: the latest checkpoint after every epoch, killed after epoch 2's.
  # kill, 1e6: none before the end, killed after epoch 3: the rerun starts
  # over and must drop the best checkpoints the killed run left (~40 s).
  # ctrl-c, 1e6: SIGINT in epoch 2 (steps held 0.4 s each): the run saves
  # that step, says so and exits within seconds; the rerun resumes there.
  flags = config_flags(tiny_config) + [
      '--config.num_epochs=5',
      f'--config.checkpoint_every_seconds={checkpoint_every_seconds}']
  if stop == 'ctrl-c':
    (tmp_path / 'slow_losses.py').write_text(_SLOW_LOSSES)
    flags += ['--config.loss=slow_mse',
              f'--losses_module={tmp_path / "slow_losses.py"}']
  whole = _run_main(tmp_path / 'whole', flags)
  whole_out, whole_err = whole.communicate(timeout=300)
  assert whole.returncode == 0, whole_err[-2000:]
  assert 'starting: nothing to resume' in whole_out

  killed_dir = tmp_path / 'killed'
  if stop == 'ctrl-c':
    killed = _run_main(killed_dir, flags,
                       env={'HC_JAX_TEST_STEP_SECONDS': '0.4'})
    for line in iter(killed.stdout.readline, ''):
      if line.startswith('epoch 1: val'):
        break
    time.sleep(0.5)
    signalled = time.time()
    killed.send_signal(signal.SIGINT)
    _, err = killed.communicate(timeout=60)
    seconds = time.time() - signalled
    assert killed.returncode == 130, err[-2000:]
    assert seconds < 10, seconds  # One or two 0.4 s steps, a save, the exit.
    assert 'Traceback' not in err
    assert re.fullmatch(r'interrupted in epoch 2 at step [1-4]/5: saved; run '
                        'the same command to resume',
                        err.splitlines()[-1]), err[-2000:]
    assert len(os.listdir(killed_dir / 'checkpoints' / 'interrupted')) == 1
    assert not os.listdir(killed_dir / 'checkpoints' / 'latest')
  else:
    killed = _run_main(killed_dir, flags)
    if checkpoint_every_seconds:
      ready = lambda: _num_lines(killed_dir / 'metrics.jsonl') >= 3
    else:
      # Epoch 2's checkpoint complete: its manifest is written last (the
      # folder alone can exist before; a kill then resumes after epoch 1).
      ready = (killed_dir / 'checkpoints' / 'latest' / '2' /
               manifest.MANIFEST_FILE).exists
    deadline = time.time() + 240
    while not ready() and killed.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    if checkpoint_every_seconds:
      assert not os.listdir(killed_dir / 'checkpoints' / 'latest')
      assert os.listdir(killed_dir / 'checkpoints' / 'best')
  assert not (killed_dir / workdir_lib.RESULTS_FILE).exists(), 'finished early'

  resumed = _run_main(killed_dir, flags)
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err[-2000:]
  if stop == 'ctrl-c':
    assert re.search(r'^resuming in epoch 2 at step [1-4]/5$', out, re.M), out
  elif checkpoint_every_seconds:
    assert 'starting: nothing to resume' in out
  else:  # Killed once epoch 2's checkpoint was there, or a little later.
    assert re.search(r'^resuming after epoch [2-4]$', out, re.M), out
  expected, actual = _results(tmp_path / 'whole'), _results(killed_dir)
  for key in RESULT_KEYS + ('selected_epoch',):
    assert actual[key] == pytest.approx(expected[key], rel=1e-4), key
  lines = _epoch_lines(killed_dir)
  assert [line['epoch'] for line in lines] == [1, 2, 3, 4, 5, 5]
  if stop == 'ctrl-c':  # The epoch it stopped in trained on the same losses.
    assert lines == _epoch_lines(tmp_path / 'whole')


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path,
                                                       monkeypatch, capsys):
  from hc_jax import losses  # pylint: disable=import-outside-toplevel
  from hc_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / 'run'
  flags = ['--config=configs/default.py', f'--workdir={workdir}',
           *config_flags(tiny_config), '--config.tune_malloc=False']
  assert main_lib.main(flags + ['--config.num_epochs=1']) == 0
  # Extended by two epochs, the loss turns NaN in epoch 2.
  monkeypatch.setitem(losses.LOSSES, 'mse',
                      lambda predictions, targets: np.nan * predictions.sum())
  capsys.readouterr()
  assert main_lib.main(flags + ['--config.num_epochs=3']) == 2
  err = capsys.readouterr().err
  assert 'loss is' in err and 'at step' in err and 'Traceback' not in err
  assert sorted(os.listdir(workdir / 'checkpoints' / 'latest')) == ['1']


@pytest.mark.parametrize('flag, message', [
    ('--config.model=resnet18', 'model must be one of'),
    ('--config.loss=l1', 'loss must be one of'),
    ('--config.fold=5', 'fold must be in [0, 4]'),
    ('--config.checkpoint_every_seconds=-1', 'checkpoint_every_seconds must'),
    ('--config.data.hc18_dir=/no/such/dir', 'holds no'),
])
def test_bad_config_gives_one_clear_line(tiny_config, tmp_path, capsys, flag,
                                         message):
  # In this process: the command's own code path, without a JAX start-up per
  # case (tests/test_cli.py runs the command as a process).
  from hc_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  assert main_lib.main(['--config=configs/default.py',
                        f'--workdir={tmp_path / "run"}',
                        *config_flags(tiny_config), flag]) == 2
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  assert message in err.strip().splitlines()[-1]
  assert not (tmp_path / 'run').exists()  # Refused before anything is written.


def test_misspelt_config_field_is_an_error(tiny_config, tmp_path):
  process = _run_main(tmp_path / 'run', ['--config.num_epoch=3'])
  _, err = process.communicate(timeout=120)
  assert process.returncode != 0 and 'num_epoch' in err


def test_one_and_eight_devices_agree(tiny_config, tmp_path, capsys):
  from hc_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  flags = config_flags(tiny_config)
  # Eight devices in a command of their own, one in this process meanwhile.
  process = _run_main(tmp_path / 'devices8', flags, env={
      'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert jax.device_count() == 1
  assert main_lib.main(['--config=configs/default.py',
                        f'--workdir={tmp_path / "devices1"}', *flags]) == 0
  assert '1 cpu device(s)' in capsys.readouterr().out
  out, err = process.communicate(timeout=300)
  assert process.returncode == 0, err[-2000:]
  assert '8 cpu device(s)' in out
  runs = {devices: _results(tmp_path / f'devices{devices}')
          for devices in (1, 8)}
  for key in RESULT_KEYS:
    assert runs[8][key] == pytest.approx(runs[1][key], rel=1e-3), key


@pytest.mark.parametrize('backend, layers', [('cpu', 'fast'), ('gpu', 'plain'),
                                             ('tpu', 'plain')])
def test_fast_layers_only_on_cpu(tiny_config, monkeypatch, backend, layers):
  monkeypatch.setattr(train.jax, 'default_backend', lambda: backend)
  for name in ('cnn_263k', 'cnn_1m', 'vgg16', 'resnet50'):
    tiny_config.model = name
    assert step_lib.create_model(tiny_config).layers == layers, name


def test_epoch_is_selected_on_validation_never_on_test(tiny_config, tmp_path,
                                                       monkeypatch):
  """Only the validation part is scored while training; the test fold is
  scored once, at the end, with the epoch validation selected."""
  from hc_jax.training import trainer  # pylint: disable=import-outside-toplevel
  parts = []
  original = trainer.Trainer._predict

  def spy(self, state, part, *args):
    parts.append(part)
    return original(self, state, part, *args)

  monkeypatch.setattr(trainer.Trainer, '_predict', spy)
  tiny_config.num_epochs = 4
  tiny_config.learning_rate = 3e-3
  results = train.train_and_evaluate(tiny_config, str(tmp_path / 'run'))
  assert parts == ['val'] * 4 + ['test']
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    lines = [json.loads(line) for line in f][:4]
  with open(tmp_path / 'run' / 'folds.json') as f:
    folds = json.load(f)
  num_val = len(folds['validation'][tiny_config.fold]['filenames'])
  val_mae = [line['val_mae_mm'] for line in lines]
  assert results['selected_epoch'] == 1 + int(np.argmin(val_mae))
  assert results['val_mae_mm'] == pytest.approx(min(val_mae))
  assert num_val and {line['val_num_images'] for line in lines} == {num_val}


@contextlib.contextmanager
def _compiled_functions():
  """The names of the functions XLA compiles while the block runs (a
  persistent-cache hit counts too), from JAX's compile events."""
  names = []

  def listen(event, duration, **kwargs):
    del duration  # Unused.
    if event == '/jax/core/compile/backend_compile_duration':
      names.append(str(kwargs.get('fun_name', '?')))

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def _step_compiles(names):
  """How many of `names` are the training step (one member's `train_step`,
  or several members' `members_train_step`)."""
  return sum(step_lib.train_step.__name__ in name for name in names)


def test_a_run_compiles_its_train_step_once(tiny_config, tmp_path):
  with _compiled_functions() as names:
    train.train_and_evaluate(tiny_config, str(tmp_path / 'run'))
  assert any('members_predict' in name for name in names), names
  assert _step_compiles(names) == 1, names


def test_auto_members_per_call_compiles_each_way_once(tiny_config, tmp_path):
  """'auto' times vmap and lax.map, each compiled once as the step that
  training then calls (not again for training)."""
  configs = []
  for fold in (0, 1):
    config = tiny_config.copy_and_resolve_references()
    config.fold, config.num_epochs, config.members_per_call = fold, 1, 'auto'
    configs.append(config)
  with _compiled_functions() as names:
    results = train.train_members(
        configs, [str(tmp_path / f'm{fold}') for fold in (0, 1)])
  assert _step_compiles(names) == 2, names
  assert results[0]['members_per_call'] in ('vmap', 'map')


def test_members_trained_together_match_each_trained_alone(tiny_config,
                                                           tmp_path):
  """Two folds and a second loss as members of one step (lax.map): each
  ends as it does alone."""
  configs = []
  for fold, loss in ((0, 'mse'), (1, 'mse'), (0, 'huber')):
    config = tiny_config.copy_and_resolve_references()
    config.fold, config.loss, config.members_per_call = fold, loss, 'map'
    configs.append(config)
  together = train.train_members(
      configs, [str(tmp_path / f'm{i}') for i in range(3)])
  alone = train.train_and_evaluate(configs[2], str(tmp_path / 'alone'))
  for key in RESULT_KEYS + ('selected_epoch', 'normaliser_px'):
    assert together[2][key] == pytest.approx(alone[key], rel=1e-4), key
  assert together[0]['test_mae_mm'] != together[2]['test_mae_mm']
  assert [r['fold'] for r in together] == [0, 1, 0]
  with pytest.raises(ValueError, match='may differ only in'):
    other = tiny_config.copy_and_resolve_references()
    other.learning_rate = 0.5
    train.train_members([tiny_config, other],
                        [str(tmp_path / 'x'), str(tmp_path / 'y')])


def test_a_diverging_member_is_frozen_and_the_others_go_on(
    tiny_config, tmp_path, monkeypatch):
  from hc_jax import losses  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(losses.LOSSES, 'mae',
                      lambda predictions, targets: np.nan * predictions.sum())
  configs = []
  for loss in ('mse', 'mae'):
    config = tiny_config.copy_and_resolve_references()
    config.loss = loss
    configs.append(config)
  results = train.train_members(configs, [str(tmp_path / 'ok'),
                                          str(tmp_path / 'nan')])
  assert results[0]['diverged_epoch'] is None
  assert np.isfinite(results[0]['test_mae_mm'])
  assert results[1]['diverged_epoch'] == 1
  assert 'test_mae_mm' not in results[1]
  assert (tmp_path / 'nan' / 'diverged.json').exists()


def test_a_finished_run_is_left_alone_unless_rescored(tiny_config, tmp_path,
                                                      capsys):
  workdir = tmp_path / 'run'
  first = train.train_and_evaluate(tiny_config, str(workdir))
  metrics = (workdir / 'metrics.jsonl').read_text()
  events = sorted(os.listdir(workdir / 'tensorboard'))
  again = train.train_and_evaluate(tiny_config, str(workdir))
  assert 'already finished' in capsys.readouterr().out
  assert again == first
  assert (workdir / 'metrics.jsonl').read_text() == metrics
  assert sorted(os.listdir(workdir / 'tensorboard')) == events
  tiny_config.rescore = True
  rescored = train.train_and_evaluate(tiny_config, str(workdir))
  for key in RESULT_KEYS:
    assert rescored[key] == pytest.approx(first[key], rel=1e-5)
  assert rescored['train_seconds'] == first['train_seconds']  # The training's.
  assert (workdir / 'metrics.jsonl').read_text() == metrics


def test_a_run_that_fails_at_the_start_leaves_nothing(tiny_config, tmp_path):
  tiny_config.data.hc18_dir = str(tmp_path / 'missing')
  with pytest.raises(ValueError, match='holds no'):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
