"""Finished training runs, read back for prediction.

A workdir is one run (it holds config.json) or a directory of runs (a fold
ensemble: `fold0/` ... `fold4/`). This module finds them, reads and checks
their config.json and results.json, and restores the model's parameters and
batch statistics from each run's best checkpoint; `hc_jax.evaluation.inference` builds
the predictor on top.
"""

import json
import math
import os
from typing import Any, Sequence

import numpy as np

from hc_jax import log

# Fields that must agree between the runs of an ensemble: they share one
# model and one preprocessing.
ENSEMBLE_FIELDS = ('model', 'dtype', 'image_size', 'image_width',
                   'resize_mode')
# Defaults of fields that older runs' config.json lacks.
CONFIG_DEFAULTS = {'image_width': 0}  # 0: a square input.
# results.json keys with the training set's HC range (absent in older runs).
TRAIN_RANGE_KEYS = ('train_hc_mm_min', 'train_hc_mm_max', 'train_hc_px_min',
                    'train_hc_px_max')


class PredictError(ValueError):
  """A usage, configuration or model error (the command line exits 2)."""


def run_dirs(workdir: str) -> list[str]:
  """The finished runs a workdir stands for: itself, or its subdirectories.

  Args:
    workdir: a run (holds config.json) or a grid of runs.

  Returns:
    Run directories, sorted.

  Raises:
    PredictError: no such directory, it holds no run, or a run has no
      results.json (training did not finish).
  """
  if not os.path.isdir(workdir):
    raise PredictError(f'workdir {workdir} does not exist')
  if os.path.isfile(os.path.join(workdir, 'config.json')):
    runs = [workdir]
  else:
    runs = sorted(
        os.path.join(workdir, name) for name in os.listdir(workdir)
        if os.path.isfile(os.path.join(workdir, name, 'config.json')))
    if not runs:
      raise PredictError(
          f'{workdir} is not a run (no config.json) and has no run '
          'subdirectories')
  for run in runs:
    if not os.path.isfile(os.path.join(run, 'results.json')):
      raise PredictError(
          f'{run} has no results.json: training did not finish')
  return runs


def read_json(path: str) -> dict:
  """A JSON object from a file.

  Raises:
    PredictError: when it cannot be read or is not a JSON object.
  """
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise PredictError(f'{path}: cannot be read ({log.error_line(e)})') from None
  if not isinstance(value, dict):
    raise PredictError(f'{path}: expected a JSON object')
  return value


def read_configs(runs: Sequence[str]) -> list[dict]:
  """The runs' config.json, checked to describe one model and preprocessing.

  Args:
    runs: run directories (from `run_dirs`).

  Returns:
    Each run's config as a dict, with `CONFIG_DEFAULTS` filled in where an
    older run lacks them.

  Raises:
    PredictError: an unreadable config.json, one that lacks an
      `ENSEMBLE_FIELDS` entry, or runs that disagree on one.
  """
  configs = []
  for run in runs:
    config = {**CONFIG_DEFAULTS,
              **read_json(os.path.join(run, 'config.json'))}
    missing = [field for field in ENSEMBLE_FIELDS if field not in config]
    if missing:
      raise PredictError(f'{os.path.join(run, "config.json")} lacks '
                         f'{", ".join(missing)}')
    configs.append(config)
  for run, config in zip(runs[1:], configs[1:]):
    for field in ENSEMBLE_FIELDS:
      if config[field] != configs[0][field]:
        raise PredictError(
            f'{run} has {field}={config[field]!r} but {runs[0]} has '
            f'{configs[0][field]!r}; an ensemble needs one model config')
    if bool(config.get('init_from')) != bool(configs[0].get('init_from')):
      # `models.from_config` builds ResNet50 in Keras' layout for pretrained
      # weights: the same variables, other values.
      raise PredictError(
          f'{run} and {runs[0]} differ in whether they start from pretrained '
          'weights (init_from); an ensemble needs one model config')
  return configs


def normalisers_px(runs: Sequence[str], results: Sequence[dict]
                   ) -> list[float]:
  """Each run's `normaliser_px` (from its results.json).

  Raises:
    PredictError: when one is missing or not a positive number.
  """
  values = []
  for run, result in zip(runs, results):
    try:
      normaliser_px = float(result['normaliser_px'])
      if not math.isfinite(normaliser_px) or normaliser_px <= 0:
        raise ValueError
    except (KeyError, TypeError, ValueError):
      raise PredictError(f'{os.path.join(run, "results.json")}: no positive '
                         'normaliser_px') from None
    values.append(normaliser_px)
  return values


def training_ranges(results: Sequence[dict]) -> tuple[tuple | None,
                                                      tuple | None]:
  """((mm min, max), (px min, max)) HC the runs were trained on, or Nones.

  An ensemble's range spans all its runs'; None when any run lacks it.
  """
  if not all(all(key in r for key in TRAIN_RANGE_KEYS) for r in results):
    return None, None
  try:
    values = {key: [float(r[key]) for r in results] for key in TRAIN_RANGE_KEYS}
  except (TypeError, ValueError):
    raise PredictError('results.json: train_hc_* entries are not numbers'
                       ) from None
  return ((min(values['train_hc_mm_min']), max(values['train_hc_mm_max'])),
          (min(values['train_hc_px_min']), max(values['train_hc_px_max'])))


def best_checkpoint(run: str) -> str:
  """The directory of a run's best checkpoint (the newest, if several).

  Raises:
    PredictError: when the run has none.
  """
  best = os.path.join(os.path.abspath(run), 'checkpoints', 'best')
  try:
    steps = [int(name) for name in os.listdir(best) if name.isdigit()]
  except OSError:
    raise PredictError(f'{run} has no best checkpoint ({best} is missing)'
                       ) from None
  if not steps:
    raise PredictError(f'{best} holds no finished checkpoint')
  return os.path.join(best, str(max(steps)))


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
  # pylint: disable=import-outside-toplevel
  import jax
  import orbax.checkpoint as ocp
  from hc_jax.training import checkpoint
  step_dir = best_checkpoint(run)
  try:
    checkpoint.verify(step_dir)  # Sizes and CRC32s, where recorded.
  except ValueError as e:
    raise PredictError(f'checkpoint of {run} is damaged: {e}') from None
  state_dir = os.path.join(step_dir, 'state')
  if not os.path.isdir(state_dir):
    raise PredictError(f'{state_dir} is missing: not a checkpoint of this '
                       'code, or an incomplete one')
  target = {name: abstract_variables[name] for name in ('params', 'batch_stats')
            if abstract_variables.get(name)}
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except  # orbax, tensorstore.
    raise PredictError(f'checkpoint {state_dir} cannot be read, it may be '
                       f'truncated or corrupt ({log.error_line(e)[:300]})'
                       ) from None
  expected = jax.tree_util.tree_flatten_with_path(target)[0]
  try:
    got = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
  except Exception:  # pylint: disable=broad-except
    got = {}
  for path, leaf in expected:
    value = got.get(path)
    if value is None or np.shape(value) != tuple(leaf.shape):
      raise PredictError(
          f'checkpoint {state_dir} does not hold this model: '
          f'{jax.tree_util.keystr(path)} is '
          f'{"missing" if value is None else np.shape(value)}, the model '
          f'needs {tuple(leaf.shape)}')
  return jax.tree.map(lambda leaf, value: np.asarray(value, leaf.dtype),
                      target, restored)


METRICS_FILE = 'metrics.jsonl'
RESULTS_FILE = 'results.json'
PREDICTIONS_FILE = 'predictions_test.csv'
CONFIG_FILE = 'config.json'


def read_run_config(workdir: str) -> dict[str, Any] | None:
  """The config.json of a run in `workdir` (None when there is none).

  Raises:
    ValueError: config.json is there but unreadable.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path) as f:
      saved = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is unreadable ({type(e).__name__}: '
                     f'{" ".join(str(e).split())}); move {workdir} away to '
                     'start over') from None
  if not isinstance(saved, dict):
    raise ValueError(f'{path} holds no config; move {workdir} away to start '
                     'over')
  return saved


def flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """A nested dict (a config) as {'a.b': value}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat
