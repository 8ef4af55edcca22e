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
  removed, so that the build is read);
- a kill of `python -m hc_jax.predict` (predicting the run's test scans) or
  `python -m hc_jax.prepare` (exporting its prepared arrays, from a warm,
  npz-less or empty cache), after a drawn delay from its start or from the
  moment its temporary files or TFDS build appear;
- byte damage of a copy of the shipped model archive, which predict must
  refuse in one line naming it (or, where the damage hit bytes that hold no
  data, such as a zip timestamp, predict as from the intact archive);
- an edit of a finished run's config.json (resize mode, input size or
  width), which predict must refuse in one line naming the file.

Then the same command runs again (in this process, as test_reliability.py
runs it) and must either finish with the reference's results.json figures
and predictions_test.csv (training is deterministic on a CPU), predict's CSV
or prepare's arrays, or, where the trial allows it (never after a kill, a
damaged cache, metrics line or lock), stop with one `error: ...` line and
exit status 2;
never a traceback, never another result. After every rerun, nothing a killed
process left may remain in the trial's folders: no unfinished TFDS build
(`incomplete.*`) and no temporary file (`<name>.<pid>.tmp<suffix>`,
`hc_jax.leftovers`: prepared arrays, predict's hidden CSVs). The fast loop
runs by default; `-m slow` runs a longer one.
"""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from hc_jax import archive as archive_lib
from hc_jax import main as main_lib
from hc_jax import predict as predict_lib
from hc_jax import prepare as prepare_lib
from hc_jax import workdir as workdir_lib

# What a damage trial damages or edits.
KINDS = ('checkpoint', 'metrics', 'lock', 'cache', 'tfds', 'archive',
         'config')
# What a kill trial kills.
COMMANDS = ('main', 'predict', 'prepare')
# The config.json edits that change the model a run trained.
CONFIG_EDITS = ({'resize_mode': 'letterbox'}, {'image_size': 48},
                {'image_width': 48})
# What a killed process may leave: a temporary file (`leftovers.tmp_name`)
# and an unfinished TFDS build.
_TMP_FILE = re.compile(r'\.\d+\.tmp[^/]*$')
_TFDS_INCOMPLETE = 'incomplete.'


def _flags(hc18_dir, cache_dir):
  return ['--config=configs/default.py', f'--config.data.hc18_dir={hc18_dir}',
          f'--config.data.cache_dir={cache_dir}', '--config.image_size=32',
          '--config.num_epochs=2', '--config.batch_size=8',
          '--config.eval_batch_size=8',
          '--config.checkpoint_every_seconds=0', '--config.tune_malloc=False']


def _prepare_flags(hc18_dir, cache_dir, out):
  return ['--config=configs/default.py', f'--out={out}',
          f'--override=data.hc18_dir={hc18_dir}',
          f'--override=data.cache_dir={cache_dir}', '--override=image_size=32']


def _predict_flags(model, images, out):
  return [f'--workdir={model}', f'--images={images}', f'--out={out}']


def _arrays(folder):
  """The .npz files in `folder` (prepare's export), read back."""
  arrays = {}
  for name in sorted(os.listdir(folder)):
    if name.endswith('.npz'):
      with np.load(os.path.join(folder, name), allow_pickle=False) as npz:
        arrays[name] = {key: npz[key] for key in npz.files}
  return arrays


def _same_arrays(a, b):
  return a.keys() == b.keys() and all(
      a[n].keys() == b[n].keys() and all(
          np.array_equal(a[n][k], b[n][k]) for k in a[n]) for n in a)


def _read(path):
  with open(path) as f:
    return f.read()


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
  out = root / 'predicted.csv'
  images = os.path.join(hc18_dir, 'test_set')
  status = predict_lib.main(_predict_flags(workdir, images, out))
  assert status in (0, 1)
  cache_copy, export = str(root / 'export_cache'), str(root / 'export')
  shutil.copytree(cache, cache_copy)
  assert prepare_lib.main(_prepare_flags(hc18_dir, cache_copy, export)) == 0
  shutil.rmtree(cache_copy)
  return hc18_dir, workdir, cache, _figures(workdir), {
      'predict': (status, _read(out)), 'prepare': _arrays(export),
      'archive': {}}  # Predict with the shipped model, made when needed.


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


class Trial:
  """A fault made, and the rerun that follows it.

  Attributes:
    what: the fault, in words.
    command: 'main', 'predict' or 'prepare'.
    argv: the rerun's flags.
    same: `same(status)`: whether the rerun's exit status and outputs are
      the uninterrupted command's.
    names: what the error line of a refusal must name ('' for anything).
    refusal: 'may' (the rerun may stop with one line), 'must' or 'never'.
  """

  def __init__(self, what, command, argv, same, names='', refusal='may'):
    self.what, self.command, self.argv, self.same = what, command, argv, same
    self.names, self.refusal = names, refusal


def _same_run(reference, workdir):
  return lambda status: status == 0 and _figures(workdir) == reference[3]


def _same_prediction(expected, out):
  return lambda status: (status, _read(out)) == expected


def _predict_trial(rng, reference, trial_dir, kind):
  """A copy of the shipped archive, damaged, or of the run with its
  config.json edited: predict must refuse it in one line naming it."""
  hc18_dir, ref_workdir, _, _, outputs = reference
  out = str(trial_dir / 'out' / 'predicted.csv')
  os.makedirs(os.path.dirname(out))
  if kind == 'config':
    workdir = str(trial_dir / 'run')
    shutil.copytree(ref_workdir, workdir)
    path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    config = json.loads(_read(path))
    edit = rng.choice(CONFIG_EDITS)
    config.update(edit)
    with open(path, 'w') as f:
      json.dump(config, f, indent=2)
    return Trial(f'config: {edit} in run/config.json', 'predict',
                 _predict_flags(workdir, os.path.join(hc18_dir, 'test_set'),
                                out),
                 lambda status: False, names=path, refusal='must')
  name = f'{archive_lib.DEFAULT_MODEL}.npz'
  path = str(trial_dir / name)
  shutil.copyfile(archive_lib.path_of(archive_lib.DEFAULT_MODEL), path)
  what = _damage(rng, path)
  sample = os.path.join(archive_lib.SAMPLE_IMAGES_DIR, '020_HC.png')

  def same(status):  # Damage of bytes that hold nothing the model reads.
    if not outputs['archive']:  # Predicts with the intact archive, once.
      intact = str(trial_dir / 'intact' / name)
      os.makedirs(os.path.dirname(intact))
      shutil.copyfile(archive_lib.path_of(archive_lib.DEFAULT_MODEL), intact)
      expected = str(trial_dir / 'intact' / 'predicted.csv')
      outputs['archive'] = (
          predict_lib.main(_predict_flags(intact, sample, expected)),
          _read(expected))
    return _same_prediction(outputs['archive'], out)(status)

  return Trial(f'archive: {what} of {name}', 'predict',
               _predict_flags(path, sample, out), same, names=path)


def _damage_trial(rng, reference, trial_dir, kind):
  if kind in ('archive', 'config'):
    return _predict_trial(rng, reference, trial_dir, kind)
  hc18_dir, ref_workdir, ref_cache, _, _ = reference
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
  # Not an empty file (the cache's .prepare.lock): its damage is no damage.
  path = rng.choice([p for p in candidates if os.path.getsize(p)])
  what = _damage(rng, path)
  if kind == 'lock':  # Left an hour ago, past the grace of a lock being made.
    os.utime(path, (time.time() - 3600,) * 2)
  if kind == 'tfds':  # Read the build: no prepared .npz to take instead.
    for npz in _cache_files(cache, tfds=False):
      if npz.endswith('.npz'):
        os.remove(npz)
  # The README promises recovery from a damaged cache, metrics line or
  # lock; only a damaged checkpoint may leave nothing verified to resume.
  return Trial(f'{kind}: {what} of {os.path.relpath(path, trial_dir)}',
               'main', [f'--workdir={workdir}', *_flags(hc18_dir, cache)],
               _same_run(reference, workdir),
               refusal='may' if kind == 'checkpoint' else 'never')


def _poll(ready, process, timeout_s=240.0, every_s=0.01):
  deadline = time.time() + timeout_s
  while not ready() and process.poll() is None and time.time() < deadline:
    time.sleep(every_s)


def _leftovers(top):
  """Unfinished TFDS builds and temporary files (`leftovers.tmp_name`)
  below `top`."""
  found = []
  for folder, dirs, names in os.walk(top):
    found += [os.path.join(folder, n) for n in dirs
              if n.startswith(_TFDS_INCOMPLETE)]
    found += [os.path.join(folder, n) for n in names if _TMP_FILE.search(n)]
  return found


def _start_cache(rng, ref_cache, cache):
  """A copy of the reference cache, without its .npz, or no cache."""
  start = rng.choice(('warm', 'no npz', 'empty'))
  if start == 'empty':
    os.makedirs(cache)
  else:
    shutil.copytree(ref_cache, cache)
    if start == 'no npz':
      for npz in _cache_files(cache, tfds=False):
        if npz.endswith('.npz'):
          os.remove(npz)
  return start


def _kill_trial(rng, reference, trial_dir, command):
  """Runs `command` as a subprocess and SIGKILLs it at a drawn moment."""
  hc18_dir, ref_workdir, ref_cache, _, outputs = reference
  cache = str(trial_dir / 'cache')
  start = 'warm'
  # A moment: (its name, whether it came, the most seconds to wait after).
  if command == 'predict':
    out = str(trial_dir / 'out' / 'predicted.csv')
    os.makedirs(os.path.dirname(out))
    argv = _predict_flags(ref_workdir, os.path.join(hc18_dir, 'test_set'),
                          out)
    same = _same_prediction(outputs['predict'], out)
    moments = {
        'launch': (lambda: True, 12.0),
        'its temporary CSV': (lambda: bool(_leftovers(os.path.dirname(out))),
                              0.0)}
  elif command == 'prepare':
    start = _start_cache(rng, ref_cache, cache)
    export = str(trial_dir / 'export')
    argv = _prepare_flags(hc18_dir, cache, export)
    same = lambda status: status == 0 and _same_arrays(  # pylint: disable=g-long-lambda
        _arrays(export), outputs['prepare'])
    moments = {
        'launch': (lambda: True, 12.0),
        'a temporary file': (lambda: bool(_leftovers(str(trial_dir))), 0.0),
        'the TFDS build': (lambda: os.path.isdir(os.path.join(
            _only_folder(cache), 'tfds')), 1.0)}
  else:
    start = _start_cache(rng, ref_cache, cache)
    workdir = str(trial_dir / 'run')
    argv = [f'--workdir={workdir}', *_flags(hc18_dir, cache)]
    same = _same_run(reference, workdir)
    moments = {
        'launch': (lambda: True, 12.0),
        'checkpoint': (lambda: os.path.isdir(
            os.path.join(workdir, 'checkpoints')), 1.0),
        'metrics': (lambda: os.path.isfile(
            os.path.join(workdir, 'metrics.jsonl')), 1.0),
        'predictions': (lambda: os.path.isfile(
            os.path.join(workdir, workdir_lib.PREDICTIONS_FILE)), 1.0)}
  after = rng.choice(sorted(moments))
  ready, longest = moments[after]
  delay = rng.uniform(0.0, longest)
  with open(trial_dir / 'killed.log', 'w') as log:
    process = subprocess.Popen(
        [sys.executable, '-m', f'hc_jax.{command}', *argv], cwd=REPO,
        stdout=log, stderr=log)
    _poll(ready, process, every_s=0.01 if longest else 0.001)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    status = process.wait()
  finished = 'finished first' if status == 0 else 'killed'
  where = '' if command == 'predict' else f' ({start} cache)'
  return Trial(f'kill {command}{where} {delay:.2f} s after {after}: '
               f'{finished}', command, argv, same,
               refusal='never')  # A rerun after a kill ends as if none.


def _only_folder(cache):
  """The one hc18-<digest> folder of `cache`, or `cache`."""
  with_digest = [n for n in os.listdir(cache) if n.startswith('hc18-')] if (
      os.path.isdir(cache)) else []
  return os.path.join(cache, with_digest[0]) if with_digest else cache


_COMMANDS = {'main': main_lib.main, 'predict': predict_lib.main,
             'prepare': prepare_lib.main}


def _rerun(trial, capfd):
  capfd.readouterr()
  status = _COMMANDS[trial.command](trial.argv)
  return status, capfd.readouterr().err


def _check(trial, trial_dir, status, err):
  """How the rerun ended, in words; asserts it ended as it may."""
  what = trial.what
  assert 'Traceback' not in err, f'{what}\n{err[-4000:]}'
  left = _leftovers(str(trial_dir))
  assert not left, f'{what}: left behind {left}\n{err[-4000:]}'
  if status == 2 and trial.refusal != 'never':
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('error: ')]
    assert len(errors) == 1 and lines[-1] == errors[0], f'{what}\n{err}'
    assert trial.names in errors[0], f'{what}: not named\n{err}'
    return f'refused: {errors[0][:160]}'
  assert trial.refusal != 'must', f'{what}: not refused ({status})\n{err}'
  assert trial.same(status), (
      f'{what}: exit status {status} or another result\n{err[-4000:]}')
  warnings = [line for line in err.splitlines() if line.startswith('warning')]
  return 'same result' + (f' ({warnings[0][:120]})' if warnings else '')


def _rotation(rng, choices, count):
  """`count` of `choices`, each once in every len(choices), shuffled."""
  drawn = []
  while len(drawn) < count:
    drawn += rng.sample(choices, len(choices))
  return drawn[:count]


def _loop(reference, tmp_path, capfd, seed, kills, damages, show=False):
  rng = random.Random(seed)
  trials = ([('kill', c) for c in _rotation(rng, COMMANDS, kills)] +
            [('damage', k) for k in _rotation(rng, KINDS, damages)])
  rng.shuffle(trials)
  report = []
  for i, (fault, kind) in enumerate(trials):
    trial_dir = tmp_path / f'trial{i}'
    trial_dir.mkdir()
    started = time.time()
    make = _kill_trial if fault == 'kill' else _damage_trial
    trial = make(rng, reference, trial_dir, kind)
    status, err = _rerun(trial, capfd)
    ended = _check(trial, trial_dir, status, err)
    report.append(f'{i}: {trial.what} -> {ended} '
                  f'[{time.time() - started:.0f} s]')
    shutil.rmtree(trial_dir)
  if show:  # pytest -s: what each trial did and how the rerun ended.
    with capfd.disabled():
      print('\n' + '\n'.join(report))


def _shown(request):
  return request.config.getoption('capture') == 'no'


def test_random_faults_fast(reference, tmp_path, capfd, request):
  _loop(reference, tmp_path, capfd, seed=0, kills=2, damages=len(KINDS),
        show=_shown(request))


@pytest.mark.slow
@pytest.mark.parametrize('seed', [1, 2, 3])
def test_random_faults_long(reference, tmp_path, capfd, request, seed):
  _loop(reference, tmp_path, capfd, seed=seed, kills=6, damages=2 * len(KINDS),
        show=_shown(request))


def test_the_damage_is_what_it_says(tmp_path):
  path = tmp_path / 'file'
  path.write_bytes(bytes(range(200)))
  rng = random.Random(0)
  for _ in range(20):
    before = path.read_bytes()
    what = _damage(rng, str(path))
    after = path.read_bytes()
    assert after != before or not before, what
