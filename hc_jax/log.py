"""The one way hc_jax's modules say what they do: `info` for progress
lines on stdout, `status` for a library step's lines on stderr, `warn` for a
warning."""

import sys


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
