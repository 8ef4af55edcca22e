"""A trained run, or a fold ensemble of runs, as a function from scans to HC.

  predictor = inference.load('runs/cv_grid')
  out = predictor([image_uint8_2d, ...], pixel_sizes_mm=[0.1, ...])
  out['hc_mm'], out['hc_mm_sd'], out['hc_px'], out['status'], out['message']

Images are preprocessed by the training code's own TF ops (resize to the
model input, `image_size` rows by `image_width` columns, the uint8 rounding
of the prepared training images, per-image z-score), so a run's test-fold
images get the very predictions in its `predictions_test.csv`. Only the
model's parameters and batch statistics are restored from the best
checkpoint (`hc_jax.runs`); the optimiser state is never read.

Each prediction gets a status: 'ok'; 'uncertain' (a fold ensemble whose
runs' SD in mm is above `max_sd_mm`); 'implausible' (HC outside the
plausible range: HC18's span, the training range where recorded, each
widened by `RANGE_MARGIN`, and in px what fits in the image); or 'refused'
(a (nearly) constant image, or one smaller than the model input).
"""

import concurrent.futures
import dataclasses
import functools
import math
import os
from typing import Sequence

import numpy as np

from hc_jax import runs as runs_lib

BATCH_SIZE = 32
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
# Inference builds every model with Flax's own layers: `hc_jax.fast_layers`
# only speeds up training on a CPU, and the plain layers run on any backend.
LAYERS = 'plain'

PredictError = runs_lib.PredictError


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


@dataclasses.dataclass
class Predictor:
  """A model (or fold ensemble) ready to predict HC; make it with `load`.

  Attributes:
    runs: the run directories, one per ensemble member.
    image_size: rows of the model input.
    resize_mode: 'stretch' or 'letterbox', as in training.
    normalisers_px: each run's `normaliser_px` (from its results.json).
    train_hc_mm: (min, max) HC in mm of the training images, or None when
      the runs did not record it.
    train_hc_px: (min, max) HC in px of the training images, or None.
    image_width: columns of the model input; 0 for a square one.
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
  image_width: int = 0

  @property
  def is_ensemble(self) -> bool:
    return len(self.runs) > 1

  @property
  def input_shape(self) -> tuple[int, int]:
    """(height, width) of the model input."""
    return self.image_size, self.image_width or self.image_size

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
    input_height, input_width = self.input_shape
    if height < input_height or width < input_width:
      return (f'image is {width}x{height} px, smaller than the model input '
              f'{input_width}x{input_height}: not a scan')
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
      float32 [height, width, 1] (`input_shape`): resized, rounded to uint8,
      z-scored.
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
    inputs = np.zeros([num_images, *self.input_shape, 1], np.float32)
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


def _hide_gpus_from_tf(tf):
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):  # Already initialised.
    pass


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
  runs = runs_lib.run_dirs(workdir)  # Before the heavy imports: fail fast.
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import ml_collections
  import tensorflow as tf
  from hc_jax import models
  from hc_jax import prepare
  from hc_jax import preprocess
  configs = runs_lib.read_configs(runs)
  results = [runs_lib.read_json(os.path.join(run, 'results.json'))
             for run in runs]
  normalisers_px = runs_lib.normalisers_px(runs, results)
  train_hc_mm, train_hc_px = runs_lib.training_ranges(results)
  config_path = os.path.join(runs[0], 'config.json')
  try:
    config = ml_collections.ConfigDict({**configs[0], 'layers': LAYERS})
    height, width = prepare.input_shape(config)
    if min(height, width) < 1:
      raise ValueError(f'the model input is {width}x{height} px')
    if config.resize_mode not in prepare.RESIZE_MODES:
      raise ValueError(f'unknown resize_mode {config.resize_mode!r}')
    model = models.from_config(config)
    abstract = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0),
        jnp.zeros((1, height, width, 1), jnp.float32))
  except Exception as e:  # pylint: disable=broad-except  # Any config error.
    raise runs_lib.PredictError(
        f'{config_path}: cannot build the model ({runs_lib.error_line(e)})'
    ) from None
  variables = [runs_lib.restore_variables(run, abstract) for run in runs]
  _hide_gpus_from_tf(tf)

  @tf.function(input_signature=[tf.TensorSpec([None, None, 1], tf.uint8)])
  def prepare_image(image):
    # As the prepared training images (resized, uint8), then z-scored as the
    # trainer does.
    resized = preprocess.resize(image, (height, width), config.resize_mode)
    return preprocess.zscore(preprocess.to_uint8(resized))

  forward = jax.jit(functools.partial(model.apply, train=False))
  return Predictor(runs=runs, image_size=height, image_width=width,
                   resize_mode=config.resize_mode,
                   normalisers_px=normalisers_px, _variables=variables,
                   _forward=forward, _prepare=prepare_image,
                   train_hc_mm=train_hc_mm, train_hc_px=train_hc_px)
