"""Checkpoints (orbax) of a run.

Two orbax `CheckpointManager`s under `workdir/checkpoints/`: `latest` (for
resuming) and `best` (the epoch with the lowest validation MAE, for the final
test). Each checkpoint holds the train state and a small JSON record of
progress. A run stopped by Ctrl-C or SIGTERM in the middle of an epoch saves
where it is in a third, `interrupted` (one checkpoint, whose progress names
the step in the epoch and the losses of the steps before); it is deleted as
soon as a newer latest checkpoint is complete.

Faults a run survives:
- Killed while saving: orbax writes to a temporary directory and renames it
  when complete, so the run resumes from the previous checkpoint.
- A damaged checkpoint (a truncated, overwritten or missing file): after orbax
  has written a checkpoint, its manifest (`hc_jax.training.manifest`)
  records the size and CRC32 of each of its files, and a restore checks them
  first (orbax itself does not notice some damage to array data). The last
  `keep_latest` (two) resume checkpoints are kept: when the newest cannot be
  restored, a warning names it and the reason, and the run resumes from the
  one before.
- A checkpoint without its manifest (killed after orbax finished it, before
  the manifest was written) is not verified, so it is not used: the run
  resumes from the verified one before it, or starts over when there is
  none (an uninterrupted run's result either way), with a warning.
- A failed write (a full disk): `save` raises `CheckpointError`, removes what
  it left half-written, and the previous checkpoints stay usable.

When no checkpoint can be restored, `CheckpointError` (a ValueError) says so
in one line.
"""

import contextlib
import logging as std_logging
import os
import shutil
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
import numpy as np

from hc_jax import log
from hc_jax import workdir as workdir_lib
from hc_jax.training import manifest

# What orbax names an unfinished step directory: '<step>' + this (+ more).
_TMP_MARK = '.orbax-checkpoint-tmp'
# In workdir/checkpoints: what orbax logged while saving or restoring (its
# errors come with tracebacks, from each of its threads); stderr gets only
# the one line of the error that follows.
ORBAX_LOG = 'orbax.log'
# In workdir/checkpoints: the checkpoint a run saved when it was interrupted
# in the middle of an epoch.
INTERRUPTED_DIR = 'interrupted'


# A checkpoint cannot be written or restored; one without its manifest.


class _ToFile(std_logging.Filter):
  """Keeps the records of a logger off stderr, appending them to a file
  (best effort: on a full disk they are dropped)."""

  def __init__(self, path: str):
    super().__init__()
    self.path, self.count = path, 0
    self.formatter = std_logging.Formatter(
        '%(asctime)s %(levelname)s %(threadName)s: %(message)s')

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      self.count += 1
      with contextlib.suppress(Exception):
        with open(self.path, 'a') as f:
          f.write(self.formatter.format(record) + '\n')
    return False


@contextlib.contextmanager
def _orbax_logs_to(path: str):
  """While orbax works, its log records (absl's logger) go to `path`."""
  logger = std_logging.getLogger('absl')
  divert = _ToFile(path)
  logger.addFilter(divert)
  try:
    yield divert
  finally:
    logger.removeFilter(divert)


class Checkpoints:
  """The latest (resume) checkpoints and the best checkpoint of a run."""

  def __init__(self, workdir: str, keep_latest: int = 2):
    """Opens (creating if needed) `workdir/checkpoints`.

    Args:
      workdir: the run's directory.
      keep_latest: how many resume checkpoints to keep (at least 1); with two,
        a damaged newest one falls back to the one before.
    """
    if keep_latest < 1:
      raise ValueError(f'keep_latest must be >= 1, got {keep_latest}')
    self.keep_latest = keep_latest
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, workdir_lib.CHECKPOINTS_DIR)
    self.latest = _open_manager(os.path.join(self.directory, 'latest'))
    self.best = _open_manager(os.path.join(self.directory, 'best'))
    self._interrupted_dir = os.path.join(self.directory, INTERRUPTED_DIR)
    self._interrupted = None  # Opened when first needed: no empty folder.

  def _interrupted_manager(self) -> ocp.CheckpointManager | None:
    """The manager of the mid-epoch checkpoint; None without its folder."""
    if self._interrupted is None and os.path.isdir(self._interrupted_dir):
      self._interrupted = _open_manager(self._interrupted_dir)
    return self._interrupted

  @staticmethod
  def _step_dir(manager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))

  def _save(self, manager, epoch: int, args) -> None:
    """Writes one step with its manifest, or raises CheckpointError leaving
    no trace of it."""
    with _orbax_logs_to(os.path.join(self.directory, ORBAX_LOG)) as logged:
      self._save_logged(manager, epoch, args, logged)

  def _save_logged(self, manager, epoch: int, args, logged) -> None:
    step_dir = self._step_dir(manager, epoch)
    primary = jax.process_index() == 0
    try:
      if primary:
        _remove_unfinished(str(manager.directory))
      if epoch in manager.all_steps():  # A redone epoch: replace it.
        _delete(manager, epoch)
      if not manager.save(epoch, args=args, force=True):
        raise RuntimeError('orbax skipped the save')
      if primary:
        manifest.write(step_dir, self._config_digest())
    except Exception as e:  # pylint: disable=broad-except
      with contextlib.suppress(Exception):
        _join_orbax_threads(timeout_s=30.0)  # Writers still running.
        if primary:
          _remove_unfinished(str(manager.directory))
        manager.reload()
        if epoch in manager.all_steps():
          manager.delete(epoch)
      detail = (f'; details in {os.path.join(self.directory, ORBAX_LOG)}'
                if logged.count and os.path.isfile(
                    os.path.join(self.directory, ORBAX_LOG)) else '')
      raise manifest.CheckpointError(
          f'could not save epoch {epoch} in {manager.directory} '
          f'({log.error_line(e)}); the earlier checkpoints are kept{detail}'
      ) from None

  def _config_digest(self) -> str | None:
    """The digest of the model config the run trains with (its config.json,
    written before the first save), or None without one."""
    try:
      config = workdir_lib.read_run_config(self.workdir)
    except ValueError:
      return None
    return None if config is None else workdir_lib.model_config_digest(config)

  def save(self, epoch: int, state, progress: dict[str, Any],
           is_best: bool, latest: bool = True) -> None:
    """Saves the state after `epoch` as the best one when `is_best`, then as
    the latest one (unless `latest` is False).

    The best checkpoint is written first, so a run killed in between resumes
    from an earlier latest checkpoint and redoes this epoch (`drop_after`
    removes the orphan). After a latest save, all but the newest
    `keep_latest` latest checkpoints are deleted, and so are the best
    checkpoints that none of the kept ones names in
    `progress['best']['epoch']`.

    Raises:
      CheckpointError: the checkpoint could not be written (a full disk...);
        the ones written before are kept.
    """
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              progress=ocp.args.JsonSave(progress))
    if is_best:
      self._save(self.best, epoch, args)
    if not latest:
      return
    self._save(self.latest, epoch, args)
    self.drop_interrupted()  # Older than this one now.
    steps = sorted(self.latest.all_steps())
    for step in steps[:-self.keep_latest]:
      _delete(self.latest, step)
    named = {progress.get('best', {}).get('epoch')}
    for step in steps[-self.keep_latest:]:
      if step != epoch:
        named.add(self._progress_of(step).get('best', {}).get('epoch'))
    for step in self.best.all_steps():
      if step not in named:
        _delete(self.best, step)

  def save_interrupted(self, key: int, state, progress: dict[str, Any]
                       ) -> None:
    """Saves a state from the middle of an epoch as the one `interrupted`
    checkpoint (any other one is deleted once it is complete).

    Args:
      key: the checkpoint's step number in `checkpoints/interrupted`, larger
        for later points of the run.
      state: the train state.
      progress: JSON: `epoch` (the epochs finished), `step` (the steps of the
        next epoch done), `best` and the losses of those steps.

    Raises:
      CheckpointError: the checkpoint could not be written; the ones written
        before are kept.
    """
    if self._interrupted is None:
      self._interrupted = _open_manager(self._interrupted_dir)
    self._save(self._interrupted, key, ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        progress=ocp.args.JsonSave(progress)))
    for step in self._interrupted.all_steps():
      if step != key:
        _delete(self._interrupted, step)

  def restore_interrupted(self, state):
    """(state, progress) of the `interrupted` checkpoint, or None when there
    is none or it cannot be restored (a warning then says why)."""
    manager = self._interrupted_manager()
    if manager is None:
      return None
    manager.reload()
    steps = manager.all_steps()
    if not steps:
      return None
    try:
      return self._restore(manager, state, max(steps))
    except manifest.CheckpointError as e:
      log.warn(f'not using the checkpoint saved at an interrupt: {e}')
      return None

  def drop_interrupted(self) -> None:
    """Deletes the `interrupted` checkpoint and its folder, if any."""
    manager = self._interrupted_manager()
    if manager is None:
      return
    manager.reload()
    for step in manager.all_steps():
      _delete(manager, step)
    manager.close()
    self._interrupted = None
    with contextlib.suppress(OSError):  # Not empty: a file of the user's.
      os.rmdir(self._interrupted_dir)

  def _progress_of(self, step: int) -> dict[str, Any]:
    """The progress saved with latest checkpoint `step`, or {} if unreadable."""
    try:
      restored = self.latest.restore(step, args=ocp.args.Composite(
          progress=ocp.args.JsonRestore()))
      return dict(restored['progress'])
    except Exception:  # pylint: disable=broad-except  # Damaged: names none.
      return {}

  def _restore(self, manager, state, step: int):
    """(state, progress) of `step`, checked against its manifest.

    Raises:
      CheckpointError: the step cannot be restored, with the reason.
    """
    step_dir = self._step_dir(manager, step)
    manifest.verify(step_dir)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
      with _orbax_logs_to(os.path.join(self.directory, ORBAX_LOG)):
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            progress=ocp.args.JsonRestore()))
      return restored['state'], dict(restored['progress'])
    except Exception as e:  # pylint: disable=broad-except  # Any damage.
      raise manifest.CheckpointError(f'{step_dir}: {log.error_line(e)}') from None

  def restore_latest(self, state, max_epoch: int | None = None):
    """Returns (state, progress) of the newest latest checkpoint that can be
    restored, or (state, {}) when there is none.

    A checkpoint that cannot be restored is reported on stderr (path and
    reason) and the one before is tried. One without a manifest
    (`UnverifiedError`) is skipped the same way; when only such ones are
    left, the run starts over from `state`.

    Args:
      state: the state to restore into (its structure, shapes and dtypes).
      max_epoch: if given, only checkpoints of epochs up to this one count
        (members of a run killed between their saves resume together).

    Raises:
      CheckpointError: there are latest checkpoints and none can be restored.
    """
    self.latest.reload()
    steps = sorted((step for step in self.latest.all_steps()
                    if max_epoch is None or step <= max_epoch), reverse=True)
    failures = []
    for i, step in enumerate(steps):
      try:
        return self._restore(self.latest, state, step)
      except manifest.UnverifiedError as e:
        instead = (f'resuming from epoch {steps[i + 1]} instead'
                   if i + 1 < len(steps) else
                   'starting over' if not failures else '')
        if instead:
          log.warn(f'not using the checkpoint of epoch {step}: {e}; {instead}')
      except manifest.CheckpointError as e:
        failures.append(str(e))
        if i + 1 < len(steps):
          log.warn(f'cannot restore the checkpoint of epoch {step}: {e}; '
                f'resuming from epoch {steps[i + 1]} instead')
    if failures:
      raise manifest.CheckpointError(
          f'no checkpoint in {self.latest.directory} can be restored ('
          f'{"; ".join(failures)}); move {self.directory} away to start over')
    return state, {}

  def drop_after(self, epoch: int) -> None:
    """Deletes checkpoints of epochs after `epoch`: a resumed run redoes
    those epochs, so the best ones would hide what it selects, and latest
    ones (which could not be restored) would be taken for its own."""
    for manager in (self.best, self.latest):
      manager.reload()
      for step in manager.all_steps():
        if step > epoch:
          _delete(manager, step)

  def restore_best(self, state, epoch: int | None = None):
    """Returns the state of the best checkpoint (of `epoch`, if given).

    Raises:
      FileNotFoundError: when no epoch (or not `epoch`) was saved as best.
      CheckpointError: when it cannot be restored (a damaged file...).
    """
    self.best.reload()
    steps = self.best.all_steps()
    step = epoch if epoch is not None else (max(steps) if steps else None)
    if step is None or step not in steps:
      raise FileNotFoundError(
          f'no best checkpoint{"" if epoch is None else f" of epoch {epoch}"}'
          f' in {self.directory}')
    try:
      return self._restore(self.best, state, step)[0]
    except manifest.CheckpointError as e:
      raise manifest.CheckpointError(f'cannot restore the best checkpoint: {e}'
                            ) from None

  def wait(self) -> None:
    for manager in (self.latest, self.best, self._interrupted):
      if manager is not None:
        manager.wait_until_finished()


def _open_manager(directory: str) -> ocp.CheckpointManager:
  # Steps are pruned by hand (`Checkpoints.save`), never by orbax: one is
  # deleted only once a newer one is complete with its manifest, and the best
  # checkpoint that a kept latest checkpoint's progress names must survive
  # until no kept latest checkpoint names it, or a resumed run could lose it.
  try:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options)
  except Exception as e:  # pylint: disable=broad-except
    raise manifest.CheckpointError(f'cannot open the checkpoints in {directory}: '
                          f'{log.error_line(e)}') from None


def _delete(manager: ocp.CheckpointManager, step: int) -> None:
  try:
    manager.delete(step)
  except Exception as e:  # pylint: disable=broad-except
    raise manifest.CheckpointError(f'cannot delete checkpoint {step} in '
                          f'{manager.directory}: {log.error_line(e)}') from None


def _join_orbax_threads(timeout_s: float) -> None:
  """Waits (up to `timeout_s`) for orbax's writer threads: when one fails,
  orbax raises at once while the others may still write."""
  deadline = time.time() + timeout_s
  for thread in threading.enumerate():
    if (thread is not threading.current_thread() and
        type(thread).__module__.startswith('orbax.')):
      thread.join(max(0.0, deadline - time.time()))


def _remove_unfinished(directory: str) -> None:
  """Deletes the temporary step directories that a failed or killed save
  left (only the process writing the run calls this)."""
  with contextlib.suppress(FileNotFoundError):
    for name in os.listdir(directory):
      if _TMP_MARK in name and name.split('.')[0].isdigit():
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def restore_variables(run: str, abstract_variables: dict) -> dict:
  """Restores {'params', 'batch_stats'} of a run's best checkpoint.

  Only these two subtrees of the saved train state are read (orbax partial
  restore), so the optimiser state, and any other field the state holds, is
  neither needed nor read.

  Args:
    run: a run directory.
    abstract_variables: the model's variables as `jax.ShapeDtypeStruct`s
      (`jax.eval_shape` of `model.init`): the shapes the checkpoint must have.

  Returns:
    The variables as NumPy arrays, in the structure of `abstract_variables`.

  Raises:
    PredictError: no checkpoint, an unreadable (truncated, corrupt) one, or
      one that does not hold this model's variables.
  """
  step_dir = workdir_lib.best_checkpoint(run)
  retrain = (f'restore it from a copy, or train the run again (move {run} '
             'away and run its training command)')
  try:
    manifest.verify(step_dir)  # Sizes and CRC32s, where recorded.
  except ValueError as e:
    raise workdir_lib.PredictError(
        f'checkpoint of {run} is damaged: {e}; {retrain}') from None
  _check_config_unchanged(run, step_dir)
  state_dir = os.path.join(step_dir, 'state')
  if not os.path.isdir(state_dir):
    raise workdir_lib.PredictError(
        f'{state_dir} is missing: not a checkpoint of this '
        f'code, or an incomplete one; {retrain}')
  target = {name: abstract_variables[name] for name in ('params', 'batch_stats')
            if abstract_variables.get(name)}
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except  # orbax, tensorstore.
    raise workdir_lib.PredictError(
        f'checkpoint {state_dir} cannot be read, it may be '
        f'truncated or corrupt ({log.error_line(e)[:300]}); {retrain}'
    ) from None
  expected = jax.tree_util.tree_flatten_with_path(target)[0]
  try:
    got = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
  except Exception:  # pylint: disable=broad-except
    got = {}
  for path, leaf in expected:
    value = got.get(path)
    if value is None or np.shape(value) != tuple(leaf.shape):
      raise workdir_lib.PredictError(
          f'checkpoint {state_dir} does not hold this model: '
          f'{jax.tree_util.keystr(path)} is '
          f'{"missing" if value is None else np.shape(value)}, the model '
          f'needs {tuple(leaf.shape)}')
  return jax.tree.map(lambda leaf, value: np.asarray(value, leaf.dtype),
                      target, restored)


def _check_config_unchanged(run: str, step_dir: str) -> None:
  """Raises PredictError when the run's config.json no longer describes the
  model its checkpoint was trained as (its manifest's config digest; older
  checkpoints record none and are not checked)."""
  recorded = manifest.config_digest(step_dir)
  if recorded is None:
    return
  path = os.path.join(run, workdir_lib.CONFIG_FILE)
  config = workdir_lib.read_json(path)
  if workdir_lib.model_config_digest(config) != recorded:
    raise workdir_lib.PredictError(
        f'{path} was changed after training: its model, input or '
        f'preprocessing ({", ".join(workdir_lib.MODEL_CONFIG_FIELDS)}) is not '
        f'what {step_dir} was trained with; put back the config.json the run '
        'wrote, or train the run again')
