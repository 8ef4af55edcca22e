"""hc_jax.training.checkpoint: kills, damaged files and full disks during a run."""

import errno
import json
import os
import random
import re
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from hc_jax.training import checkpoint
from hc_jax.training import manifest
from hc_jax.training import metric_log


def _state(value):
  return {'w': np.full((3,), float(value), np.float32),
          'b': {'x': np.arange(300, dtype=np.float32) * value}}


def _assert_state(state, value):
  np.testing.assert_array_equal(state['w'], _state(value)['w'])
  np.testing.assert_array_equal(state['b']['x'], _state(value)['b']['x'])


def _progress(epoch, best_epoch):
  return {'epoch': epoch, 'best': {'epoch': best_epoch, 'val_mae_mm': 1.0}}


def _run(workdir, epochs):
  """Saves (epoch, is_best, latest) as training does; returns the manager."""
  ckpt = checkpoint.Checkpoints(workdir)
  best = 0
  for epoch, is_best, latest in epochs:
    best = epoch if is_best else best
    ckpt.save(epoch, _state(epoch), _progress(epoch, best), is_best=is_best,
              latest=latest)
  return ckpt


def _resume(workdir):
  ckpt = checkpoint.Checkpoints(workdir)
  state, progress = ckpt.restore_latest(_state(-1))
  ckpt.drop_after(progress.get('epoch', 0))
  return ckpt, state, progress


def _step_dir(workdir, kind, step):
  return os.path.join(workdir, 'checkpoints', kind, str(step))


def _damage(step_dir, rng, mode=None, file=None):
  """Truncates, overwrites bytes of, or deletes one file of `step_dir`;
  returns (relative path, mode)."""
  files = [os.path.relpath(os.path.join(root, name), step_dir)
           for root, _, names in os.walk(step_dir) for name in names]
  # orbax names data files at random: order them by what else they are, so
  # that a seed picks the same kind of file every time.
  files.sort(key=lambda f: (re.sub('[0-9a-f]{32}', '', f),
                            os.path.getsize(os.path.join(step_dir, f)), f))
  file = file or rng.choice(files)
  path = os.path.join(step_dir, file)
  with open(path, 'rb') as f:
    data = bytearray(f.read())
  mode = mode or rng.choice(['truncate', 'overwrite', 'delete'])
  if not data:
    mode = 'delete'
  if mode == 'delete':
    os.remove(path)
  else:
    if mode == 'truncate':
      data = data[:rng.randrange(len(data))]
    else:
      for i in range(rng.randrange(len(data)), len(data))[:8]:
        data[i] = (data[i] + rng.randrange(1, 256)) % 256
    with open(path, 'wb') as f:
      f.write(data)
  return file, mode


# Best checkpoints: which survive kills and resumes.


def test_best_named_by_a_kept_latest_survives_a_newer_best(tmp_path):
  # Latest checkpoints 1 and 6 name bests 1 and 4; best improves at 8;
  # killed at 9.
  _run(tmp_path, [(1, True, True), (2, False, False), (4, True, False),
                  (6, False, True), (8, True, False), (9, False, False)])
  ckpt, state, progress = _resume(tmp_path)
  assert progress['epoch'] == 6
  _assert_state(state, 6)
  assert ckpt.best.all_steps() == [1, 4]
  _assert_state(ckpt.restore_best(_state(-1), 4), 4)


def test_kill_between_best_and_latest_redoes_the_epoch(tmp_path):
  # Epoch 7 improves: its best checkpoint is written, the kill comes before
  # its latest one. The resumed run starts after 6 and must not keep 7.
  _run(tmp_path, [(3, True, True), (6, False, True), (7, True, False)])
  ckpt, _, progress = _resume(tmp_path)
  assert progress['epoch'] == 6 and progress['best']['epoch'] == 3
  assert ckpt.best.all_steps() == [3]


def test_latest_save_keeps_two_and_prunes_bests_neither_names(tmp_path):
  ckpt = _run(tmp_path, [(1, True, False), (2, True, False), (3, True, True),
                         (4, False, True)])
  assert ckpt.best.all_steps() == [3]
  assert ckpt.latest.all_steps() == [3, 4]
  ckpt = _run(tmp_path / 'b', [(1, True, True), (2, False, True),
                               (3, True, True)])
  assert ckpt.latest.all_steps() == [2, 3]
  assert ckpt.best.all_steps() == [1, 3]  # Latest 2 names best 1.
  ckpt.save(4, _state(4), _progress(4, 3), is_best=False)
  assert ckpt.best.all_steps() == [3]


def test_fallback_to_the_previous_latest_keeps_its_best(tmp_path, capsys):
  _run(tmp_path, [(1, True, True), (2, False, True), (3, True, True)])
  _damage(_step_dir(tmp_path, 'latest', 3), random.Random(0), 'delete',
          'progress/metadata')
  ckpt, state, progress = _resume(tmp_path)
  assert progress == _progress(2, 1)
  _assert_state(state, 2)
  assert 'progress/metadata is missing' in capsys.readouterr().err
  assert ckpt.best.all_steps() == [1] and ckpt.latest.all_steps() == [2]
  _assert_state(ckpt.restore_best(_state(-1), 1), 1)
  # The run redoes epoch 3 and saves it again.
  ckpt.save(3, _state(3), _progress(3, 1), is_best=False)
  _, state, progress = _resume(tmp_path)
  assert progress['epoch'] == 3
  _assert_state(state, 3)


def test_restore_best_of_a_missing_epoch_is_a_clear_error(tmp_path):
  ckpt = _run(tmp_path, [(1, True, True)])
  with pytest.raises(FileNotFoundError, match='epoch 5'):
    ckpt.restore_best(_state(-1), 5)
  _assert_state(ckpt.restore_best(_state(-1)), 1)


def test_restore_best_of_a_damaged_checkpoint_names_it(tmp_path):
  ckpt = _run(tmp_path, [(1, True, True), (2, False, True)])
  file, _ = _damage(_step_dir(tmp_path, 'best', 1), random.Random(1),
                    'overwrite', 'state/_METADATA')
  with pytest.raises(manifest.CheckpointError,
                     match='best checkpoint.*' + file):
    ckpt.restore_best(_state(-1), 1)


def test_no_latest_drops_every_best(tmp_path):
  _run(tmp_path, [(1, True, False), (2, True, False)])
  ckpt, _, progress = _resume(tmp_path)
  assert progress == {} and ckpt.best.all_steps() == []


# Damaged latest checkpoints: the previous one, or one clear error.


@pytest.fixture(scope='module')
def three_epochs(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('three_epochs'))
  _run(workdir, [(1, True, True), (2, False, True), (3, False, True)])
  return workdir


@pytest.mark.parametrize('seed', range(16))
def test_damaged_latest_falls_back_or_fails_clearly(three_epochs, tmp_path,
                                                    seed, capsys):
  rng = random.Random(seed)
  workdir = str(tmp_path / 'run')
  shutil.copytree(three_epochs, workdir)
  damaged = {3: _damage(_step_dir(workdir, 'latest', 3), rng)}
  if seed % 4 == 3:  # Both kept checkpoints damaged.
    damaged[2] = _damage(_step_dir(workdir, 'latest', 2), rng)
  # Without its manifest a checkpoint is not verified (as after a kill right
  # after orbax finished it), so it is not used either; with only such ones
  # left, the run starts over.
  usable = [step for step in (3, 2) if step not in damaged]
  unverified = all(d == (manifest.MANIFEST_FILE, 'delete')
                   for d in damaged.values())
  ckpt = checkpoint.Checkpoints(workdir)
  if not usable and unverified:
    state, progress = ckpt.restore_latest(_state(-1))
    assert progress == {}
    _assert_state(state, -1)
    assert 'starting over' in capsys.readouterr().err
    return
  if not usable:
    with pytest.raises(manifest.CheckpointError,
                       match='no checkpoint in .* can be restored'):
      ckpt.restore_latest(_state(-1))
    return
  state, progress = ckpt.restore_latest(_state(-1))
  assert progress['epoch'] == usable[0], damaged
  _assert_state(state, usable[0])
  err = capsys.readouterr().err
  if usable[0] == 2:
    assert damaged[3][0] in err and 'resuming from epoch 2' in err, err


def test_restore_latest_up_to_an_epoch(three_epochs):
  # Members of a run killed between their saves resume from a common epoch.
  ckpt = checkpoint.Checkpoints(three_epochs)
  state, progress = ckpt.restore_latest(_state(-1), max_epoch=2)
  assert progress['epoch'] == 2
  _assert_state(state, 2)
  state, progress = ckpt.restore_latest(_state(-1), max_epoch=1)
  assert progress == {}
  _assert_state(state, -1)


def test_unfinished_and_unchecked_checkpoints(three_epochs, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(three_epochs, workdir)
  # A save killed before orbax finished, one killed before the manifest.
  os.makedirs(os.path.join(workdir, 'checkpoints', 'latest',
                           '4.orbax-checkpoint-tmp', 'state'))
  os.remove(os.path.join(_step_dir(workdir, 'latest', 3),
                         manifest.MANIFEST_FILE))
  ckpt, state, progress = _resume(workdir)
  assert progress['epoch'] == 2  # 3 cannot be verified.
  _assert_state(state, 2)
  ckpt.save(3, _state(3), _progress(3, 1), is_best=False)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', 'latest'))) \
      == ['2', '3']


# Failed writes: the earlier checkpoints stay usable.


def _no_space(*args, **kwargs):
  raise OSError(errno.ENOSPC, 'No space left on device')


async def _no_space_async(*args, **kwargs):
  _no_space()


@pytest.mark.parametrize('where', ['orbax', 'manifest', 'best'])
def test_full_disk_keeps_the_earlier_checkpoints(three_epochs, tmp_path,
                                                 monkeypatch, capfd, where):
  """And stderr gets no orbax log or traceback: the error is the one line
  the trainer prints; what orbax logged is in checkpoints/orbax.log."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(three_epochs, workdir)
  ckpt = checkpoint.Checkpoints(workdir)
  with monkeypatch.context() as patch:
    if where == 'manifest':
      patch.setattr(manifest, 'write', _no_space)
    else:  # The progress is written while (after) the state is.
      patch.setattr(ocp.handlers.JsonCheckpointHandler, '_save_fn',
                    _no_space_async)
    with pytest.raises(manifest.CheckpointError,
                       match='could not save epoch 4 .*No space left'):
      ckpt.save(4, _state(4), _progress(4, 4 if where == 'best' else 1),
                is_best=where == 'best')
  err = capfd.readouterr().err
  assert 'Traceback' not in err and 'No space' not in err, err
  for kind, steps in (('latest', ['2', '3']), ('best', ['1'])):
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', kind))) \
        == steps, kind
  ckpt, state, progress = _resume(workdir)
  assert progress['epoch'] == 3
  _assert_state(state, 3)
  ckpt.save(4, _state(4), _progress(4, 1), is_best=False)
  _, state, _ = _resume(workdir)
  _assert_state(state, 4)


def test_what_orbax_logs_of_a_failed_save_goes_to_a_file(three_epochs,
                                                         tmp_path, monkeypatch,
                                                         caplog):
  """orbax logs a failed write with tracebacks from its threads (over 100
  lines for a full disk); none of it reaches the console: it is appended to
  checkpoints/orbax.log, and the error names that file."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / 'run')
  shutil.copytree(three_epochs, workdir)

  async def logs_and_fails(*args, **kwargs):
    try:
      _no_space()
    except OSError:
      absl_logging.error('thread raised an exception', exc_info=True)
      raise

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, '_save_fn',
                      logs_and_fails)
  ckpt = checkpoint.Checkpoints(workdir)
  with caplog.at_level('WARNING'):
    with pytest.raises(manifest.CheckpointError) as error:
      ckpt.save(4, _state(4), _progress(4, 1), is_best=False)
  assert not [r for r in caplog.records if r.name == 'absl'], caplog.text
  log = os.path.join(workdir, 'checkpoints', checkpoint.ORBAX_LOG)
  assert f'details in {log}' in str(error.value)
  with open(log) as f:
    text = f.read()
  assert 'thread raised an exception' in text and 'Traceback' in text


# metrics.jsonl: one line per epoch, whatever point a run died at.


def _epochs(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [('test' if 'test_mae_mm' in r else r['epoch'])
            for r in map(json.loads, f)]


def _write_run(workdir, start, crash_at, num_epochs):
  """Writes metrics and 'checkpoints' as training does, from after epoch
  `start`; stops after `crash_at` events (None: at the end, or with a torn
  line when negative). Returns the last 'checkpointed' epoch."""
  writer = metric_log.MetricWriter(workdir, resume_epoch=start)
  events, saved = 0, start

  def crashed():
    nonlocal events
    events += 1
    return crash_at is not None and events > abs(crash_at)

  for epoch in range(start + 1, num_epochs + 1):
    if crashed():
      if crash_at < 0:
        with open(writer.path, 'a') as f:
          f.write(json.dumps({'epoch': epoch, 'train_loss': 1.0})[:9])
      return saved
    writer.write({'epoch': epoch, 'step': epoch, 'train_loss': 1.0})
    if crashed():
      return saved
    saved = epoch
  writer.write({'epoch': num_epochs, 'step': num_epochs, 'test_mae_mm': 2.0})
  writer.close()
  return saved


@pytest.mark.parametrize('crash_at', [0, 1, 2, 3, 4, 5, -1, -3, -5])
def test_metrics_have_one_line_per_epoch_after_a_crash(tmp_path, crash_at):
  workdir = str(tmp_path)
  saved = _write_run(workdir, 0, crash_at, num_epochs=3)
  _write_run(workdir, saved, None, num_epochs=3)
  assert _epochs(workdir) == [1, 2, 3, 'test']
  # Scored again without training: the test line stays.
  metric_log.MetricWriter(workdir, resume_epoch=3).close()
  assert _epochs(workdir) == [1, 2, 3, 'test']
  # Continued to a 4th epoch: the new test line replaces the old one.
  _write_run(workdir, 3, None, num_epochs=4)
  assert _epochs(workdir) == [1, 2, 3, 4, 'test']


def test_a_line_of_metrics_damaged_into_bytes_that_are_not_utf8_is_dropped(
    tmp_path, capsys):
  workdir = str(tmp_path)
  _write_run(workdir, 0, None, num_epochs=3)
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path, 'rb') as f:
    lines = f.read().split(b'\n')
  lines[1] = lines[1][:5] + b'\xa9\xff' + lines[1][7:]
  with open(path, 'wb') as f:
    f.write(b'\n'.join(lines))
  capsys.readouterr()
  metric_log.MetricWriter(workdir, resume_epoch=3).close()
  assert _epochs(workdir) == [1, 3, 'test']
  assert f'dropped 1 unreadable line(s) of {path}' in capsys.readouterr().err


# The real trainer, resumed from a damaged checkpoint.


@pytest.mark.slow
@pytest.mark.parametrize('seed', [0, 2])
def test_training_resumes_from_a_damaged_checkpoint(tiny_config, tmp_path,
                                                    capsys, seed):
  from hc_jax.training import train  # pylint: disable=import-outside-toplevel
  from hc_jax import workdir as workdir_lib
  workdir = str(tmp_path / 'run')
  tiny_config.num_epochs = 3
  tiny_config.checkpoint_every_seconds = 0.0
  train.train_and_evaluate(tiny_config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', 'latest'))) \
      == ['2', '3']
  rng = random.Random(seed)
  damaged = [_damage(_step_dir(workdir, 'latest', 3), rng)]
  if seed == 2:  # Both kept checkpoints damaged.
    damaged.append(_damage(_step_dir(workdir, 'latest', 2), rng))
  # Without its results the run is unfinished, and continues to epoch 4.
  os.remove(os.path.join(workdir, workdir_lib.RESULTS_FILE))
  capsys.readouterr()
  tiny_config.num_epochs = 4
  try:
    results = train.train_and_evaluate(tiny_config, workdir)
  except manifest.CheckpointError as e:
    assert seed == 2 and 'no checkpoint' in str(e), (damaged, e)
    assert not os.path.exists(os.path.join(workdir, '.lock'))
    return
  resumed = 3 if damaged[0] == (manifest.MANIFEST_FILE, 'delete') else 2
  out = capsys.readouterr().out
  assert f'resuming after epoch {resumed}' in out, (damaged, out)
  assert _epochs(workdir) == [1, 2, 3, 4, 'test']
  assert 1 <= results['selected_epoch'] <= 4
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', 'latest'))) \
      == ['3', '4']
