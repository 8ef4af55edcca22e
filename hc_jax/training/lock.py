"""A lock on a run's workdir, so two processes never train into one directory.

  with lock.WorkdirLock(workdir):
    ...  # Only this process writes checkpoints and metrics to `workdir`.

The lock is the file `<workdir>/.lock`, created atomically
(`os.open(O_CREAT | O_EXCL)`) and holding JSON {pid, host, started}. A second
process on a workdir in use stops at once with `LockedError`, which names the
holder. A lock left by a killed process is taken over with a warning on
stderr: on this host when its pid no longer runs (or now belongs to another
process), and from another host when it is older than `stale_after_s`, since a
process on another machine cannot be checked.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
import time
from typing import Any
from hc_jax import leftovers
from hc_jax import log
from hc_jax import workdir as workdir_lib

# A lock from another host is taken over after this long (its holder cannot be
# checked from here); pass `stale_after_s` to change it.
DEFAULT_STALE_AFTER_S = 24 * 3600.0
# A lock file with no readable content yet is being written by its creator;
# only one older than this is treated as left by a killed process.
_UNWRITTEN_GRACE_S = 30.0


class LockedError(ValueError):
  """The workdir is locked by another live process."""


def _process_start(pid: int) -> str | None:
  """When process `pid` started (clock ticks since boot), where /proc tells."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
    return fields[19]  # Field 22 of proc(5); the first two precede ')'.
  except (OSError, IndexError):
    return None


def _parse_time(text: Any) -> float | None:
  try:
    return datetime.datetime.fromisoformat(text).timestamp()
  except (TypeError, ValueError):
    return None


@contextlib.contextmanager
def _takeover_guard(directory: str):
  """Serialises lock takeovers among processes of this host (best effort)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    yield
    return
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
      pass  # A file system without flock: the content check below remains.
    yield
  finally:
    os.close(fd)  # Releases the flock.


class WorkdirLock:
  """An exclusive lock on a workdir, held from `acquire` to `release`.

  Use it as a context manager, which releases the lock on any exit, or call
  `acquire` and `release`.
  """

  def __init__(self, workdir: str,
               stale_after_s: float = DEFAULT_STALE_AFTER_S):
    """Prepares the lock of `workdir`; `acquire` takes it.

    Args:
      workdir: the directory to lock (created if missing).
      stale_after_s: age after which a lock from another host is taken over.
    """
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, workdir_lib.LOCK_FILE)
    self.stale_after_s = stale_after_s
    self._content = None  # The bytes this object wrote, while it holds.

  @property
  def held(self) -> bool:
    return self._content is not None

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock; returns self.

    Raises:
      LockedError: another live process holds the lock.
      OSError: the lock file cannot be written (a read-only directory...).
    """
    if self.held:
      return self
    os.makedirs(self.workdir, exist_ok=True)
    for _ in range(5):
      if self._create():
        return self
      content, mtime = self._read()
      if content is None:
        continue  # Released in between: try again.
      reason = self._stale_reason(content, mtime)
      with _takeover_guard(self.workdir):
        current, _ = self._read()
        if current != content:
          continue  # Another process took it over or re-locked: look again.
        os.unlink(self.path)
      log.warn(f'took over the lock of {self.workdir}: {reason}')
    raise LockedError(f'could not lock {self.workdir}: {self.path} keeps '
                      'changing; is another process starting there?')

  def release(self) -> None:
    """Removes the lock file, unless another process has taken it over."""
    if not self.held:
      return
    content, _ = self._read()
    if content == self._content:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(self.path)
    self._content = None

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()

  def _create(self) -> bool:
    """Creates the lock file with this process's record, or returns False."""
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    record = {'pid': os.getpid(), 'host': socket.gethostname(),
              'started': datetime.datetime.now().astimezone().isoformat(
                  timespec='seconds')}
    pid_start = _process_start(os.getpid())
    if pid_start is not None:
      record['pid_start'] = pid_start
    content = (json.dumps(record) + '\n').encode()
    try:
      os.write(fd, content)
      os.fsync(fd)
    except OSError as e:  # A full disk: named as the open would name it.
      os.close(fd)
      with contextlib.suppress(OSError):
        os.unlink(self.path)
      raise OSError(e.errno, e.strerror, self.path) from None
    os.close(fd)
    self._content = content
    return True

  def _read(self) -> tuple[bytes | None, float]:
    """(content, mtime) of the lock file, or (None, 0) when there is none."""
    try:
      with open(self.path, 'rb') as f:
        return f.read(), os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
      return None, 0.0

  def _stale_reason(self, content: bytes, mtime: float) -> str:
    """Why the lock in `content` was left by a dead process.

    Raises:
      LockedError: its holder may still run.
    """
    try:
      holder = json.loads(content)
      pid, host = int(holder['pid']), str(holder['host'])
    except (ValueError, TypeError, KeyError):
      if time.time() - mtime < _UNWRITTEN_GRACE_S:
        raise LockedError(
            f'{self.workdir} is being locked by another process ({self.path} '
            'was just created)') from None
      return f'{self.path} holds no readable record'
    started = holder.get('started', '?')
    who = f'pid {pid} on host {host} (started {started})'
    if host == socket.gethostname():
      if not leftovers.pid_running(pid):
        return f'{who} is no longer running'
      recorded, current = holder.get('pid_start'), _process_start(pid)
      if recorded is not None and current is not None and recorded != current:
        return f'{who} is no longer running (its pid is another process now)'
    else:
      started_s = _parse_time(started)
      age_s = time.time() - (mtime if started_s is None else started_s)
      if age_s > self.stale_after_s:
        return (f'{who} locked it {age_s / 3600:.1f} h ago, more than '
                f'{self.stale_after_s / 3600:.3g} h')
    raise LockedError(f'{self.workdir} is in use by {who}; if that process '
                      f'is gone, remove {self.path}')


def try_lock(workdir: str, stale_after_s: float = DEFAULT_STALE_AFTER_S
             ) -> WorkdirLock | None:
  """Returns the acquired lock of `workdir`, or None when another process
  holds it. The caller releases it (or uses it as a context manager)."""
  try:
    return WorkdirLock(workdir, stale_after_s).acquire()
  except LockedError:
    return None


def holder(workdir: str) -> str | None:
  """Who holds the lock of `workdir` ('pid N on host H (started T)'), or None
  when nobody does: no lock file, or one left by a process that is gone.
  Reads only; takes and changes nothing."""
  lock = WorkdirLock(workdir)
  content, mtime = lock._read()  # pylint: disable=protected-access
  if content is None:
    return None
  try:
    lock._stale_reason(content, mtime)  # pylint: disable=protected-access
  except LockedError:
    try:
      record = json.loads(content)
      return (f'pid {record["pid"]} on host {record["host"]} '
              f'(started {record.get("started", "?")})')
    except (ValueError, TypeError, KeyError):
      return 'a process that is just starting'
  return None
