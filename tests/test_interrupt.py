"""Ctrl-C and SIGTERM during training: the run saves where it is, says so in
one line, and the same command resumes it to an uninterrupted run's end.

The signals are sent by this process to itself at a chosen step (in place of
a user's key press), so the step where the run stops is known;
test_train.py sends them to a training subprocess.
"""

import json
import os
import signal

import pytest

from conftest import config_flags
from hc_jax import main as main_lib
from hc_jax import workdir as workdir_lib
from hc_jax.training import interrupt
from hc_jax.training import trainer

AGAIN = 'run the same command to resume'


def _signal_at(monkeypatch, epoch, step, signum=signal.SIGINT, times=1):
  """Sends `signum` to this process `times` times once the step `step`
  (from 0) of `epoch` is dispatched."""
  progress = trainer.Trainer._progress  # pylint: disable=protected-access

  def signalling(self, e, i, loss, **kwargs):
    if (e, i) == (epoch, step):
      for _ in range(times):
        os.kill(os.getpid(), signum)
    return progress(self, e, i, loss, **kwargs)

  monkeypatch.setattr(trainer.Trainer, '_progress', signalling)


def _flags(config, workdir, epochs=2):
  return ['--config=configs/default.py', f'--workdir={workdir}',
          *config_flags(config), f'--config.num_epochs={epochs}',
          '--config.checkpoint_every_seconds=1e6',
          '--config.tune_malloc=False']


def _lines(workdir):
  with open(os.path.join(workdir, workdir_lib.METRICS_FILE)) as f:
    return [{k: v for k, v in json.loads(line).items()
             if not k.endswith('seconds')} for line in f]


def _results(workdir):
  with open(os.path.join(workdir, workdir_lib.RESULTS_FILE)) as f:
    return {k: v for k, v in json.load(f).items() if not k.endswith('seconds')}


def _steps(workdir, kind):
  folder = os.path.join(workdir, 'checkpoints', kind)
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _signal_in_validation(monkeypatch):
  """Sends SIGINT to this process as the first validation starts."""
  predict = trainer.Trainer._predict  # pylint: disable=protected-access
  sent = []

  def signalling(self, state, part, *args):
    if part == 'val' and not sent:
      sent.append(os.kill(os.getpid(), signal.SIGINT))
    return predict(self, state, part, *args)

  monkeypatch.setattr(trainer.Trainer, '_predict', signalling)


def test_ctrl_c_saves_the_step_and_the_run_resumes_exactly(
    tiny_config, tmp_path, monkeypatch, capsys):
  whole, stopped = tmp_path / 'whole', tmp_path / 'stopped'
  assert main_lib.main(_flags(tiny_config, whole)) == 0
  out = capsys.readouterr().out
  assert 'starting: nothing to resume' in out
  steps = int(out.split(' steps per epoch')[0].rsplit(' ', 1)[1])

  # Stopped after epoch 1's steps, before its validation; then in epoch 2,
  # before its third step. With checkpoint_every_seconds=1e6 nothing else
  # saves a resume point before the end.
  with monkeypatch.context() as patch:
    _signal_in_validation(patch)
    assert main_lib.main(_flags(tiny_config, stopped)) == 130
  err = capsys.readouterr().err
  assert err.splitlines()[-1] == (
      f'interrupted in epoch 1 at step {steps}/{steps}: saved; {AGAIN}')
  with monkeypatch.context() as patch:
    _signal_at(patch, epoch=2, step=1)
    assert main_lib.main(_flags(tiny_config, stopped)) == 130
  out, err = capsys.readouterr()
  assert f'resuming in epoch 1 at step {steps}/{steps}' in out
  assert err.splitlines()[-1] == (
      f'interrupted in epoch 2 at step 2/{steps}: saved; {AGAIN}')
  assert 'Traceback' not in err
  assert _steps(stopped, 'latest') == [] and len(_steps(stopped,
                                                        'interrupted')) == 1
  assert not (stopped / workdir_lib.LOCK_FILE).exists()

  assert main_lib.main(_flags(tiny_config, stopped)) == 0
  assert f'resuming in epoch 2 at step 2/{steps}' in capsys.readouterr().out
  assert _results(stopped) == _results(whole)
  assert _lines(stopped) == _lines(whole)  # The stopped epochs' losses too.
  # Older than the last epoch's latest checkpoint: gone, with its folder.
  assert not (stopped / 'checkpoints' / 'interrupted').exists()

  assert main_lib.main(_flags(tiny_config, stopped)) == 0
  assert 'already finished' in capsys.readouterr().out


@pytest.mark.parametrize('epoch, then', [
    (1, AGAIN), (2, 'run the same command to score its test fold')])
def test_ctrl_c_between_epochs_keeps_the_epoch(tiny_config, tmp_path,
                                               monkeypatch, capsys, epoch,
                                               then):
  workdir = tmp_path / 'run'
  with monkeypatch.context() as patch:
    # While the epoch is scored and saved: the run stops before the next
    # one (or, after the last, before the test fold is scored), and saves
    # the epoch as a resume point (checkpoint_every_seconds=1e6 did not).
    validate_and_save = trainer.Trainer._validate_and_save  # pylint: disable=protected-access
    patch.setattr(trainer.Trainer, '_validate_and_save',
                  _signalling_after(validate_and_save, epoch))
    assert main_lib.main(_flags(tiny_config, workdir)) == 130
  err = capsys.readouterr().err
  assert err.splitlines()[-1] == (
      f'interrupted after epoch {epoch}: saved; {then}')
  assert _steps(workdir, 'latest') == [str(epoch)]
  assert not (workdir / workdir_lib.RESULTS_FILE).exists()
  assert main_lib.main(_flags(tiny_config, workdir)) == 0
  assert f'resuming after epoch {epoch}' in capsys.readouterr().out
  assert (workdir / workdir_lib.RESULTS_FILE).exists()


def _signalling_after(validate_and_save, when):
  """`Trainer._validate_and_save` that sends SIGINT in epoch `when`'s."""

  def wrapped(self, state, val, epoch, *args):
    if epoch == when:
      os.kill(os.getpid(), signal.SIGINT)
    return validate_and_save(self, state, val, epoch, *args)

  return wrapped


def test_sigterm_is_handled_as_ctrl_c(tiny_config, tmp_path, monkeypatch,
                                      capfd):
  workdir = tmp_path / 'run'
  with monkeypatch.context() as patch:
    _signal_at(patch, epoch=1, step=1, signum=signal.SIGTERM)
    assert main_lib.main(_flags(tiny_config, workdir)) == 128 + signal.SIGTERM
  err = capfd.readouterr().err  # The handler's line is written to fd 2.
  assert 'SIGTERM: stopping after the current step' in err
  assert err.splitlines()[-1].startswith('interrupted in epoch 1 at step 2/')
  assert len(_steps(workdir, 'interrupted')) == 1
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # Restored.


def test_a_second_ctrl_c_stops_at_once_without_saving(tiny_config, tmp_path,
                                                      monkeypatch, capsys):
  workdir = tmp_path / 'run'
  with monkeypatch.context() as patch:
    _signal_at(patch, epoch=1, step=1, times=2)
    assert main_lib.main(_flags(tiny_config, workdir)) == 130
  err = capsys.readouterr().err
  assert err.splitlines()[-1] == 'error: interrupted'
  assert _steps(workdir, 'interrupted') == []
  assert not (workdir / workdir_lib.LOCK_FILE).exists()


def test_signals_outside_the_block_are_left_alone():
  before = signal.getsignal(signal.SIGINT)
  with interrupt.StopRequest() as stop:
    assert signal.getsignal(signal.SIGINT) != before
    assert not stop.requested
  assert signal.getsignal(signal.SIGINT) == before
  error = interrupt.StopRequest().error('stopped')
  assert isinstance(error, KeyboardInterrupt) and error.exit_status == 130
