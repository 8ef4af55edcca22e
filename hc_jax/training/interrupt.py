"""Ctrl-C (SIGINT) and SIGTERM during training: stop at the next step, save.

  with interrupt.StopRequest() as stop:
    for batch in batches:
      if stop.requested:
        ...  # Wait for the step in flight, save, then raise stop.error(...).

While the `with` block runs, the first SIGINT or SIGTERM only sets
`requested` (and says on stderr that the run stops after the current step);
a second one raises `KeyboardInterrupt` at once, as Python does by default,
for a user who will not wait for the checkpoint. Outside the block, off the
main thread (where Python cannot install handlers) and in a run over several
processes, signals behave as usual.
"""

import contextlib
import os
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
  """A run stopped on a signal after saving what it could.

  Attributes:
    message: one line saying where it stopped and what was kept.
    exit_status: 128 + the signal's number (130 for Ctrl-C).
  """

  def __init__(self, message: str, signum: int = signal.SIGINT):
    super().__init__(message)
    self.message = message
    self.exit_status = 128 + int(signum)


class StopRequest:
  """A context manager that turns SIGINT and SIGTERM into a request to stop.

  Attributes:
    signum: the signal received first, or None.
  """

  def __init__(self, enabled: bool = True):
    """Prepares the request; `with` installs the handlers.

    Args:
      enabled: False leaves the signals as they are (a run over several
        processes, which could not stop at the same step together).
    """
    self.signum = None
    self.enabled = enabled
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def error(self, message: str) -> Interrupted:
    """The exception that ends the run, with one line of `message`."""
    return Interrupted(message, self.signum or signal.SIGINT)

  def _handle(self, signum, frame):
    del frame  # Unused.
    if self.requested:
      raise KeyboardInterrupt
    self.signum = signum
    name = 'Ctrl-C' if signum == signal.SIGINT else signal.Signals(signum).name
    # os.write, not print: a handler may run inside a print of the main
    # thread, and Python's buffered streams refuse to be re-entered.
    with contextlib.suppress(OSError):  # A closed stderr.
      os.write(2, f'{name}: stopping after the current step to save it '
               '(again to stop at once, without saving)\n'.encode())

  def __enter__(self) -> 'StopRequest':
    for signum in SIGNALS if self.enabled else ():
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # Not the main thread: signals stay as they were.
        break
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      # None: a handler not set from Python; the default is the nearest.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}
