"""Random faults, seeded: after each, a rerun finishes as if nothing happened
or stops with one line and exit status 2.

Each trial starts from a copy of one uninterrupted reference run (and of its
prepared-data cache) and does one of

- a kill: `python -m hc_jax.main` runs as a subprocess, from a warm cache,
  one without its .npz (prepared again from the TFDS build) or none (TFDS
  builds HC18), and gets SIGKILL after a drawn delay from its start or from
  its first checkpoint, metrics line or predictions file;
- byte damage: in the copy of the finished run, made unfinished (no
  results.json, as if killed after its last checkpoint), a drawn range of
  bytes of one drawn file is flipped, scrambled or cut off: a checkpoint file,
  metrics.jsonl, the lock a killed process left, the prepared .npz or
  file_hashes.json of the cache, or a file of its TFDS build (with the .npz
  removed, so that the build is read).

Then the same command runs again (in this process, as test_reliability.py
runs it) and must finish with the reference's results.json figures and
predictions_test.csv (training is deterministic on a CPU), as the README
promises after a kill, a damaged cache, metrics line or lock. Only damage to
a checkpoint may instead stop with one `error: ...` line and exit status 2
(no verified checkpoint left to resume from). Never a traceback, never
another result. The fast loop runs by default; `-m slow` runs a longer one.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from hc_jax import main as main_lib
from hc_jax import workdir as workdir_lib

KINDS = ('checkpoint', 'metrics', 'lock', 'cache', 'tfds')


def _flags(hc18_dir, cache_dir):
  return ['--config=configs/default.py', f'--config.data.hc18_dir={hc18_dir}',
          f'--config.data.cache_dir={cache_dir}', '--config.image_size=32',
          '--config.num_epochs=2', '--config.batch_size=8',
          '--config.eval_batch_size=8',
          '--config.checkpoint_every_seconds=0', '--config.tune_malloc=False']


def _figures(workdir):
  """results.json without its timings, and the predictions CSV."""
  with open(os.path.join(workdir, workdir_lib.RESULTS_FILE)) as f:
    results = {k: v for k, v in json.load(f).items()
               if not k.endswith('seconds')}
  with open(os.path.join(workdir, workdir_lib.PREDICTIONS_FILE)) as f:
    return results, f.read()


@pytest.fixture(scope='module')
def reference(phantom_hc18, tmp_path_factory):
  """One uninterrupted run with its own cache: (hc18 dir, workdir, cache,
  figures)."""
  root = tmp_path_factory.mktemp('faults_reference')
  workdir, cache = str(root / 'run'), str(root / 'cache')
  hc18_dir = phantom_hc18[0]
  assert main_lib.main([f'--workdir={workdir}',
                        *_flags(hc18_dir, cache)]) == 0
  return hc18_dir, workdir, cache, _figures(workdir)


def _files(top, skip=()):
  return sorted(os.path.join(d, n) for d, _, names in os.walk(top)
                for n in names if n not in skip)


def _cache_files(cache, tfds):
  return [p for p in _files(cache)
          if (os.sep + 'tfds' + os.sep in p) == tfds and
          not os.path.basename(p).startswith('incomplete')]


def _damage(rng, path):
  """Flips, scrambles or cuts off a drawn range of bytes of `path`."""
  size = os.path.getsize(path)
  how = rng.choice(('flip', 'scramble', 'truncate')) if size else 'truncate'
  if how == 'truncate':
    os.truncate(path, rng.randrange(size) if size else 0)
    return f'truncate {size}->{os.path.getsize(path)}'
  start = rng.randrange(size)
  length = rng.randint(1, min(64, size - start))
  with open(path, 'r+b') as f:
    f.seek(start)
    data = f.read(length)
    f.seek(start)
    f.write(bytes(b ^ (0xFF if how == 'flip' else rng.randint(1, 255))
                  for b in data))
  return f'{how} {length} at {start} of {size}'


def _dead_pid():
  process = subprocess.Popen([sys.executable, '-c', 'pass'])
  process.wait()
  return process.pid


def _damage_trial(rng, reference, trial_dir, kind):
  _, ref_workdir, ref_cache, _ = reference
  workdir, cache = str(trial_dir / 'run'), str(trial_dir / 'cache')
  shutil.copytree(ref_workdir, workdir)
  shutil.copytree(ref_cache, cache)
  os.remove(os.path.join(workdir, workdir_lib.RESULTS_FILE))
  if kind == 'lock':  # As a killed process leaves it.
    with open(os.path.join(workdir, '.lock'), 'w') as f:
      json.dump({'pid': _dead_pid(), 'host': socket.gethostname(),
                 'started': '2026-01-01T00:00:00+00:00'}, f)
    candidates = [os.path.join(workdir, '.lock')]
  elif kind == 'checkpoint':
    candidates = _files(os.path.join(workdir, 'checkpoints'),
                        skip=('orbax.log',))
  elif kind == 'metrics':
    candidates = [os.path.join(workdir, 'metrics.jsonl')]
  else:
    candidates = _cache_files(cache, tfds=kind == 'tfds')
  path = rng.choice(candidates)
  what = _damage(rng, path)
  if kind == 'lock':  # Left an hour ago, past the grace of a lock being made.
    os.utime(path, (time.time() - 3600,) * 2)
  if kind == 'tfds':  # Read the build: no prepared .npz to take instead.
    for npz in _cache_files(cache, tfds=False):
      if npz.endswith('.npz'):
        os.remove(npz)
  return workdir, cache, f'{kind}: {what} of {os.path.relpath(path, trial_dir)}'


def _poll(ready, process, timeout_s=240.0):
  deadline = time.time() + timeout_s
  while not ready() and process.poll() is None and time.time() < deadline:
    time.sleep(0.01)


def _kill_trial(rng, reference, trial_dir, kind=None):  # pylint: disable=unused-argument
  hc18_dir, _, ref_cache, _ = reference
  workdir, cache = str(trial_dir / 'run'), str(trial_dir / 'cache')
  start = rng.choice(('warm', 'no npz', 'empty'))
  if start == 'empty':
    os.makedirs(cache)
  else:
    shutil.copytree(ref_cache, cache)
    if start == 'no npz':
      for npz in _cache_files(cache, tfds=False):
        if npz.endswith('.npz'):
          os.remove(npz)
  after = rng.choice(('launch', 'checkpoint', 'metrics', 'predictions'))
  delay = rng.uniform(0.0, 12.0 if after == 'launch' else 1.0)
  ready = {
      'launch': lambda: True,
      'checkpoint': lambda: os.path.isdir(os.path.join(workdir, 'checkpoints')),
      'metrics': lambda: os.path.isfile(os.path.join(workdir, 'metrics.jsonl')),
      'predictions': lambda: os.path.isfile(
          os.path.join(workdir, workdir_lib.PREDICTIONS_FILE)),
  }[after]
  with open(trial_dir / 'killed.log', 'w') as log:
    process = subprocess.Popen(
        [sys.executable, '-m', 'hc_jax.main', f'--workdir={workdir}',
         *_flags(hc18_dir, cache)], cwd=REPO, stdout=log, stderr=log)
    _poll(ready, process)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    status = process.wait()
  finished = 'finished first' if status == 0 else 'killed'
  return workdir, cache, (f'kill ({start} cache) {delay:.2f} s after '
                          f'{after}: {finished}')


def _rerun(reference, workdir, cache, capfd):
  capfd.readouterr()
  status = main_lib.main([f'--workdir={workdir}',
                          *_flags(reference[0], cache)])
  return status, capfd.readouterr().err


def _check(reference, workdir, status, err, what, may_refuse=False):
  """How the rerun ended; fails unless it gave the reference's figures (or,
  where `may_refuse`, one error line and exit status 2)."""
  assert 'Traceback' not in err, f'{what}\n{err[-4000:]}'
  if status == 2 and may_refuse:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('error: ')]
    assert len(errors) == 1 and lines[-1] == errors[0], f'{what}\n{err}'
    return f'refused: {errors[0][:160]}'
  assert status == 0, f'{what}: exit status {status}\n{err[-4000:]}'
  assert _figures(workdir) == reference[3], f'{what}: another result\n{err}'
  warnings = [line for line in err.splitlines() if line.startswith('warning')]
  return 'same result' + (f' ({warnings[0][:120]})' if warnings else '')


def _loop(reference, tmp_path, capfd, seed, kills, damages, show=False):
  rng = random.Random(seed)
  kinds = []  # Every kind of file once in each len(KINDS) damages.
  while len(kinds) < damages:
    kinds += rng.sample(KINDS, len(KINDS))
  trials = [None] * kills + kinds[:damages]
  rng.shuffle(trials)
  report = []
  for i, kind in enumerate(trials):
    trial_dir = tmp_path / f'trial{i}'
    trial_dir.mkdir()
    make = _kill_trial if kind is None else _damage_trial
    workdir, cache, what = make(rng, reference, trial_dir, kind)
    status, err = _rerun(reference, workdir, cache, capfd)
    ended = _check(reference, workdir, status, err, what,
                   may_refuse=kind == 'checkpoint')
    report.append(f'{i}: {what} -> {ended}')
    shutil.rmtree(trial_dir)
  if show:  # pytest -s: what each trial did and how the rerun ended.
    with capfd.disabled():
      print('\n' + '\n'.join(report))


def _shown(request):
  return request.config.getoption('capture') == 'no'


def test_random_faults_fast(reference, tmp_path, capfd, request):
  _loop(reference, tmp_path, capfd, seed=0, kills=1, damages=len(KINDS),
        show=_shown(request))


@pytest.mark.slow
@pytest.mark.parametrize('seed', [1, 2, 3])
def test_random_faults_long(reference, tmp_path, capfd, request, seed):
  _loop(reference, tmp_path, capfd, seed=seed, kills=4, damages=12,
        show=_shown(request))


def test_a_refusal_passes_only_where_it_is_allowed():
  reference = (None, None, None, ({'val_mae_mm': 1.0}, 'csv'))
  err = 'error: no verified checkpoint in run/checkpoints\n'
  assert _check(reference, 'run', 2, err, 'checkpoint',
                may_refuse=True).startswith('refused')
  with pytest.raises(AssertionError, match='exit status 2'):
    _check(reference, 'run', 2, err, 'kill')


def test_the_damage_is_what_it_says(tmp_path):
  path = tmp_path / 'file'
  path.write_bytes(bytes(range(200)))
  rng = random.Random(0)
  for _ in range(20):
    before = path.read_bytes()
    what = _damage(rng, str(path))
    after = path.read_bytes()
    assert after != before or not before, what
