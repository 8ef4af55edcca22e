"""Training and evaluation: one trainer for one model or several at once.

`train_and_evaluate(config, workdir)` trains one fold of one config.
`train_members(configs, workdirs)` trains M members at once (configs that
differ only in `config_check.MEMBER_FIELDS`: test fold, loss, seed) with ONE jitted step
over a leading member axis: the member states are stacked, and the step maps
the members either in one `jax.vmap` or one after another with `jax.lax.map`
inside the same compiled step (`members_per_call`; 'auto' times both on the
first steps). With one member the step is `train_step` itself, vmapped over
the member axis of size one (`step.one_member_step`). A member's results
do not depend on which members train beside it.

The step is pure: gather-free (batches of uint8 images come from
`hc_jax.data`), it augments on the accelerator (`hc_jax.data.augment`, which moves
the HC label and the reference ellipse with the image) and applies the
optimiser. It is data parallel over a 1-D device mesh: each member's batch is
split over the 'data' axis and the states are replicated, so the same code
runs on one CPU, one GPU, a TPU slice or several hosts.

Per member, each epoch ends with an evaluation on its validation part (carved
from the training folds); the epoch with the lowest validation MAE (mm) is
kept as the best checkpoint, and only that one is scored on the test fold. A
member whose loss turns NaN or infinite is frozen from then on and scored with
the epoch selected before; only when every member has diverged does the run
stop with `FloatingPointError`. Each member's workdir holds config.json,
folds.json, metrics.jsonl, TensorBoard events, checkpoints/latest and
checkpoints/best, predictions_test.csv and results.json; a run started again
with the same command resumes from its last checkpoint with the same batches
and ends the same.
"""

import contextlib
import json
import os
from typing import Any, Sequence

import jax

from hc_jax import log
from hc_jax import workdir as workdir_lib
from hc_jax.training import config_check
from hc_jax.training import lock as lock_lib


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains one fold, selects on validation, scores the test fold.

  Args:
    config: a config from `configs/` (an ml_collections.ConfigDict).
    workdir: where the run leaves its files; an unfinished run there is
      resumed, a finished one is left as it is (unless `config.rescore`).

  Returns:
    The results (the contents of results.json).

  Raises:
    ValueError: for a bad config or data (and `lock.LockedError` when
      another process holds the workdir, `manifest.CheckpointError` when no
      checkpoint can be restored).
    FloatingPointError: on a NaN or inf loss (the last good checkpoint stays).
  """
  (result,), todo = _results_and_todo([config], [workdir])
  if todo:
    from hc_jax.training import trainer  # pylint: disable=import-outside-toplevel
    with _holding([workdir]):
      (result,) = trainer.Trainer([config], [workdir]).run()
  return result


def _missing(workdir: str) -> list[str]:
  """The folders that creating `workdir` would create, deepest first."""
  missing, folder = [], os.path.abspath(workdir)
  while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
    missing.append(folder)
    folder = os.path.dirname(folder)
  return missing


def finished_results(config, workdir: str) -> dict[str, Any] | None:
  """The results of the run in `workdir` when it is finished as `config`
  asks (the same planned epochs, no `rescore`), else None: the same command
  again changes nothing, more epochs extend the run."""
  path = os.path.join(workdir, workdir_lib.RESULTS_FILE)
  if config.get('rescore', False) or not os.path.isfile(path):
    return None
  with open(path) as f:
    results = json.load(f)
  return results if results.get('planned_epochs') == config.num_epochs else (
      None)


def _results_and_todo(configs, workdirs):
  """Checks everything that can refuse the command before anything in the
  workdirs is written (the configs, the config each workdir was run with);
  returns the results of the members already finished (None for the
  others) and the indices of those to train."""
  config_check.check_members(configs)
  if len(set(map(os.path.abspath, workdirs))) != len(workdirs):
    raise ValueError(f'members need distinct workdirs: {list(workdirs)}')
  for config, workdir in zip(configs, workdirs):  # Before anything is written.
    config_check.check_resume(config, workdir)
  results = [finished_results(c, w) for c, w in zip(configs, workdirs)]
  for result, workdir in zip(results, workdirs):
    if result is not None:
      log.info(
          f'already finished: {os.path.join(workdir, workdir_lib.RESULTS_FILE)} '
          '(--config.rescore=True scores its test fold again)')
  return results, [m for m, r in enumerate(results) if r is None]


@contextlib.contextmanager
def _holding(workdirs):
  """Holds each workdir's lock (on the first host) while the block trains;
  a block that fails leaves none of the folders it would have created."""
  created = sorted({folder for w in workdirs for folder in _missing(w)},
                   key=len, reverse=True)  # Deepest first.
  try:
    with contextlib.ExitStack() as stack:
      for workdir in workdirs:
        if jax.process_index() == 0:
          stack.enter_context(lock_lib.WorkdirLock(workdir))
      yield
  except BaseException:
    for folder in created:  # A run that fails at the start leaves nothing,
      if os.path.isdir(folder) and not os.listdir(folder):  # no parent.
        os.rmdir(folder)
    raise


def train_members(configs: Sequence[Any], workdirs: Sequence[str]
                  ) -> list[dict[str, Any]]:
  """Trains several members at once; see the module docstring.

  Everything that can refuse the command (the configs, the config each
  workdir was run with, the data, the checkpoints to resume from) is checked
  before anything in the workdirs is written, so a refused command leaves
  them as they were.

  Returns:
    One results dict per member, in order.

  Raises:
    ValueError: a bad config, or a workdir run with another config (see
      `config_check.check_resume`) or on other data.
  """
  results, todo = _results_and_todo(configs, workdirs)
  if todo:
    from hc_jax.training import trainer  # pylint: disable=import-outside-toplevel
    with _holding([workdirs[m] for m in todo]):
      trained = trainer.Trainer([configs[m] for m in todo],
                                [workdirs[m] for m in todo]).run()
    for m, result in zip(todo, trained):
      results[m] = result
  return results
