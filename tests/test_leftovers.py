"""No leftovers, and no race: what killed processes left is cleaned by the
next run (never what a live one holds), and two prepares of one fresh cache
at once both succeed (hc_jax.leftovers, hc_jax.data.cache)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
from PIL import Image
import pytest

from conftest import REPO
from hc_jax import leftovers
from hc_jax import predict
from hc_jax.data import cache as cache_lib
from hc_jax.data import digests
from hc_jax.data import phantom_set

# Imports, then waits for the file `go` before it prepares: processes
# started together prepare at the same moment.
_PREPARE = textwrap.dedent('''
    import os, sys, time
    from hc_jax import cli
    cli.quiet_logs()
    from hc_jax.data import cache as cache_lib
    root, cache, go = sys.argv[1:]
    while not os.path.exists(go):
      time.sleep(0.01)
    arrays, info = cache_lib.prepare(root, (32, 32), 'stretch', cache)
    print(cache_lib.arrays_digest(arrays))
''')


def _dead_pid() -> int:
  process = subprocess.Popen([sys.executable, '-c', 'pass'])
  process.wait()
  assert not leftovers.pid_running(process.pid)
  return process.pid


@pytest.fixture
def sleeper():
  """A live process of this host (not this one)."""
  process = subprocess.Popen([sys.executable, '-c',
                              'import time; time.sleep(600)'])
  yield process.pid
  process.kill()
  process.wait()


def _phantoms(tmp_path, num_train=12):
  root = str(tmp_path / 'hc18')
  phantom_set.write_hc18(root, num_train=num_train, num_test=4, seed=2)
  return root


def _start(root, cache, go):
  return subprocess.Popen(
      [sys.executable, '-c', _PREPARE, root, cache, go], cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, 'PYTHONPATH': REPO})


def test_two_prepares_of_one_fresh_cache_at_once_both_succeed(tmp_path):
  """They used to race in TFDS's rename (FileExistsError, a traceback)."""
  root, cache, go = _phantoms(tmp_path), str(tmp_path / 'cache'), str(
      tmp_path / 'go')
  processes = [_start(root, cache, go) for _ in range(2)]
  time.sleep(1.0)
  with open(go, 'w'):
    pass
  results = [process.communicate(timeout=300) for process in processes]
  for process, (out, err) in zip(processes, results):
    assert process.returncode == 0, err
    assert 'Traceback' not in err, err
  assert len({out.strip() for out, _ in results}) == 1  # The same arrays.
  directory = os.path.join(cache, f'hc18-{digests.content_digest(root)}')
  builds = os.path.join(directory, 'tfds', 'hc18')
  assert not [n for n in os.listdir(builds) if n.startswith('incomplete')]
  assert not [n for n in os.listdir(directory) if '.tmp' in n]


def test_prepare_removes_what_killed_preparations_left(tmp_path, sleeper):
  root, cache = _phantoms(tmp_path), str(tmp_path / 'cache')
  directory = os.path.join(cache, f'hc18-{digests.content_digest(root)}')
  unfinished = os.path.join(directory, 'tfds', 'hc18', 'incomplete.AB12_1.0.0')
  os.makedirs(unfinished)
  with open(os.path.join(unfinished, 'hc18-train.tfrecord-00000'), 'wb') as f:
    f.write(b'\0' * 1000)
  npz = os.path.join(directory, 'prepared_32x32_stretch.npz')
  dead = f'{npz}.{_dead_pid()}.tmp.npz'
  live = f'{npz}.{sleeper}.tmp.npz'
  for path in (dead, live):
    with open(path, 'wb') as f:
      f.write(b'half an npz')
  cache_lib.prepare(root, (32, 32), 'stretch', cache)
  assert not os.path.exists(unfinished) and not os.path.exists(dead)
  assert os.path.exists(live)  # Its writer still runs.


def test_a_prepare_killed_mid_build_leaves_nothing_after_the_rerun(tmp_path):
  root = _phantoms(tmp_path, num_train=60)
  cache, go = str(tmp_path / 'cache'), str(tmp_path / 'go')
  directory = os.path.join(cache, f'hc18-{digests.content_digest(root)}')
  builds = os.path.join(directory, 'tfds', 'hc18')
  process = _start(root, cache, go)
  with open(go, 'w'):
    pass
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if os.path.isdir(builds) and any(
        n.startswith('incomplete') for n in os.listdir(builds)):
      break
    time.sleep(0.02)
  if process.poll() is not None:
    pytest.skip('the build finished before it could be killed')
  process.send_signal(signal.SIGKILL)
  process.communicate()
  assert any(n.startswith('incomplete') for n in os.listdir(builds))
  rerun = _start(root, cache, go)
  _, err = rerun.communicate(timeout=300)
  assert rerun.returncode == 0, err
  assert not [n for n in os.listdir(builds) if n.startswith('incomplete')]
  assert not [n for n in os.listdir(directory) if '.tmp' in n]


def test_the_hashes_file_leaves_no_temporary_files(tmp_path, sleeper):
  root, cache = _phantoms(tmp_path), str(tmp_path / 'cache')
  os.makedirs(cache)
  hashes = os.path.join(cache, digests.HASHES_FILE)
  dead, live = (f'{hashes}.{pid}.tmp' for pid in (_dead_pid(), sleeper))
  for path in (dead, live):
    with open(path, 'w') as f:
      f.write('{')
  digests.content_digest(root, hashes)
  assert sorted(os.listdir(cache)) == sorted(
      [digests.HASHES_FILE, os.path.basename(live)])


def test_an_export_removes_what_killed_exports_left(tmp_path, sleeper):
  """`python -m hc_jax.prepare --out=DIR` killed while writing leaves its
  temporary .npz in DIR: the next export there removes it, never a live
  writer's."""
  path = str(tmp_path / 'export' / 'hc18_32x32_stretch.npz')
  os.makedirs(os.path.dirname(path))
  dead, live = (f'{path}.{pid}.tmp.npz' for pid in (_dead_pid(), sleeper))
  for leftover in (dead, live):
    with open(leftover, 'w') as f:
      f.write('PK')
  arrays = {name: np.zeros((2, 32, 32, 1) if name == 'images' else (2,),
                           dtype)
            for name, dtype in cache_lib.ARRAY_FIELDS.items()}
  cache_lib.save(path, arrays, {'image_hw': [32, 32]})
  assert sorted(os.listdir(tmp_path / 'export')) == sorted(
      [os.path.basename(path), os.path.basename(live)])


class _Stub:
  predicts_ellipse = False
  kind = 'hc'
  trained_on_phantoms = False

  def __call__(self, images, pixel_sizes_mm, **kwargs):
    count = len(images)
    return {'hc_px': np.full(count, 1000.0), 'hc_mm': np.full(count, np.nan),
            'hc_mm_sd': np.full(count, np.nan),
            'status': np.full(count, 'ok', object),
            'message': np.full(count, '', object)}


def test_predict_removes_the_temporary_csv_a_killed_predict_left(
    tmp_path, monkeypatch, sleeper):
  scans = tmp_path / 'scans'
  scans.mkdir()
  Image.fromarray(np.random.default_rng(0).integers(
      0, 255, (40, 60), np.uint8)).save(scans / 'a.png')
  out = tmp_path / 'out' / 'hc.csv'
  out.parent.mkdir()
  dead = out.parent / f'.hc.csv.{_dead_pid()}.tmp'
  live = out.parent / f'.hc.csv.{sleeper}.tmp'
  probe = out.parent / f'.hc_jax_probe.{_dead_pid()}.tmp'
  other = out.parent / '.other.csv.1.tmp'  # Not predict's for this --out.
  for path in (dead, live, probe, other):
    path.write_text('')
  monkeypatch.setattr(predict, 'load', lambda *a, **k: _Stub())
  assert predict.main([f'--workdir={tmp_path}', f'--images={scans}',
                       f'--out={out}']) == 0
  assert sorted(os.listdir(out.parent)) == sorted(
      ['hc.csv', live.name, other.name])
