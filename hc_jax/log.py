"""The one way hc_jax's modules say what they do: `info` for progress
lines on stdout, `status` for a library step's lines on stderr, `warn` for a
warning, `Progress` for a rate and ETA rewritten in place on a terminal; and
how an error reads as one line (`error_line`, and `storage_error_text` for a
file system that refuses or loses a file)."""

import errno
import math
import os
import sys
import time


def info(message: str, file=None) -> None:
  """One progress line on stdout (or `file`), flushed at once."""
  print(message, file=sys.stdout if file is None else file, flush=True)


def status(message: str) -> None:
  """One status line on stderr, flushed at once: what a library step does
  while a command's own output stays alone on stdout."""
  print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
  """`warning: <message>` on stderr, flushed at once."""
  print(f'warning: {message}', file=sys.stderr, flush=True)


def error_line(error: BaseException, limit: int = 300) -> str:
  """An exception as one line, 'TypeName: message' (whitespace collapsed,
  cut after `limit` characters)."""
  text = ' '.join(str(error).split())
  if len(text) > limit:
    text = text[:limit] + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


# Operating-system errors a command meets on the files it writes (a
# read-only, full or vanishing disk): what each means and what to do.
_STORAGE_ERRORS = {
    errno.EROFS: 'the file system is read-only; make it writable or use '
                 'another directory',
    errno.EACCES: 'permission denied; give this user access or use another '
                  'directory',
    errno.EPERM: 'operation not permitted; give this user access or use '
                 'another directory',
    errno.ENOSPC: 'no space left on the device; free some space and run the '
                  'same command again',
    errno.EDQUOT: 'disk quota exceeded; free some space and run the same '
                  'command again',
    errno.EIO: 'input/output error; check the disk, then run the same '
               'command again',
    errno.ENOENT: 'no such file or directory (removed while the command '
                  'ran?); run the same command again',
}
# The same errors as TensorFlow's file system reports them (in a message).
_STORAGE_TEXTS = {
    'Read-only file system': errno.EROFS, 'Permission denied': errno.EACCES,
    'No space left on device': errno.ENOSPC, 'Disk quota exceeded':
    errno.EDQUOT, 'No such file or directory': errno.ENOENT,
}


def storage_problem(error: BaseException) -> tuple[int, str | None] | None:
  """(errno, path or None) when `error` is a file system's refusal or loss.

  Looks at `error` and the errors it was raised from (TFDS wraps
  TensorFlow's in a RuntimeError): an OSError with an errno of
  `_STORAGE_ERRORS`, or a TensorFlow error whose message names one. None for
  anything else (a bug, bad data...).
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRORS:
      path = error.filename
      return error.errno, None if path is None else os.fsdecode(path)
    if not isinstance(error, (OSError, ValueError)):
      text = str(error)
      for needle, number in _STORAGE_TEXTS.items():
        if needle in text:
          return number, None
    error = error.__cause__ or error.__context__
  return None


def storage_error_text(error: BaseException, path: str | None = None
                       ) -> str | None:
  """One line for a `storage_problem` (None when `error` is not one): the
  path (`path` when the error names none), what is wrong, what to do."""
  problem = storage_problem(error)
  if problem is None:
    return None
  number, named = problem
  where = named or path
  return f'{where}: {_STORAGE_ERRORS[number]}' if where else (
      _STORAGE_ERRORS[number])


class Progress:
  """A progress line on stderr (rate and ETA), only when it is a terminal.

  It is rewritten in place (carriage return) at each `update` (after each
  chunk of `chunk` images) and ended with a newline; nothing is written
  when stderr is not a terminal (a log file, a pipe) or for a single chunk.
  """

  def __init__(self, total: int, stream=None, clock=time.monotonic,
               chunk: int = 1):
    self.total = total
    self.stream = stream or sys.stderr
    self.clock = clock
    self.start = clock()
    self.shown = False
    isatty = getattr(self.stream, 'isatty', None)
    self.enabled = total > chunk and bool(isatty and isatty())

  def line(self, done: int) -> str:
    """'done/total images, R images/s, ETA m:ss'."""
    elapsed = max(self.clock() - self.start, 1e-9)
    rate = done / elapsed
    left = (self.total - done) / rate if rate > 0 else math.inf
    eta = (f'{int(left // 60)}:{int(left % 60):02d}' if math.isfinite(left)
           else '?')
    return (f'{done}/{self.total} images, {rate:.1f} images/s, ETA {eta}')

  def update(self, done: int) -> None:
    if self.enabled:
      self.stream.write('\r' + self.line(done) + '\x1b[K')
      self.stream.flush()
      self.shown = True

  def done(self) -> None:
    if self.shown:
      self.stream.write('\n')
      self.stream.flush()
