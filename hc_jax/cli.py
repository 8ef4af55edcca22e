"""What hc_jax's commands share: quiet start-up, config files, one-line errors.

Every entry point (`hc_jax.main`, `hc_jax.grid`, `hc_jax.predict`,
`hc_jax.cv_score`, `hc_jax.plots`, `hc_jax.prepare`, `hc_jax.shipped`) calls
`quiet_logs()` before TensorFlow is imported, reads its config (where it
takes one) with `load_config(path, overrides)` and runs under `run_main`, so
that a mistake on the command line (a misspelt config field, a config file
that does not exist, a bad value) ends with one line on stderr and exit
status 2:

  error: configs/cnn263k_mse.py: no field 'num_epoch' — did you mean 'num_epochs'?

`setup_process(config)` makes the process-wide settings a training command
needs (multi-host start, TensorFlow kept off the accelerators, glibc's
allocator on a CPU); library functions leave the process alone.
"""

import argparse
import difflib
import logging as std_logging
import os
import sys
import tempfile
from typing import Any, Callable, NoReturn, Sequence

from hc_jax import log

# Lines that TensorFlow's C++ start-up writes to stderr on every import (twice:
# it loads two copies of its runtime), whatever TF_CPP_MIN_LOG_LEVEL says.
_TF_IMPORT_NOISE = (
    'All log messages before absl::InitializeLog() is called',
    'oneDNN custom operations are on',
)
# Python log records of TensorFlow Datasets that every first build prints.
_TFDS_NOISE = ('has no dataset_info.json',)


# The config files of the checkout (`configs/` beside the package).
CONFIGS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


class UsageError(ValueError):
  """A mistake on the command line or in a config file, as one line."""


def one_line(error: BaseException) -> str:
  """The text of an error on one line (newlines and runs of spaces folded)."""
  text = error.args[0] if isinstance(error, KeyError) and error.args else error
  return ' '.join(str(text).split()) or type(error).__name__


def error_text(error: BaseException) -> str:
  """What a command prints after `error: `: `one_line(error)`, except that an
  hc18.HC18Error keeps its list of bad files, one a line, under its first."""
  return str(error) if getattr(error, 'problems', None) else one_line(error)


class _DropNoise(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    try:
      message = record.getMessage()
    except (TypeError, ValueError):  # A record with mismatched arguments.
      return True
    return not any(noise in message for noise in _TFDS_NOISE)


def quiet_logs(tensorflow: bool = True) -> None:
  """Silences the start-up chatter of TensorFlow, TFDS, absl and orbax.

  Call it first in a command's main, before anything imports TensorFlow; it
  is also the one call for quiet library use (scripts, notebooks).
  Warnings and errors still show; only informational lines, progress bars and
  TensorFlow's import banner are dropped. Environment variables already set
  by the user (TF_CPP_MIN_LOG_LEVEL, TQDM_DISABLE) are respected.

  Args:
    tensorflow: also import TensorFlow now, with its C++ start-up lines (the
      oneDNN notice and absl's "before InitializeLog" line, which no log
      level hides) kept off stderr; anything else it writes there is passed
      on. False for commands that never load TensorFlow.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TQDM_DISABLE', '1')  # TFDS's build progress bars.
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  absl_logger = std_logging.getLogger('absl')
  if not any(isinstance(f, _DropNoise) for f in absl_logger.filters):
    absl_logger.addFilter(_DropNoise())
  if tensorflow:
    _import_tensorflow_quietly()
  _hide_tfds_progress_bars(load=tensorflow)


def _hide_tfds_progress_bars(load: bool) -> None:
  """TFDS's progress bars off, also where tqdm was imported before (it reads
  TQDM_DISABLE once, on import): through TFDS's own switch, on TFDS when
  imported already, or when `load`, also where only tqdm is."""
  if os.environ.get('TQDM_DISABLE', '').lower() in ('', '0', 'false'):
    return  # The user asked for them.
  name = 'tensorflow_datasets.core.utils.tqdm_utils'
  if name not in sys.modules and not (load and 'tqdm' in sys.modules):
    return  # TQDM_DISABLE will do when tqdm is imported.
  try:
    # pylint: disable-next=import-outside-toplevel
    from tensorflow_datasets.core.utils import tqdm_utils
  except ImportError:
    return
  tqdm_utils.disable_progress_bar()


def _import_tensorflow_quietly():
  """Imports TensorFlow with file descriptor 2 caught, then passes on news.

  Returns:
    The tensorflow module, or None where it is not installed.
  """
  if 'tensorflow' in sys.modules:
    return sys.modules['tensorflow']
  sys.stderr.flush()
  saved = os.dup(2)
  module = None
  with tempfile.TemporaryFile(mode='w+b') as caught:
    os.dup2(caught.fileno(), 2)
    try:
      import tensorflow as module  # pylint: disable=import-outside-toplevel
    except ImportError:
      pass  # Commands that need it say so when they import it.
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      caught.seek(0)
      text = caught.read().decode('utf-8', 'replace')
  kept = [line for line in text.splitlines()
          if line.strip() and not any(noise in line
                                      for noise in _TF_IMPORT_NOISE)]
  if kept:
    print('\n'.join(kept), file=sys.stderr)
  return module


def load_config(path: str, overrides: Sequence[str] = ()):
  """Loads a config file with `KEY=VALUE` overrides, as the commands do.

  Args:
    path: a Python file with `get_config()` (e.g. configs/resnet_huber.py).
    overrides: e.g. ('num_epochs=10', 'data.hc18_dir=/data/hc18'); each value
      is parsed by the type of the field it replaces, as ml_collections'
      `--config.KEY=VALUE` flags are.

  Returns:
    The locked ml_collections.ConfigDict: a misspelt field cannot be set
    later either.

  Raises:
    UsageError: a missing or broken file, an override that is not KEY=VALUE,
      names no field of the config, or has a value of the wrong type; the
      message is one line that starts with the path.
  """
  if not os.path.isfile(path):
    raise UsageError(f'{path}: config file not found{_configs_hint(path)}')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if repo not in sys.path:  # The configs do `from configs import default`.
    sys.path.insert(0, repo)
  pairs = []
  for override in overrides:
    key, sep, value = override.partition('=')
    if not sep or not key:
      raise UsageError(f'{path}: override {override!r} is not KEY=VALUE')
    pairs.append((key, value))
  config = _parse_config_file(path, ())
  for key, _ in pairs:
    _check_field(config, key, path)
  return _parse_config_file(path, pairs) if pairs else config


def config_files(folder: str = CONFIGS_DIR) -> list[str]:
  """The config files of a folder (`configs/` of the checkout by default):
  its `.py` files but `__init__.py`, sorted by name."""
  try:
    names = os.listdir(folder)
  except OSError:
    return []
  return sorted(name for name in names
                if name.endswith('.py') and name != '__init__.py')


def _configs_hint(path: str) -> str:
  """' — did you mean F? (the configs in D/: ...)' for a config file that is
  not there: those of its folder, else of the checkout's configs/."""
  folder = os.path.dirname(path) or '.'
  names = config_files(folder)
  if not names:
    folder = shown_path(CONFIGS_DIR)
    names = config_files(CONFIGS_DIR)
  if not names:
    return ''
  close = difflib.get_close_matches(os.path.basename(path), names, n=1)
  hint = f' — did you mean {os.path.join(folder, close[0])}?' if close else ''
  return f'{hint} (the configs in {folder}/: {", ".join(names)})'


def shown_path(path: str) -> str:
  """`path` as a message shows it: relative to the working directory when
  below it, else absolute."""
  relative = os.path.relpath(path)
  return os.path.abspath(path) if relative.startswith('..') else relative


def _parse_config_file(path: str, pairs: Sequence[tuple[str, str]]):
  # pylint: disable=import-outside-toplevel
  from absl import flags
  from ml_collections import config_flags
  argv = ['hc_jax', f'--config={path}']
  argv += [f'--config.{key}={value}' for key, value in pairs]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  try:
    flag_values(argv)
    config = flag_values.config
  except Exception as e:  # pylint: disable=broad-except
    # A value of the wrong type, or any error raised by the config file.
    message = one_line(e)
    if isinstance(e, flags.Error) or type(e).__name__ in message:
      raise UsageError(f'{path}: {message}') from None
    raise UsageError(f'{path}: {type(e).__name__}: {message}') from None
  if config is None or not hasattr(config, 'keys'):
    raise UsageError(f'{path}: get_config() returned no ConfigDict')
  return config


def _check_field(config, key: str, path: str) -> None:
  """Raises UsageError unless `key` (dotted) names a field of `config`."""
  node, walked = config, []
  for part in key.split('.'):
    if '[' in part:  # An index into a list field; ml_collections checks it.
      return
    if not hasattr(node, 'keys'):
      raise UsageError(f"{path}: '{'.'.join(walked)}' is a value "
                       f"({type(node).__name__}), not a group of fields: no "
                       f"field '{key}'")
    if part not in node:
      prefix = ''.join(f'{name}.' for name in walked)
      close = difflib.get_close_matches(part, list(node.keys()), n=1)
      hint = f" — did you mean '{prefix}{close[0]}'?" if close else ''
      raise UsageError(f"{path}: no field '{prefix}{part}'{hint}")
    node = node[part]
    walked.append(part)


def split_config_args(argv: Sequence[str]
                      ) -> tuple[str | None, list[str], list[str]]:
  """Takes `--config=FILE` and `--config.KEY=VALUE` out of a command line.

  Args:
    argv: the arguments after the program name. `--config FILE` and
      `--config.KEY VALUE` work too, and a bare `--config.KEY` (a boolean)
      means `KEY=True`, `--noconfig.KEY` `KEY=False`.

  Returns:
    (the config file or None, ['KEY=VALUE', ...], the other arguments).

  Raises:
    UsageError: `--config` given twice or without a file.
  """
  path, overrides, rest = None, [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    name, sep, value = arg.partition('=')
    takes_next = not sep and i + 1 < len(args) and not args[i + 1].startswith(
        '--')
    if name == '--config':
      if path is not None:
        raise UsageError('--config given twice')
      if not sep and not takes_next:
        raise UsageError('--config needs a config file, e.g. '
                         '--config=configs/cnn263k_mse.py')
      path = value if sep else args[i + 1]
      i += 1 if sep else 2
    elif name.startswith('--config.'):
      key = name[len('--config.'):]
      if sep:
        overrides.append(f'{key}={value}')
        i += 1
      elif takes_next:
        overrides.append(f'{key}={args[i + 1]}')
        i += 2
      else:
        overrides.append(f'{key}=True')
        i += 1
    elif name.startswith('--noconfig.') and not sep:
      overrides.append(f'{name[len("--noconfig."):]}=False')
      i += 1
    else:
      rest.append(arg)
      i += 1
  return path, overrides, rest


class ArgumentParser(argparse.ArgumentParser):
  """argparse with one-line errors: `error: MESSAGE` and exit status 2."""

  def error(self, message: str) -> NoReturn:
    print(f'error: {message} (see {self.prog} --help)', file=sys.stderr)
    sys.exit(2)


def add_losses_module_flag(parser: argparse.ArgumentParser) -> None:
  """`--losses_module`, repeatable: files or modules that register losses
  (`hc_jax.losses.register`), imported with `losses.import_module` before
  any config is checked (hc_jax.main and hc_jax.grid)."""
  parser.add_argument('--losses_module', action='append', default=[],
                      metavar='FILE_OR_MODULE',
                      help='a Python file or module to import first, which '
                      'registers losses (hc_jax.losses.register) that '
                      '--config.loss=NAME can then name; repeatable')


def usage_errors() -> tuple[type[BaseException], ...]:
  """The errors a command reports as one line with exit status 2.

  ValueError covers UsageError, hc18.HC18Error and the checkpoint and data
  errors derived from it; FloatingPointError is a diverged training run;
  FileNotFoundError a workdir, image or file that is not there.
  """
  return (ValueError, FloatingPointError, FileNotFoundError)


def quiet_closed_event_loop(previous_hook):
  """A `sys.unraisablehook` that drops tensorstore's 'Event loop is closed'.

  orbax closes its event loop as soon as one read or write of a checkpoint
  fails (a damaged file, a full disk); the operations still in flight then
  report that error, each with a traceback, when they finish, after the
  one-line error was printed. Anything else goes to `previous_hook`.
  """
  if getattr(previous_hook, 'drops_closed_event_loop', False):
    return previous_hook

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError)
            and str(error) == 'Event loop is closed'):
      previous_hook(unraisable)
  hook.drops_closed_event_loop = True
  return hook


class OneLineErrors:
  """A command's body as a `with` block that ends in an exit status.

    with cli.OneLineErrors() as outcome:
      ...  # The command's work.
    return outcome.status

  `status` is 0 unless the block raised one of the errors below: 2 after
  printing `error: MESSAGE` (one line, on stderr) for the errors of
  `usage_errors()` (an hc18.HC18Error adds its list of bad files, one a
  line) and for a file system that refuses or loses what the command writes
  (`log.storage_error_text`: read-only, permission denied, full, removed);
  130 after `error: interrupted` for Ctrl-C; for a training run stopped by
  Ctrl-C or SIGTERM (`interrupt.Interrupted`), its one line (where it
  stopped, what was saved) and 128 + the signal's number (130 for Ctrl-C,
  143 for SIGTERM). Any other exception goes through. orbax's late 'Event
  loop is closed' reports (`quiet_closed_event_loop`) are dropped from then
  on, to the end of the process.
  """

  def __init__(self):
    self.status = 0

  def __enter__(self) -> 'OneLineErrors':
    sys.unraisablehook = quiet_closed_event_loop(sys.unraisablehook)
    return self

  def __exit__(self, kind, error, traceback) -> bool:
    if error is None:
      return False
    if isinstance(error, usage_errors()):
      print(f'error: {error_text(error)}', file=sys.stderr)
      self.status = 2
    elif isinstance(error, OSError):
      text = log.storage_error_text(error)
      if text is None:
        return False
      print(f'error: {text}', file=sys.stderr)
      self.status = 2
    elif isinstance(error, KeyboardInterrupt):
      # A run that saved where it stopped says so (training.interrupt).
      print(getattr(error, 'message', 'error: interrupted'), file=sys.stderr)
      self.status = getattr(error, 'exit_status', 130)
    else:
      return False
    return True


def run_main(fn: Callable[[], Any]) -> int:
  """Runs a command's body and returns its exit status.

  Use as `sys.exit(cli.run_main(lambda: main(argv)))`, or from a main that
  returns it.

  Args:
    fn: the command's work, called with no arguments; it returns an exit
      status (None means 0).

  Returns:
    fn's status, or that of `OneLineErrors` after one of its errors.
  """
  with OneLineErrors() as outcome:
    status = fn()
    outcome.status = 0 if status is None else int(status)
  return outcome.status


def exit_process(status: int) -> NoReturn:
  """Ends a training command's process with `status` (from `run_main`).

  After an interrupt (status 128 + a signal's number: Ctrl-C, SIGTERM) the
  process ends at once, without Python's teardown: with JAX and TensorFlow
  loaded, collecting their objects takes seconds, which a user who pressed
  Ctrl-C waits through for the prompt. Nothing is lost: by then a run has
  saved its checkpoint (orbax writes synchronously), flushed and synced its
  metrics and released its workdir lock. Any other status exits as
  `sys.exit` does.
  """
  if status > 128:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)


def setup_process(config) -> None:
  """The process-wide settings of a training command, from its config.

  In order: `jax.distributed.initialize()` when `config.distributed` (before
  anything touches a device); TensorFlow, which only feeds data, imported
  without its start-up lines and kept off every GPU (where it is installed);
  and on a CPU, when `config.tune_malloc`,
  glibc's allocator told to keep freed memory (`hc_jax.cpu.tune_malloc`).

  Args:
    config: a training config (`configs/default.py`'s fields).
  """
  # pylint: disable=import-outside-toplevel
  import jax
  if config.get('distributed', False):
    jax.distributed.initialize()
  tf = _import_tensorflow_quietly()
  if tf is not None:
    try:
      tf.config.set_visible_devices([], 'GPU')
    except (RuntimeError, ValueError):  # TensorFlow's devices already in use.
      pass
  if config.get('tune_malloc', False) and jax.default_backend() == 'cpu':
    from hc_jax import cpu
    cpu.tune_malloc()
