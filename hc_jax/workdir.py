"""A run directory: its file names and layout, the finished runs a workdir
stands for, and what a run's files say (its config, normaliser and training
HC range, its best checkpoint).

A workdir is one run (it holds config.json) or a directory of runs (a fold
ensemble: `fold0/` ... `fold4/`). Every file name of a run directory is
defined here; `hc_jax.training` writes them, `hc_jax.evaluation` and the
commands read them.
"""

import hashlib
import json
import math
import os
from typing import Any, Sequence
import re

from hc_jax import log

# A run directory (the workdir of one run) holds:
CONFIG_FILE = 'config.json'  # The config it trains with and its data digests.
FOLDS_FILE = 'folds.json'  # The fold assignment.
METRICS_FILE = 'metrics.jsonl'  # One line per epoch, and the test scores.
TENSORBOARD_DIR = 'tensorboard'  # The same metrics as TensorBoard events.
CHECKPOINTS_DIR = 'checkpoints'  # checkpoints/latest (resume), /best (kept).
DIVERGED_FILE = 'diverged.json'  # Where a member's loss turned NaN.
PREDICTIONS_FILE = 'predictions_test.csv'  # Per test image, once finished.
RESULTS_FILE = 'results.json'  # Written last: the run is finished.
LOCK_FILE = '.lock'  # Held by the process training into it.
# A grid's directory of one config holds a run per fold: fold0/ ... fold4/.
FOLD_DIR = re.compile(r'^fold(\d+)$')
# The phantom scans a config with data.source='synthetic' writes for itself,
# and the default cache of prepared arrays, under the workdir.
SYNTHETIC_DIR = os.path.join('data', 'hc18_synthetic')
DATA_CACHE_DIR = os.path.join('data', 'cache')
# Fields that must agree between the runs of an ensemble: they share one
# model and one preprocessing.
ENSEMBLE_FIELDS = ('model', 'dtype', 'image_size', 'image_width',
                   'resize_mode')
# Fields that make a trained model what it is to a prediction: its network,
# input and preprocessing. The checkpoint manifest records their digest
# (`model_config_digest`), so a config.json edited after training is seen.
MODEL_CONFIG_FIELDS = ENSEMBLE_FIELDS + ('model_options', 'init_from')
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
  if os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    runs = [workdir]
  else:
    runs = sorted(
        os.path.join(workdir, name) for name in os.listdir(workdir)
        if os.path.isfile(os.path.join(workdir, name, CONFIG_FILE)))
    if not runs:
      raise PredictError(
          f'{workdir} is not a run (no config.json) and has no run '
          'subdirectories')
  for run in runs:
    if not os.path.isfile(os.path.join(run, RESULTS_FILE)):
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
    raise PredictError(
        f'{path}: cannot be read ({log.error_line(e)})') from None
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
              **read_json(os.path.join(run, CONFIG_FILE))}
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
  best = os.path.join(os.path.abspath(run), CHECKPOINTS_DIR, 'best')
  try:
    steps = [int(name) for name in os.listdir(best) if name.isdigit()]
  except OSError:
    raise PredictError(f'{run} has no best checkpoint ({best} is missing)'
                       ) from None
  if not steps:
    raise PredictError(f'{best} holds no finished checkpoint')
  return os.path.join(best, str(max(steps)))


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


def model_config_digest(config: dict[str, Any]) -> str:
  """A digest of a run's config (as config.json holds it) over
  `MODEL_CONFIG_FIELDS`, `CONFIG_DEFAULTS` filled in."""
  flat = flatten({**CONFIG_DEFAULTS, **config})
  chosen = {key: value for key, value in flat.items()
            if any(key == field or key.startswith(field + '.')
                   for field in MODEL_CONFIG_FIELDS)}
  text = json.dumps(chosen, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """A nested dict (a config) as {'a.b': value}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def fold_dirs(config_dir: str) -> dict[int, str]:
  """{fold: workdir} of the fold<k> directories of a config's directory
  (a grid's ROOT/<config stem>)."""
  found = {}
  for name in os.listdir(config_dir):
    match = FOLD_DIR.match(name)
    if match and os.path.isdir(os.path.join(config_dir, name)):
      found[int(match.group(1))] = os.path.join(config_dir, name)
  return dict(sorted(found.items()))
