"""Refused commands change nothing; resumes, caches and checkpoints are checked.

Each test here drives a run into a state a researcher meets after a mistake
or a fault (a changed config, damaged or replaced files, a read-only or full
disk) and asserts that the command either goes on with the same result or
stops with one line and exit status 2, leaving the workdir as it was.
"""

import hashlib
import os
import shutil

import pytest

from conftest import config_flags
from hc_jax import main as main_lib
from hc_jax import train


def _tiny(phantom_hc18):
  """conftest's tiny_config, for module-scoped fixtures."""
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.data.hc18_dir, config.data.cache_dir = phantom_hc18
  config.image_size = 32
  config.num_epochs = 2
  config.batch_size = 8
  config.eval_batch_size = 8
  config.log_every_steps = 1000
  config.tune_malloc = False
  return config


def _tree(workdir) -> dict[str, str]:
  """Every file below `workdir` with a digest of its bytes."""
  found = {}
  for directory, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(directory, name)
      with open(path, 'rb') as f:
        found[os.path.relpath(path, workdir)] = hashlib.sha256(
            f.read()).hexdigest()
  return found


def _main(config, workdir, *flags) -> int:
  """`python -m hc_jax.main` in this process, on configs/default.py."""
  return main_lib.main(['--config=configs/default.py', f'--workdir={workdir}',
                        *config_flags(config), '--config.tune_malloc=False',
                        *flags])


def _one_error_line(err: str) -> str:
  lines = [line for line in err.splitlines() if line.strip()]
  assert lines and 'Traceback' not in err, err[-3000:]
  assert lines[-1].startswith('error: '), err[-3000:]
  assert not [line for line in lines if line.startswith('error: ')][:-1], err
  return lines[-1]


@pytest.fixture(scope='module')
def finished_run(phantom_hc18, tmp_path_factory):
  """A finished two-epoch run of the tiny config (a resume checkpoint after
  every epoch)."""
  config = _tiny(phantom_hc18)
  config.checkpoint_every_seconds = 0.0
  workdir = str(tmp_path_factory.mktemp('finished') / 'run')
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _copy(run, tmp_path, finished=True):
  config, workdir = run
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  if not finished:  # As if killed after its last epoch's checkpoint.
    os.remove(os.path.join(copy, train.RESULTS_FILE))
  return config.copy_and_resolve_references(), copy


# A refused command writes nothing.


def _damage_every_latest(workdir):
  latest = os.path.join(workdir, 'checkpoints', 'latest')
  for step in os.listdir(latest):
    for directory, _, names in os.walk(os.path.join(latest, step)):
      for name in names:
        if name != 'hc_jax_manifest.json':
          with open(os.path.join(directory, name), 'ab') as f:
            f.write(b'\0')


@pytest.mark.parametrize('change, flags, message', [
    ('image_size', ['--config.image_size=48'], 'image_size=32 there, 48 now'),
    ('checkpoints', [], 'can be restored'),
])
def test_a_refused_rerun_of_a_finished_run_changes_nothing(
    finished_run, tmp_path, capsys, change, flags, message):
  config, workdir = _copy(finished_run, tmp_path)
  if change == 'checkpoints':
    _damage_every_latest(workdir)
  before = _tree(workdir)
  capsys.readouterr()
  assert _main(config, workdir, '--config.num_epochs=3', *flags) == 2
  assert message in _one_error_line(capsys.readouterr().err)
  assert _tree(workdir) == before
  assert not os.path.exists(os.path.join(workdir, '.lock'))


# Resuming with another config.


@pytest.mark.parametrize('flag, field', [
    ('--config.loss=mae', 'loss'),
    ('--config.learning_rate=0.01', 'learning_rate'),
    ('--config.augment.flip=False', 'augment.flip'),
    ('--config.seed=3', 'seed'),
])
def test_resuming_with_another_config_is_refused_naming_the_field(
    finished_run, tmp_path, capsys, flag, field):
  config, workdir = _copy(finished_run, tmp_path, finished=False)
  before = _tree(workdir)
  capsys.readouterr()
  assert _main(config, workdir, flag) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert 'was run with another config' in line and f'({field}=' in line, line
  assert _tree(workdir) == before


def test_resuming_may_change_the_fields_that_do_not_change_the_training(
    finished_run, tmp_path, capsys):
  config, workdir = _copy(finished_run, tmp_path, finished=False)
  assert _main(config, workdir, '--config.num_epochs=3',
               '--config.checkpoint_every_seconds=5',
               '--config.eval_batch_size=16', '--config.time_budget_s=600',
               '--config.data.pipeline=numpy') == 0
  assert 'resuming after epoch 2' in capsys.readouterr().out
  assert os.path.isfile(os.path.join(workdir, train.RESULTS_FILE))


def test_a_cosine_schedule_keeps_its_num_epochs(tmp_path):
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.lr_schedule = 'cosine'
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  from hc_jax import data  # pylint: disable=import-outside-toplevel
  data.save_json(os.path.join(workdir, train.CONFIG_FILE),
                 {**config.to_dict(), 'source_digest': 'x'})
  train.check_resume(config, workdir)
  config.num_epochs += 10
  with pytest.raises(ValueError, match='num_epochs=250 there, 260 now.*'
                     'part of the schedule'):
    train.check_resume(config, workdir)
  config.lr_schedule = 'constant'
  with pytest.raises(ValueError, match=r"lr_schedule='cosine' there"):
    train.check_resume(config, workdir)
