"""Applies a trained run, or a grid of fold runs, to new scans.

  python -m hc_jax.predict --workdir=runs/cnn263k_mse_fold0 \
      --images=path/to/hc18/test_set --out=predictions.csv \
      [--pixel-sizes=CSV] [--overlays=DIR] [--tta-flip] [--max-sd-mm=10]

For each image: HC in pixels of the original image, in mm where its pixel size
is known, and the gestational age by Hadlock (1984), flagged outside the 14-42
weeks the formula was fitted on. `--images` takes directories (every PNG below
them, in subdirectories too, but `*_Annotation.png` and `*_prediction.png`)
and files, comma-separated or with the flag repeated. A row's `filename` is
the image's path relative to the deepest directory holding everything
`--images` names, so same-named files in different folders stay apart.
Pixel sizes come from `--pixel-sizes` (CSV `filename,pixel size(mm)[,...]`, as
in HC18; a row matches by that relative path, else by the base name), or else
from the HC18 CSV beside an images directory (`test_set/` ->
`test_set_pixel_size.csv`, matched by base name).

Every row has a `status` and, unless ok, a `message` saying why:

  ok           predicted, and inside the plausible range.
  uncertain    a fold ensemble whose runs disagree: `hc_mm_sd` above
               `--max-sd-mm` (only checked where the pixel size is known).
  implausible  the prediction is outside the plausible range (below); HC is
               written, the gestational age is not.
  refused      not a scan: a (nearly) constant image, or one smaller than the
               model input; nothing is predicted.
  error        the file cannot be used: missing, unreadable, a symbolic link
               loop, corrupt, not an 8-bit PNG, or no pixel size in the CSV.

The plausible range is where HC can be trusted: in mm, HC18's span (44-346
mm) and the model's training range (from results.json, where recorded), each
widened by `RANGE_MARGIN` (10%) at both ends; in px, the training range so
widened, and always between a tenth of the image's short side and the
perimeter of an ellipse twice the image's size (pi * (H + W)), so that a head
must be visible and fit in the scan.

A workdir whose subdirectories are finished runs (`fold0/` ... `fold4/`) is a
fold ensemble: HC is the mean over the runs and `hc_mm_sd` their standard
deviation (ddof=1). As a library:

  predictor = predict.load('runs/cv_grid')
  out = predictor([image_uint8_2d, ...], pixel_sizes_mm=[0.1, ...])
  out['hc_mm'], out['hc_mm_sd'], out['hc_px'], out['status'], out['message']

Images are preprocessed by the training code's own TF ops (resize, the uint8
rounding of the training cache, per-image z-score), so a run's test-fold
images get the very predictions in its `predictions_test.csv`. Only the
model's parameters and batch statistics are restored from the best
checkpoint; the optimiser state is never read.
"""

import argparse
import concurrent.futures
import csv
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
from typing import Sequence
import warnings

import numpy as np

from hc_jax import gestational_age
from hc_jax import hc18

BATCH_SIZE = 32
PROGRESS_EVERY = 64  # Images per chunk of the CLI, and per progress line.
COLUMNS = ('filename', 'pixel_size_mm', 'hc_px', 'hc_mm', 'hc_mm_sd',
           'ga_weeks', 'ga_flag', 'status', 'message')
OVERLAY_SUFFIX = '_prediction.png'
# Fields that must agree between the runs of an ensemble: they share one
# model and one preprocessing.
ENSEMBLE_FIELDS = ('model', 'dtype', 'image_size', 'resize_mode')

STATUSES = ('ok', 'uncertain', 'implausible', 'refused', 'error')
# Exit codes of the command line.
EXIT_OK, EXIT_FLAGGED, EXIT_USAGE = 0, 1, 2
# HC of the HC18 training set, min and max; a head outside it is outside what
# any model trained on HC18 has seen and, widened by RANGE_MARGIN, outside
# the usual 2nd-trimester-to-term range.
HC18_HC_MM = (44.0, 346.0)
# Ranges (HC18's and a run's training range) are widened by this fraction at
# both ends: [low / (1 + margin), high * (1 + margin)].
RANGE_MARGIN = 0.1
# Fold-ensemble SD (mm) above which a prediction is 'uncertain'. Runs of one
# config trained on different folds of HC18 agree to a few mm.
DEFAULT_MAX_SD_MM = 10.0
# A scan's pixel values vary; below this SD (grey levels) there is no image.
MIN_PIXEL_SD = 1.0
# results.json keys with the training set's HC range (absent in older runs).
TRAIN_RANGE_KEYS = ('train_hc_mm_min', 'train_hc_mm_max', 'train_hc_px_min',
                    'train_hc_px_max')


class PredictError(ValueError):
  """A usage, configuration or model error (the command line exits 2)."""


def _hide_gpus_from_tf(tf):
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):  # Already initialised.
    pass


def _one_line(error: BaseException) -> str:
  text = ' '.join(str(error).split())
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


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


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise PredictError(f'{path}: cannot be read ({_one_line(e)})') from None
  if not isinstance(value, dict):
    raise PredictError(f'{path}: expected a JSON object')
  return value


def best_checkpoint(run: str) -> str:
  """The directory of a run's best checkpoint (the newest, if several).

  Raises:
    PredictError: when the run has none.
  """
  best = os.path.join(run, 'checkpoints', 'best')
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
  from hc_jax import checkpoint
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
                       f'truncated or corrupt ({_one_line(e)[:300]})') from None
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


def available_cores() -> int:
  """The cores this process may run on (its affinity, e.g. under taskset)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def parallel_map(fn, items) -> list:
  """[fn(item) or the exception it raised, ...], in order, over threads.

  PNG decoding (PIL) and the resize (TensorFlow) release the GIL, so reading
  and preparing scans on all cores is faster than one after another.
  """
  def call(item):
    try:
      return fn(item)
    except Exception as e:  # pylint: disable=broad-except  # Reported per item.
      return e
  items = list(items)
  if len(items) < 2:
    return [call(item) for item in items]
  workers = min(len(items), available_cores())
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(call, items))


def _widen(low: float, high: float) -> tuple[float, float]:
  return low / (1 + RANGE_MARGIN), high * (1 + RANGE_MARGIN)


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


@dataclasses.dataclass
class Predictor:
  """A model (or fold ensemble) ready to predict HC; make it with `load`.

  Attributes:
    runs: the run directories, one per ensemble member.
    image_size: side of the square model input.
    resize_mode: 'stretch' or 'letterbox', as in training.
    normalisers_px: each run's `normaliser_px` (from its results.json).
    train_hc_mm: (min, max) HC in mm of the training images, or None when
      the runs did not record it.
    train_hc_px: (min, max) HC in px of the training images, or None.
  """
  runs: list[str]
  image_size: int
  resize_mode: str
  normalisers_px: list[float]
  _variables: list = dataclasses.field(repr=False)
  _forward: object = dataclasses.field(repr=False)
  _prepare: object = dataclasses.field(repr=False)
  train_hc_mm: tuple[float, float] | None = None
  train_hc_px: tuple[float, float] | None = None

  @property
  def is_ensemble(self) -> bool:
    return len(self.runs) > 1

  def plausible_mm(self) -> tuple[float, float]:
    """The HC range (mm) accepted as plausible: HC18's and the training's."""
    low, high = _widen(*HC18_HC_MM)
    if self.train_hc_mm:
      train_low, train_high = _widen(*self.train_hc_mm)
      low, high = max(low, train_low), min(high, train_high)
    return low, high

  def plausible_px(self, image_shape: Sequence[int]) -> tuple[float, float]:
    """The HC range (px) accepted as plausible for an image of this shape."""
    height, width = image_shape[:2]
    low, high = math.pi * min(height, width) / 10, math.pi * (height + width)
    if self.train_hc_px:
      train_low, train_high = _widen(*self.train_hc_px)
      low, high = max(low, train_low), min(high, train_high)
    return low, high

  def refusal(self, image: np.ndarray) -> str | None:
    """Why an image is not a scan the model can measure, or None."""
    height, width = image.shape
    if height < self.image_size or width < self.image_size:
      return (f'image is {width}x{height} px, smaller than the model input '
              f'{self.image_size}x{self.image_size}: not a scan')
    spread = float(image.std())
    if spread < MIN_PIXEL_SD:
      return ('constant image' if spread == 0 else
              f'nearly constant image (pixel SD {spread:.2f})') + ': not a scan'
    return None

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """The model input for one scan, exactly as training makes it.

    Args:
      image: [H, W] uint8 scan, any size.

    Returns:
      float32 [S, S, 1]: resized, rounded to uint8, z-scored.
    """
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.uint8:
      raise ValueError(f'expected a 2D uint8 image, got {image.dtype} '
                       f'{image.shape}')
    return self._prepare(image[..., None]).numpy()

  def _check(self, hc_px, hc_mm, hc_mm_sd, image_shape, max_sd_mm):
    """(status, message) of one prediction."""
    low, high = self.plausible_px(image_shape)
    if not low <= hc_px <= high:  # Also for NaN.
      return 'implausible', (f'HC {hc_px:.1f} px is outside the plausible '
                             f'{low:.0f}-{high:.0f} px')
    if math.isfinite(hc_mm):
      low, high = self.plausible_mm()
      if not low <= hc_mm <= high:
        return 'implausible', (f'HC {hc_mm:.1f} mm is outside the plausible '
                               f'{low:.0f}-{high:.0f} mm')
      if hc_mm_sd > max_sd_mm:  # False for NaN (a single run).
        return 'uncertain', (f'the ensemble\'s runs disagree: SD '
                             f'{hc_mm_sd:.1f} mm > {max_sd_mm:g} mm')
    return 'ok', ''

  def __call__(self, images: Sequence[np.ndarray],
               pixel_sizes_mm: Sequence[float | None] | None = None,
               tta_flip: bool = False,
               max_sd_mm: float = DEFAULT_MAX_SD_MM) -> dict[str, np.ndarray]:
    """Predicts HC for a list of scans, in batches of `BATCH_SIZE`.

    Args:
      images: [H, W] uint8 scans of any sizes.
      pixel_sizes_mm: each scan's pixel size in mm (None or NaN where
        unknown), or None for none known.
      tta_flip: average each run's predictions on the scan and on its
        left-right mirror.
      max_sd_mm: an ensemble SD above this makes a prediction 'uncertain'.

    Returns:
      {'hc_px': HC in px of the original image, 'hc_mm': HC in mm (NaN where
      the pixel size is unknown), 'hc_mm_sd': SD (ddof=1) of the runs' HC in
      mm (NaN for a single run)}, float64 arrays [N], means over the runs
      (NaN for refused images); and 'status', 'message': str arrays [N], the
      status ('ok', 'uncertain', 'implausible' or 'refused') and why.

    Raises:
      ValueError: for an image that is not a 2D uint8 array.
    """
    num_images = len(images)
    if pixel_sizes_mm is None:
      pixel_sizes_mm = [None] * num_images
    if len(pixel_sizes_mm) != num_images:
      raise ValueError(f'{len(pixel_sizes_mm)} pixel sizes for {num_images} '
                       'images')
    pixel_size = np.array([math.nan if p is None else p for p in pixel_sizes_mm],
                          np.float64)
    status = np.full(num_images, 'ok', object)
    message = np.full(num_images, '', object)
    inputs = np.zeros([num_images, self.image_size, self.image_size, 1],
                      np.float32)
    for i, prepared in enumerate(parallel_map(self.preprocess, images)):
      if isinstance(prepared, ValueError):
        raise ValueError(f'image {i}: {prepared}') from None
      if isinstance(prepared, Exception):
        raise prepared
      reason = self.refusal(np.asarray(images[i]))
      if reason:
        status[i], message[i] = 'refused', reason
      else:
        inputs[i] = prepared
    views = [inputs, inputs[:, :, ::-1]] if tta_flip else [inputs]
    targets = np.zeros([len(self.runs), num_images], np.float64)
    for start in range(0, num_images, BATCH_SIZE):
      stop = min(start + BATCH_SIZE, num_images)
      for view in views:
        batch = np.zeros([BATCH_SIZE] + list(inputs.shape[1:]), np.float32)
        batch[:stop - start] = view[start:stop]  # Padded: one compiled shape.
        for member, variables in enumerate(self._variables):
          out = np.asarray(self._forward(variables, batch), np.float64)
          targets[member, start:stop] += out[:stop - start] / len(views)
    hc_px = targets * np.asarray(self.normalisers_px)[:, None]
    hc_mm = hc_px * pixel_size
    out = {
        'hc_px': hc_px.mean(axis=0),
        'hc_mm': hc_mm.mean(axis=0),
        'hc_mm_sd': (hc_mm.std(axis=0, ddof=1) if self.is_ensemble else
                     np.full(num_images, math.nan)),
    }
    for i in range(num_images):
      if status[i] == 'refused':
        for key in ('hc_px', 'hc_mm', 'hc_mm_sd'):
          out[key][i] = math.nan
      else:
        status[i], message[i] = self._check(
            out['hc_px'][i], out['hc_mm'][i], out['hc_mm_sd'][i],
            np.shape(images[i]), max_sd_mm)
    out.update(status=status, message=message)
    return out


def load(workdir: str) -> Predictor:
  """Loads a finished run, or a grid of runs as an ensemble.

  Args:
    workdir: a run directory (config.json, results.json, checkpoints/best) or
      a directory of such runs of the same model config (e.g. fold0..fold4).

  Returns:
    A `Predictor`.

  Raises:
    PredictError: no run at `workdir`, an unfinished run, an ensemble of
      mismatched runs, an unreadable config, results or checkpoint file.
  """
  runs = run_dirs(workdir)  # Before the heavy imports: bad paths fail fast.
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import ml_collections
  import tensorflow as tf
  from hc_jax import preprocess
  from hc_jax import train
  configs = [_read_json(os.path.join(run, 'config.json')) for run in runs]
  results = [_read_json(os.path.join(run, 'results.json')) for run in runs]
  for run, config in zip(runs, configs):
    missing = [field for field in ENSEMBLE_FIELDS if field not in config]
    if missing:
      raise PredictError(f'{os.path.join(run, "config.json")} lacks '
                         f'{", ".join(missing)}')
  for run, config in zip(runs[1:], configs[1:]):
    for field in ENSEMBLE_FIELDS:
      if config[field] != configs[0][field]:
        raise PredictError(
            f'{run} has {field}={config[field]!r} but {runs[0]} has '
            f'{configs[0][field]!r}; an ensemble needs one model config')
  normalisers_px = []
  for run, result in zip(runs, results):
    try:
      normaliser_px = float(result['normaliser_px'])
      if not math.isfinite(normaliser_px) or normaliser_px <= 0:
        raise ValueError
    except (KeyError, TypeError, ValueError):
      raise PredictError(f'{os.path.join(run, "results.json")}: no positive '
                         'normaliser_px') from None
    normalisers_px.append(normaliser_px)
  train_hc_mm, train_hc_px = training_ranges(results)
  config = ml_collections.ConfigDict(configs[0])
  try:
    model = train.create_model(config)
    abstract = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0),
        jnp.zeros((1, config.image_size, config.image_size, 1), jnp.float32))
  except Exception as e:  # pylint: disable=broad-except  # Any config error.
    raise PredictError(f'{os.path.join(runs[0], "config.json")}: cannot build '
                       f'the model ({_one_line(e)})') from None
  variables = [restore_variables(run, abstract) for run in runs]
  _hide_gpus_from_tf(tf)

  @tf.function(input_signature=[tf.TensorSpec([None, None, 1], tf.uint8)])
  def prepare(image):
    # As input_pipeline.prepare (cached uint8) then eval_dataset (z-score).
    resized = preprocess.resize(image, config.image_size, config.resize_mode)
    return preprocess.zscore(preprocess.to_uint8(resized))

  forward = jax.jit(functools.partial(model.apply, train=False))
  return Predictor(runs=runs, image_size=config.image_size,
                   resize_mode=config.resize_mode,
                   normalisers_px=normalisers_px, _variables=variables,
                   _forward=forward, _prepare=prepare,
                   train_hc_mm=train_hc_mm, train_hc_px=train_hc_px)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def _is_scan_name(name: str) -> bool:
  return (name.lower().endswith('.png')
          and not name.endswith(hc18.ANNOTATION_SUFFIX)
          and not name.endswith(OVERLAY_SUFFIX))


def image_paths(specs: Sequence[str]) -> dict[str, str]:
  """Files named by `--images`, keyed by their path relative to the deepest
  directory holding all of them.

  Args:
    specs: directories (searched recursively, in sorted order) or files, each
      possibly a comma-separated list.

  Returns:
    {filename: path} in the order given; a missing file is kept, to be
    reported.

  Raises:
    PredictError: when nothing is named, or a directory holds no PNG.
  """
  paths, roots = [], []
  for spec in specs:
    for item in filter(None, (s.strip() for s in spec.split(','))):
      if os.path.isdir(item):
        found = []
        for folder, subfolders, names in os.walk(item):
          subfolders.sort()
          found += [os.path.join(folder, n) for n in sorted(names)
                    if _is_scan_name(n)]
        if not found:
          raise PredictError(f'{item} holds no PNG scans')
        paths += found
        roots.append(os.path.abspath(item))
      else:
        paths.append(item)
        roots.append(os.path.dirname(os.path.abspath(item)))
  if not paths:
    raise PredictError('--images names no files')
  root = os.path.commonpath(roots)
  return {os.path.relpath(os.path.abspath(path), root): path for path in paths}


def read_pixel_sizes(path: str) -> dict[str, float]:
  """{filename: pixel size in mm} from an HC18-style CSV.

  The first row is a header unless its second cell is a number. A filename
  listed twice with the same size is accepted with a warning; with different
  sizes it is an error.

  Args:
    path: the CSV, `filename,pixel size(mm)[,...]`.

  Returns:
    Pixel sizes by filename (as written in the CSV, stripped).

  Raises:
    PredictError: for a missing or unreadable file, a malformed row, or
      contradictory duplicate rows; the message names the file and line.
  """
  if not os.path.isfile(path):
    raise PredictError(f'pixel-size CSV {path} does not exist')
  rows, line = [], 0
  try:
    with open(path, newline='', encoding='utf-8-sig') as f:
      reader = csv.reader(f)
      for row in reader:
        line = reader.line_num
        if any(cell.strip() for cell in row):
          rows.append((line, row))
  except UnicodeDecodeError as e:
    raise PredictError(f'pixel-size CSV {path} is not UTF-8 text (byte '
                       f'{e.start} cannot be decoded)') from None
  except csv.Error as e:
    raise PredictError(f'pixel-size CSV {path} line {line + 1}: malformed '
                       f'({e})') from None
  except OSError as e:
    raise PredictError(f'pixel-size CSV {path} cannot be read '
                       f'({e.strerror or e})') from None
  if rows and not _parses_as_number(rows[0][1][1:2]):
    rows = rows[1:]  # The header.
  if not rows:
    raise PredictError(f'pixel-size CSV {path} holds no rows')
  sizes, first_line = {}, {}
  for line, row in rows:
    filename = row[0].strip()
    try:
      size = float(row[1])
      if not filename or not math.isfinite(size) or size <= 0:
        raise ValueError
    except (IndexError, ValueError):
      raise PredictError(
          f'{path} line {line}: expected filename,pixel size(mm) with a '
          f'positive size, got {",".join(row)!r}') from None
    if filename in sizes:
      if sizes[filename] != size:
        raise PredictError(
            f'{path} line {line}: {filename} has pixel size {size:g} mm, but '
            f'{sizes[filename]:g} mm on line {first_line[filename]}')
      warnings.warn(f'{path} line {line}: {filename} is listed again (same '
                    f'pixel size as on line {first_line[filename]})',
                    stacklevel=2)
      continue
    sizes[filename], first_line[filename] = size, line
  return sizes


def _parses_as_number(cells: Sequence[str]) -> bool:
  try:
    float(cells[0])
    return True
  except (IndexError, ValueError):
    return False


def find_pixel_size_csv(image_dir: str) -> str | None:
  """The HC18 CSV beside an images directory (`test_set/` ->
  `../test_set_pixel_size.csv`), or the only one there, or None."""
  parent, folder = os.path.split(os.path.abspath(image_dir))
  present = {split_folder: os.path.join(parent, csv_name)
             for split_folder, csv_name in hc18.SPLITS.values()
             if os.path.isfile(os.path.join(parent, csv_name))}
  if folder in present:
    return present[folder]
  return next(iter(present.values())) if len(present) == 1 else None


def write_overlay(image: np.ndarray, lines: Sequence[str], path: str) -> None:
  """Writes the scan as RGB with `lines` of text in its top-left corner."""
  # pylint: disable=import-outside-toplevel
  from PIL import Image, ImageDraw, ImageFont
  canvas = Image.fromarray(image).convert('RGB')
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default(size=max(10, image.shape[0] // 27))
  text = '\n'.join(lines)
  box = draw.multiline_textbbox((8, 8), text, font=font)
  draw.rectangle((box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4), fill='black')
  draw.multiline_text((8, 8), text, font=font, fill=(255, 220, 0))
  canvas.save(path)


def _fmt(value: float, digits: int) -> str:
  return '' if value is None or not math.isfinite(value) else (
      f'{value:.{digits}f}')


def check_writable(path: str, what: str) -> None:
  """Raises PredictError unless a file can be created in `path`'s folder."""
  if os.path.isdir(path):
    raise PredictError(f'{what} {path} is a directory; give a file name')
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix='.hc_jax_probe_')
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise PredictError(f'{what} {path} cannot be written '
                       f'({e.strerror or e})') from None


def write_rows(path: str, rows: Sequence[dict]) -> None:
  """Writes the prediction CSV (`COLUMNS`) atomically.

  Raises:
    PredictError: when it cannot be written; nothing is left behind.
  """
  check_writable(path, '--out')
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path),
                             suffix='.tmp')
  try:
    with os.fdopen(fd, 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=COLUMNS)
      writer.writeheader()
      writer.writerows(rows)
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise PredictError(f'--out {path} cannot be written ({e.strerror or e})'
                       ) from None


_DESCRIPTION = 'Predict HC (and gestational age) for new scans.'
_EPILOG = f"""\
status of each row (the CSV's `status`; `message` says why unless ok):
  ok           predicted and plausible
  uncertain    fold ensemble SD above --max-sd-mm (pixel size known)
  implausible  HC outside HC18's {HC18_HC_MM[0]:g}-{HC18_HC_MM[1]:g} mm, the model's training
               range, or what fits in the image (each widened by
               {RANGE_MARGIN:.0%}); HC is written, no gestational age
  refused      not a scan: (nearly) constant, or smaller than the model input
  error        missing, unreadable, corrupt or not an 8-bit PNG file, or no
               pixel size for it in the pixel-size CSV

CSV columns: {", ".join(COLUMNS)}

exit codes:
  0  every image predicted, with status ok
  1  some images failed or were flagged (any status but ok)
  2  usage, configuration or model error (bad flags, missing or unfinished
     run, unreadable checkpoint or config, bad pixel-size CSV, unwritable
     --out or --overlays); a one-line 'error: ...' on stderr, no CSV written
"""


def _parse_args(argv):
  from hc_jax import cli  # pylint: disable=import-outside-toplevel
  parser = cli.ArgumentParser(  # Its errors are one line, exit status 2.
      prog='python -m hc_jax.predict', description=_DESCRIPTION,
      epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True,
                      help='a finished run, or a directory of runs (ensemble)')
  parser.add_argument('--images', action='append', required=True,
                      help='directories (searched recursively) or PNG files, '
                      'comma-separated or repeated')
  parser.add_argument('--pixel-sizes', '--pixel_sizes', dest='pixel_sizes',
                      help='CSV filename,pixel size(mm); default: the HC18 '
                      'CSV beside each images directory')
  parser.add_argument('--out', required=True, help='output CSV')
  parser.add_argument('--overlays', help='directory for annotated PNGs')
  parser.add_argument('--tta-flip', '--tta_flip', dest='tta_flip',
                      action='store_true', help='average with the mirror image')
  parser.add_argument('--max-sd-mm', '--max_sd_mm', dest='max_sd_mm',
                      type=float, default=DEFAULT_MAX_SD_MM,
                      help='ensemble SD (mm) above which a prediction is '
                      f'uncertain (default {DEFAULT_MAX_SD_MM:g})')
  return parser.parse_args(argv)


def _pixel_sizes(args, files: dict[str, str]) -> dict[str, tuple]:
  """{filename: (csv path or None, pixel size or None)} for every image."""
  if args.pixel_sizes:
    sizes = read_pixel_sizes(args.pixel_sizes)
    return {name: (args.pixel_sizes, sizes.get(name, sizes.get(
        os.path.basename(name)))) for name in files}
  tables = {}
  for image_dir in dict.fromkeys(os.path.dirname(p) for p in files.values()):
    found = find_pixel_size_csv(image_dir or '.')
    tables[image_dir] = (found, read_pixel_sizes(found) if found else {})
    print(f'pixel sizes for {image_dir or "."}/: '
          f'{found or "none found, HC in px only"}', file=sys.stderr)
  out = {}
  for name, path in files.items():
    csv_path, sizes = tables[os.path.dirname(path)]
    out[name] = (csv_path, sizes.get(os.path.basename(path)))
  return out


def _print_warning(message, category, filename, lineno, file=None, line=None):
  del category, filename, lineno, file, line
  print(f'warning: {message}', file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit code (0 ok, 1 some images
  failed or were flagged, 2 usage, configuration or model error)."""
  args = _parse_args(argv)
  from hc_jax import cli  # pylint: disable=import-outside-toplevel
  cli.quiet_logs()  # Before TensorFlow is imported.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO.
  with warnings.catch_warnings():
    warnings.showwarning = _print_warning
    warnings.simplefilter('always', UserWarning)
    try:
      if not math.isfinite(args.max_sd_mm) or args.max_sd_mm < 0:
        raise PredictError(f'--max-sd-mm must be >= 0, got {args.max_sd_mm}')
      check_writable(args.out, '--out')
      if args.overlays:
        try:
          os.makedirs(args.overlays, exist_ok=True)
        except OSError as e:
          raise PredictError(f'--overlays {args.overlays} cannot be created '
                             f'({e.strerror or e})') from None
        check_writable(os.path.join(args.overlays, 'probe.png'), '--overlays')
      files = image_paths(args.images)
      pixel_sizes = _pixel_sizes(args, files)
      predictor = load(args.workdir)
      rows = _predict_files(predictor, files, pixel_sizes, args)
      write_rows(args.out, rows)
    except PredictError as e:
      print(f'error: {e}', file=sys.stderr)
      return EXIT_USAGE
  flagged = [row for row in rows if row['status'] != 'ok']
  print(f'{len(rows) - len(flagged)} of {len(rows)} images predicted, '
        f'{len(flagged)} failed or flagged; wrote {args.out}')
  for row in flagged:
    print(f'  {row["status"]}: {row["filename"]}: {row["message"]}')
  return EXIT_FLAGGED if flagged else EXIT_OK


def _predict_files(predictor: Predictor, files: dict[str, str],
                   pixel_sizes: dict[str, tuple], args) -> list[dict]:
  """The CSV rows for `files` ({filename: path}), chunk by chunk."""
  rows = []
  names = list(files)
  for start in range(0, len(names), PROGRESS_EVERY):
    chunk = []  # (row, image) of the files that read well.
    chunk_names = names[start:start + PROGRESS_EVERY]
    reads = parallel_map(hc18.read_grayscale, [files[n] for n in chunk_names])
    for name, read in zip(chunk_names, reads):
      row = dict.fromkeys(COLUMNS, '')
      row.update(filename=name, status='ok')
      rows.append(row)
      csv_path, pixel_size = pixel_sizes[name]
      if isinstance(read, Exception):
        message = (str(read) if isinstance(read, ValueError) else
                   f'cannot read the file ({_one_line(read)})')
        row.update(status='error', message=message)
        continue
      if csv_path and pixel_size is None:
        row.update(status='error', message=f'no pixel size for it in {csv_path}')
        continue
      image, note = read
      if note:
        print(f'{files[name]}: {note}', file=sys.stderr)
      row['pixel_size_mm'] = '' if pixel_size is None else pixel_size
      chunk.append((row, image))
    if chunk:
      out = predictor([image for _, image in chunk],
                      [row['pixel_size_mm'] or None for row, _ in chunk],
                      tta_flip=args.tta_flip, max_sd_mm=args.max_sd_mm)
      for i, (row, image) in enumerate(chunk):
        row.update(status=out['status'][i], message=out['message'][i])
        if row['status'] == 'refused':
          continue
        row.update(hc_px=_fmt(out['hc_px'][i], 3),
                   hc_mm=_fmt(out['hc_mm'][i], 3),
                   hc_mm_sd=_fmt(out['hc_mm_sd'][i], 3))
        if row['status'] != 'implausible':
          ga_weeks = gestational_age.hadlock_ga_weeks(out['hc_mm'][i])
          row.update(ga_weeks=_fmt(ga_weeks, 2),
                     ga_flag=gestational_age.ga_flag(ga_weeks))
        if args.overlays:
          overlay = os.path.join(
              args.overlays,
              os.path.splitext(row['filename'])[0] + OVERLAY_SUFFIX)
          try:
            os.makedirs(os.path.dirname(overlay), exist_ok=True)
            write_overlay(image, _overlay_lines(row), overlay)
          except OSError as e:
            raise PredictError(f'overlay {overlay} cannot be written '
                               f'({e.strerror or e})') from None
    if len(names) > PROGRESS_EVERY:
      print(f'{len(rows)}/{len(names)} images', file=sys.stderr)
  return rows


def _overlay_lines(row) -> list[str]:
  if not row['hc_mm']:
    lines = [f'HC {float(row["hc_px"]):.1f} px (pixel size unknown)']
  else:
    spread = f' ± {float(row["hc_mm_sd"]):.1f}' if row['hc_mm_sd'] else ''
    lines = [f'HC {float(row["hc_mm"]):.1f}{spread} mm']
    if row['ga_weeks']:
      lines.append(f'GA {row["ga_weeks"]} weeks (Hadlock)')
  if row['ga_flag']:
    lines.append(row['ga_flag'])
  if row['status'] != 'ok':
    lines.append(f'{row["status"].upper()}: {row["message"]}')
  return lines


if __name__ == '__main__':
  sys.exit(main())
