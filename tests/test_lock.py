"""hc_jax.training.lock: one process per workdir; locks of killed processes expire."""

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from hc_jax import workdir as workdir_lib
from hc_jax.training import lock

HOLD = """
import sys, time
from hc_jax import workdir as workdir_lib
from hc_jax.training import lock
with lock.WorkdirLock(sys.argv[1]):
  print('locked', flush=True)
  time.sleep(120)
"""


def _write_lock(workdir, **record):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE), 'w') as f:
    json.dump(record, f)


def _ago(hours):
  return (datetime.datetime.now().astimezone() -
          datetime.timedelta(hours=hours)).isoformat(timespec='seconds')


def _dead_pid():
  process = subprocess.Popen([sys.executable, '-c', 'pass'])
  process.wait()
  return process.pid


def test_second_process_stops_at_once_then_takes_over_after_a_kill(
    tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  holder = subprocess.Popen([sys.executable, '-c', HOLD, workdir], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    start = time.time()
    with pytest.raises(lock.LockedError) as error:
      lock.WorkdirLock(workdir).acquire()
    assert time.time() - start < 1
    message = str(error.value)
    assert workdir in message and f'pid {holder.pid} ' in message
    assert socket.gethostname() in message and 'started 20' in message
    assert lock.try_lock(workdir) is None
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with lock.WorkdirLock(workdir) as held:  # The killed holder left its file.
    assert held.held
    assert f'pid {holder.pid} ' in capsys.readouterr().err
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))


def test_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path, capsys):
  pid = _dead_pid()
  _write_lock(tmp_path, pid=pid, host=socket.gethostname(), started=_ago(0))
  held = lock.try_lock(str(tmp_path))
  assert held is not None
  err = capsys.readouterr().err
  assert 'took over the lock' in err and f'pid {pid} ' in err
  with open(tmp_path / workdir_lib.LOCK_FILE) as f:
    assert json.load(f)['pid'] == os.getpid()
  held.release()


def test_live_pid_holds_and_a_reused_pid_does_not(tmp_path):
  host = socket.gethostname()
  _write_lock(tmp_path, pid=os.getppid(), host=host, started=_ago(100))
  with pytest.raises(lock.LockedError, match=f'pid {os.getppid()} '):
    lock.WorkdirLock(str(tmp_path)).acquire()
  # The pid runs, but it is another process than the one that locked.
  _write_lock(tmp_path, pid=os.getppid(), host=host, started=_ago(1),
              pid_start='1')
  with lock.WorkdirLock(str(tmp_path)):
    pass


@pytest.mark.parametrize('hours, stale_after_s, locked', [
    (1, lock.DEFAULT_STALE_AFTER_S, True),
    (25, lock.DEFAULT_STALE_AFTER_S, False),
    (1, 1800, False),
])
def test_lock_from_another_host_expires(tmp_path, capsys, hours,
                                        stale_after_s, locked):
  _write_lock(tmp_path, pid=1, host='elsewhere.example', started=_ago(hours))
  workdir_lock = lock.WorkdirLock(str(tmp_path), stale_after_s=stale_after_s)
  if locked:
    with pytest.raises(lock.LockedError, match='elsewhere.example'):
      workdir_lock.acquire()
  else:
    with workdir_lock:
      assert 'elsewhere.example' in capsys.readouterr().err


def test_lock_file_being_written_holds_until_old(tmp_path):
  path = tmp_path / workdir_lib.LOCK_FILE
  path.write_text('')
  with pytest.raises(lock.LockedError, match='being locked'):
    lock.WorkdirLock(str(tmp_path)).acquire()
  old = time.time() - 3600
  os.utime(path, (old, old))
  with lock.WorkdirLock(str(tmp_path)):
    pass


def test_release_on_exception_and_not_of_a_taken_over_lock(tmp_path):
  path = tmp_path / workdir_lib.LOCK_FILE
  with pytest.raises(KeyError):
    with lock.WorkdirLock(str(tmp_path)):
      assert path.exists()
      raise KeyError('boom')
  assert not path.exists()
  workdir_lock = lock.WorkdirLock(str(tmp_path)).acquire()
  _write_lock(tmp_path, pid=1, host='elsewhere.example', started=_ago(0))
  workdir_lock.release()  # Another process took it over: its lock stays.
  assert json.loads(path.read_text())['host'] == 'elsewhere.example'


def test_one_of_several_processes_takes_over_a_stale_lock(tmp_path):
  workdir = str(tmp_path)
  _write_lock(workdir, pid=_dead_pid(), host=socket.gethostname(),
              started=_ago(0))
  script = ('import sys, time\nfrom hc_jax.training import lock\n'
            'held = lock.try_lock(sys.argv[1])\n'
            'print(held is not None, flush=True)\ntime.sleep(3)\n')
  processes = [subprocess.Popen([sys.executable, '-c', script, workdir],
                                cwd=REPO, stdout=subprocess.PIPE, text=True,
                                stderr=subprocess.DEVNULL) for _ in range(4)]
  outcomes = [process.communicate(timeout=60)[0].strip()
              for process in processes]
  assert sorted(outcomes) == ['False', 'False', 'False', 'True']


def test_holder_names_a_live_holder_and_only_reads(tmp_path):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  assert lock.holder(workdir) is None
  with lock.WorkdirLock(workdir):
    assert lock.holder(workdir).startswith(f'pid {os.getpid()} on host ')
  path = os.path.join(workdir, workdir_lib.LOCK_FILE)
  dead = subprocess.Popen(['true'])
  dead.wait()
  with open(path, 'w') as f:  # Left by a process that is gone.
    json.dump({'pid': dead.pid, 'host': socket.gethostname(),
               'started': '2026-01-01T00:00:00+00:00'}, f)
  with open(path, 'rb') as f:
    before = f.read()
  assert lock.holder(workdir) is None
  with open(path, 'rb') as f:
    assert f.read() == before
