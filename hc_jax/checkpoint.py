"""Checkpoints (orbax) and metric logs (JSON lines, TensorBoard) of a run.

Two orbax `CheckpointManager`s under `workdir/checkpoints/`: `latest` (for
resuming) and `best` (the epoch with the lowest validation MAE, for the final
test). Each holds the train state and a small JSON record of progress. orbax
writes to a temporary directory and renames it when complete, so a run killed
while saving resumes from the previous epoch.
"""

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """The latest and the best checkpoint of a run."""

  def __init__(self, workdir: str):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.latest = ocp.CheckpointManager(
        os.path.join(self.directory, 'latest'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False))
    # Best checkpoints are pruned by hand (`save`), never by orbax: the one
    # that the latest checkpoint's progress names must survive until a newer
    # latest checkpoint names another, or a resumed run could lose it.
    self.best = ocp.CheckpointManager(
        os.path.join(self.directory, 'best'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=False))

  @staticmethod
  def _save(manager, epoch, args):
    if not manager.save(epoch, args=args):
      raise RuntimeError(f'orbax did not save epoch {epoch} in '
                         f'{manager.directory}')

  def save(self, epoch: int, state, progress: dict[str, Any],
           is_best: bool, latest: bool = True) -> None:
    """Saves the state after `epoch` as the best one when `is_best`, then as
    the latest one (unless `latest` is False).

    The best checkpoint is written first, so a run killed in between resumes
    from an earlier latest checkpoint and redoes this epoch (`drop_after`
    removes the orphan). After a latest save, best checkpoints other than the
    one its `progress['best']['epoch']` names are deleted.
    """
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              progress=ocp.args.JsonSave(progress))
    if is_best:
      self._save(self.best, epoch, args)
    if latest:
      self._save(self.latest, epoch, args)
      keep = progress.get('best', {}).get('epoch')
      if keep is not None:
        for step in self.best.all_steps():
          if step != keep:
            self.best.delete(step)

  @staticmethod
  def _restore(manager, state, step=None):
    """(state, progress) of `step` (default: the newest), or (None, {})."""
    step = manager.latest_step() if step is None else step
    if step is None:
      return None, {}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        progress=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['progress'])

  def restore_latest(self, state):
    """Returns (state, progress) of the latest checkpoint, or (state, {})."""
    restored, progress = self._restore(self.latest, state)
    return (state, {}) if restored is None else (restored, progress)

  def drop_after(self, epoch: int) -> None:
    """Deletes best checkpoints of epochs after `epoch` (a resumed run redoes
    those epochs, so they would otherwise hide what it selects)."""
    for step in self.best.all_steps():
      if step > epoch:
        self.best.delete(step)

  def restore_best(self, state, epoch: int | None = None):
    """Returns the state of the best checkpoint (of `epoch`, if given).

    Raises:
      FileNotFoundError: when no epoch (or not `epoch`) was saved as best.
    """
    self.best.reload()
    steps = self.best.all_steps()
    step = epoch if epoch is not None else (max(steps) if steps else None)
    if step is None or step not in steps:
      raise FileNotFoundError(
          f'no best checkpoint{"" if epoch is None else f" of epoch {epoch}"}'
          f' in {self.directory}')
    return self._restore(self.best, state, step)[0]

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()


class MetricWriter:
  """Appends one JSON line per evaluation, and TensorBoard scalars."""

  def __init__(self, workdir: str, resume_epoch: int = 0):
    """Opens the log; lines after `resume_epoch` (a killed run's) are dropped."""
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f
                if line.strip() and json.loads(line)['epoch'] <= resume_epoch]
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(kept)
      os.replace(self.path + '.tmp', self.path)
    try:  # TensorBoard events need TF's summary writer; the TF-free path skips.
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      self._tf = tf
      self._summary = tf.summary.create_file_writer(
          os.path.join(workdir, 'tensorboard'))
    except ImportError:
      self._tf = self._summary = None

  def write(self, record: dict[str, Any]) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._summary is not None:
      with self._summary.as_default():
        for name, value in record.items():
          if name != 'step' and isinstance(value, (int, float)):
            self._tf.summary.scalar(name, value, step=record['step'])
      self._summary.flush()

  def close(self) -> None:
    if self._summary is not None:
      self._summary.close()
