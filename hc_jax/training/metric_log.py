"""A run's metric log: metrics.jsonl (one JSON line per evaluation) and
TensorBoard scalars.

`MetricWriter` survives a killed run: each line is written with one write
and flushed to disk, and a resumed run's writer keeps the lines of the
epochs it resumes after (and a finished run's test line), dropping torn and
later lines, so each epoch has exactly one line.
"""

import json
import os
from typing import Any

from hc_jax import log
from hc_jax import workdir as workdir_lib


def _is_test_record(record: dict[str, Any]) -> bool:
  """Whether a metrics line holds the test-fold scores that end a run."""
  return any(str(key).startswith('test_') for key in record)


class MetricWriter:
  """Appends one JSON line per evaluation, and TensorBoard scalars.

  Each line is written with one write and flushed to disk (fsync), so a
  killed run leaves at most a torn last line, which the next open drops.
  """

  def __init__(self, workdir: str, resume_epoch: int = 0):
    """Opens the log of a run resumed after `resume_epoch` (0: a new run).

    Kept are the epoch lines up to `resume_epoch` and the line of test-fold
    scores ('test_*' keys) of a finished run, which a new one replaces
    (`write`); dropped are the lines of later epochs (a killed run's, redone
    now) and torn lines. So each epoch has exactly one line, and the run at
    most one test line, whatever point the last run died at.
    """
    self.path = os.path.join(workdir, workdir_lib.METRICS_FILE)
    self._has_test_line = False
    if os.path.exists(self.path):
      kept, dropped_torn = [], 0
      # Damaged bytes that are not UTF-8 make their line unreadable, as a
      # torn one is, rather than the whole log.
      with open(self.path, encoding='utf-8', errors='replace') as f:
        for line in f:
          if not line.strip():
            continue
          try:
            record = json.loads(line)
            epoch = int(record['epoch'])
          except (ValueError, TypeError, KeyError):
            dropped_torn += 1
            continue
          if _is_test_record(record):
            self._has_test_line = True
          elif epoch > resume_epoch:
            continue
          kept.append(line if line.endswith('\n') else line + '\n')
      if dropped_torn:
        log.warn(f'dropped {dropped_torn} unreadable line(s) of {self.path}')
      self._rewrite(kept)
    try:  # TensorBoard events need TF's summary writer; the TF-free path skips.
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      self._tf = tf
      self._summary = tf.summary.create_file_writer(
          os.path.join(workdir, workdir_lib.TENSORBOARD_DIR))
    except ImportError:
      self._tf = self._summary = None

  def _rewrite(self, lines: list[str]) -> None:
    """Replaces the log by `lines` atomically."""
    with open(self.path + '.tmp', 'w') as f:
      f.writelines(lines)
      f.flush()
      os.fsync(f.fileno())
    os.replace(self.path + '.tmp', self.path)

  def write(self, record: dict[str, Any]) -> None:
    """Appends `record` (with an 'epoch', and a 'step' for TensorBoard); a
    record of test-fold scores replaces the one a finished run left."""
    if _is_test_record(record):
      if self._has_test_line:
        with open(self.path) as f:
          self._rewrite([line for line in f
                         if not _is_test_record(json.loads(line))])
      self._has_test_line = True
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
      f.flush()
      os.fsync(f.fileno())
    if self._summary is not None:
      with self._summary.as_default():
        for name, value in record.items():
          if name != 'step' and isinstance(value, (int, float)):
            self._tf.summary.scalar(name, value, step=record['step'])
      self._summary.flush()

  def close(self) -> None:
    if self._summary is not None:
      self._summary.close()
