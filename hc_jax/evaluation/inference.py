"""A trained run, or a fold ensemble of runs, as a function from scans to HC.

  predictor = loading.load('runs/cv_grid')  # hc_jax.evaluation.loading
  out = predictor([image_uint8_2d, ...], pixel_sizes_mm=[0.1, ...])
  out['hc_mm'], out['hc_mm_sd'], out['hc_px'], out['status'], out['message']
  out['ellipse_px'], out['ellipse_mm']  # Ellipse models only.

Images are preprocessed by the training code's own TF ops (resize to the
model input, `image_size` rows by `image_width` columns, the uint8 rounding
of the prepared training images, per-image z-score), so a run's test-fold
images get the very predictions in its `predictions_test.csv`. Only the
model's parameters and batch statistics are restored from the best
checkpoint (`hc_jax.training.checkpoint.restore_variables`); the optimiser
state is never read.

Each model declares its output kind (`hc_jax.nets.kinds`, `models.kind_of`),
which turns the model's outputs into what is predicted here: a label model
('hc') gives the normalised HC (times the run's `normaliser_px`: HC in px);
an ellipse model ('ellipse', `hcnet_ellipse`) and a mask model ('mask',
`hcnet_mask`, whose head mask's moments give the ellipse) give the head's
ellipse in model-input pixels, from which its HC in pixels of the ORIGINAL
image follows through each image's own resize geometry
(`cache.resize_geometry` of its size, the run's input shape and resize
mode). A kind may have a quality signal (the mask's: the soft IoU of the
mask and its moments' ellipse), below `min_quality` of which a prediction is
'uncertain'; the threshold's default is the kind's. Ellipses are `[center_x, center_y, semi_axis_a, semi_axis_b,
angle_rad]`, x the column and y the row, a >= b, the angle of a from +x
towards +y in [0, pi), as `hc_jax.data.ellipse.Ellipse`.

The HC of an ellipse model, as of a label model, is the mean over the runs
of each run's HC (with `tta_flip`, the mean over the scan and its mirror).
Its ellipse is `combine_ellipses` of every run's (and view's) ellipse: the
mean centre and mean root shape matrix, safe for the angle, scaled so that
its perimeter is that HC. The mirror's value is mirrored back in
model-input pixels by its kind (an ellipse: x -> W - 1 - x, angle -> pi -
angle) first.

Each prediction gets a status: 'ok'; 'uncertain' (a fold ensemble whose
runs' SD in mm is above `max_sd_mm`, or a quality below `min_quality`); 'implausible' (HC outside the
plausible range: HC18's span, the training range where recorded, each
widened by `RANGE_MARGIN`, and in px what fits in the image); or 'refused'
(a (nearly) constant image, one smaller than the model input, or one that
does not look like an ultrasound scan: `hc_jax.evaluation.scan_likeness`, e.g. noise,
a photograph, a drawing).
"""

import dataclasses
import math
from typing import Sequence

import numpy as np

from hc_jax import workdir as workdir_lib
from hc_jax.data import ellipse as ellipse_lib
from hc_jax.evaluation import scan_files
from hc_jax.evaluation import scan_likeness
from hc_jax.nets import kinds

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
# Inference builds every model with Flax's own layers:
# `hc_jax.nets.fast_layers` only speeds up training on a CPU, and the plain
# layers run on any backend.
LAYERS = 'plain'



# Reading and preparing scans on all cores (`hc_jax.evaluation.scan_files`).
available_cores = scan_files.available_cores  # pylint: disable=invalid-name
parallel_map = scan_files.parallel_map  # pylint: disable=invalid-name


def _widen(low: float, high: float) -> tuple[float, float]:
  return low / (1 + RANGE_MARGIN), high * (1 + RANGE_MARGIN)


def combine_ellipses(ellipses: np.ndarray, hc_px: np.ndarray) -> np.ndarray:
  """One ellipse per image from several predictions of it.

  The centres are averaged, and so are the root shape matrices
  P = R diag(a, b) R^T, which do not change when the angle turns by pi (or
  when a and b swap with the angle turned by pi/2), so the angle averages
  safely. The mean ellipse is then scaled about its centre so that its
  Ramanujan perimeter is `hc_px`.

  Args:
    ellipses: `[K, N, 5]` `[cx, cy, a, b, angle]`, K predictions of N images.
    hc_px: `[N]` the HC each combined ellipse must have (a NaN gives NaN).

  Returns:
    float64 `[N, 5]`, a >= b, angle in [0, pi).
  """
  ellipses = np.asarray(ellipses, np.float64)
  a, b, angle = ellipses[..., 2], ellipses[..., 3], ellipses[..., 4]
  mean, half = (a + b) / 2, (a - b) / 2
  p00 = (mean + half * np.cos(2 * angle)).mean(0)
  p01 = (half * np.sin(2 * angle)).mean(0)
  p11 = (mean - half * np.cos(2 * angle)).mean(0)
  radius = np.hypot((p00 - p11) / 2, p01)
  major, minor = (p00 + p11) / 2 + radius, (p00 + p11) / 2 - radius
  angle = ellipse_lib.wrap_angle(0.5 * np.arctan2(2 * p01, p00 - p11))
  with np.errstate(invalid='ignore', divide='ignore'):
    scale = np.asarray(hc_px, np.float64) / ellipse_lib.ramanujan_perimeter(
        major, minor)
  return np.stack([ellipses[..., 0].mean(0), ellipses[..., 1].mean(0),
                   major * scale, minor * scale, angle], -1)


@dataclasses.dataclass
class Predictor:
  """A model (or fold ensemble) ready to predict HC (`loading.load`).

  Attributes:
    runs: the run directories, one per ensemble member.
    image_size: rows of the model input.
    resize_mode: 'stretch' or 'letterbox', as in training.
    normalisers_px: each run's `normaliser_px` (from its results.json).
    train_hc_mm: (min, max) HC in mm of the training images, or None when
      the runs did not record it.
    train_hc_px: (min, max) HC in px of the training images, or None.
    image_width: columns of the model input; 0 for a square one.
    kind: the model's declared output kind (`models.kind_of`), a
      `hc_jax.nets.kinds.Kind` or the name of one ('hc', 'ellipse', 'mask').
    mask_grid: its kind's grid of the model's output (a mask model's
      stride, margin in cells), else None.
    min_quality: the quality below which a prediction is 'uncertain' (where
      the kind has a quality signal): `loading.load` sets the threshold
      stored with the model (chosen on its validation parts,
      `kinds.stored_threshold`); None: the kind's default.
    trained_on_phantoms: whether a run trained on phantom scans
      (`data.source='synthetic'`, e.g. the demos) rather than HC18.
    scan_check: whether to refuse images that do not look like an
      ultrasound scan (`scan_likeness`); constant images and ones smaller
      than the model input are refused either way.
    name: which model this is, as predict's CSV and overlays name it
      (`loading.load`: `hcnet_mask`, or `hcnet_mask (cv_grid)` for a run).
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
  kind: kinds.Kind | str = 'hc'
  mask_grid: tuple[int, int] | None = None
  trained_on_phantoms: bool = False
  min_quality: float | None = None
  scan_check: bool = True
  name: str = ''

  def __post_init__(self):
    self.kind = kinds.get(self.kind)

  @property
  def predicts_ellipse(self) -> bool:
    """Whether the model gives the head's ellipse (its kind says)."""
    return self.kind.predicts_ellipse

  @property
  def default_min_quality(self) -> float:
    """`min_quality` (the model's stored threshold), else the kind's
    quality's default threshold, else 0."""
    if self.min_quality is not None:
      return self.min_quality
    return self.kind.quality.min_value if self.kind.quality else 0.0

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
    return scan_likeness.refusal(image) if self.scan_check else None

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

  def _check(self, hc_px, hc_mm, hc_mm_sd, image_shape, max_sd_mm,
             quality=math.nan, min_quality=0.0):
    """(status, message) of one prediction."""
    low, high = self.plausible_px(image_shape)
    if low > high:  # The image's own range and the training's do not meet.
      height, width = image_shape[:2]
      train_low, train_high = _widen(*self.train_hc_px)
      return 'implausible', (
          f'no HC is plausible in a {width}x{height} px image for this model: '
          f'the image allows {math.pi * min(height, width) / 10:.0f}-'
          f'{math.pi * (height + width):.0f} px, its training heads were '
          f'{train_low:.0f}-{train_high:.0f} px')
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
    if quality < min_quality:  # False for NaN (no quality signal).
      meaning = self.kind.quality.meaning if self.kind.quality else (
          'low quality')
      return 'uncertain', (f'{meaning}: quality {quality:.3f} < '
                           f'{min_quality:g}')
    return 'ok', ''

  def __call__(self, images: Sequence[np.ndarray],
               pixel_sizes_mm: Sequence[float | None] | None = None,
               tta_flip: bool = False,
               max_sd_mm: float = DEFAULT_MAX_SD_MM,
               min_quality: float | None = None,
               keep_masks: bool = False) -> dict[str, np.ndarray]:
    """Predicts HC (and an ellipse model's ellipse) for a list of scans.

    Args:
      images: [H, W] uint8 scans of any sizes.
      pixel_sizes_mm: each scan's pixel size in mm (None or NaN where
        unknown), or None for none known.
      tta_flip: average each run's predictions on the scan and on its
        left-right mirror.
      max_sd_mm: an ensemble SD above this makes a prediction 'uncertain'.
      min_quality: a quality below this makes a prediction 'uncertain'
        (None: `default_min_quality`, the model's).
      keep_masks: a mask model also returns 'mask', each image's mean soft
        mask over the runs (and views) on the model's grid, and
        'mask_outline', its 0.5 contour as points in original pixels.

    Returns:
      {'hc_px': HC in px of the original image, 'hc_mm': HC in mm (NaN where
      the pixel size is unknown), 'hc_mm_sd': SD (ddof=1) of the runs' HC in
      mm (NaN for a single run)}, float64 arrays [N], means over the runs
      (NaN for refused images); and 'status', 'message': str arrays [N], the
      status ('ok', 'uncertain', 'implausible' or 'refused') and why. An
      ellipse model adds 'ellipse_px', float64 [N, 5] `[cx, cy, a, b,
      angle]` in px of the original image (`combine_ellipses` of the runs'
      and views' ellipses; its perimeter is 'hc_px'), and 'ellipse_mm', the
      same with the centre and semi-axes times the pixel size (NaN where it
      is unknown); NaN rows for refused images; 'quality' [N], the mean over
      the runs and views of the kind's quality signal (NaN for none).

    Raises:
      ValueError: for an image that is not a 2D uint8 array.
      PredictError: when the model's output is not what its kind declares.
    """
    if min_quality is None:
      min_quality = self.default_min_quality
    num_images = len(images)
    if pixel_sizes_mm is None:
      pixel_sizes_mm = [None] * num_images
    if len(pixel_sizes_mm) != num_images:
      raise ValueError(f'{len(pixel_sizes_mm)} pixel sizes for {num_images} '
                       'images')
    pixel_size = np.array(
        [math.nan if p is None else p for p in pixel_sizes_mm], np.float64)
    inputs, status, message = self._inputs(images)
    views = [inputs, inputs[:, :, ::-1]] if tta_flip else [inputs]
    outputs = self._outputs(views)  # [views, runs, N] or [views, runs, N, 5].
    out = self._combine(outputs, images, pixel_size, keep_masks)
    self._set_statuses(out, status, message, images, max_sd_mm, min_quality)
    out.update(status=status, message=message)
    return out

  def _inputs(self, images: Sequence[np.ndarray]):
    """The model inputs of the scans, and the refused ones' statuses.

    Returns:
      (float32 [N, height, width, 1], zeros for refused images; 'status'
      and 'message', object arrays [N]: 'refused' and why, else 'ok', '').

    Raises:
      ValueError: for an image that is not a 2D uint8 array.
    """
    num_images = len(images)
    status = np.full(num_images, 'ok', object)
    message = np.full(num_images, '', object)
    inputs = np.zeros([num_images, *self.input_shape, 1], np.float32)
    refusals = parallel_map(lambda image: self.refusal(np.asarray(image)),
                            images)
    for i, prepared in enumerate(parallel_map(self.preprocess, images)):
      if isinstance(prepared, ValueError):
        raise ValueError(f'image {i}: {prepared}') from None
      if isinstance(prepared, Exception):
        raise prepared
      reason = refusals[i]
      if isinstance(reason, Exception):
        raise reason
      if reason:
        status[i], message[i] = 'refused', reason
      else:
        inputs[i] = prepared
    return inputs, status, message

  def _combine(self, outputs: dict[str, np.ndarray], images,
               pixel_size: np.ndarray, keep_masks: bool
               ) -> dict[str, np.ndarray]:
    """The runs' and views' outputs (`_outputs`) as `__call__` returns them,
    but for 'status' and 'message': means over the runs (and views), the SD
    of an ensemble, the combined ellipse and the mask outlines."""
    num_images = len(images)
    value = outputs['value']
    if len(value) == 2:  # The mirror's values, mirrored back.
      value = np.array(value, np.float64)
      value[1] = self.kind.mirror(value[1], self.input_shape[1])
    resize = self._resize(images)
    hc_px, ellipses = self.kind.to_original(value, resize, self.normalisers_px)
    out = {}
    hc_mm = hc_px * pixel_size
    out.update({
        'hc_px': hc_px.mean(axis=0),
        'hc_mm': hc_mm.mean(axis=0),
        'hc_mm_sd': (hc_mm.std(axis=0, ddof=1) if self.is_ensemble else
                     np.full(num_images, math.nan)),
        'quality': outputs['quality'].mean(axis=(0, 1)),
    })
    if ellipses is not None:
      out['ellipse_px'] = combine_ellipses(ellipses, out['hc_px'])
      out['ellipse_mm'] = out['ellipse_px'].copy()
      out['ellipse_mm'][:, :4] *= pixel_size[:, None]
    if keep_masks and 'mask' in outputs:
      out['mask'] = outputs['mask']
      out['mask_outline'] = self.kind.outlines(outputs['mask'], resize,
                                               self.mask_grid)
    return out

  def _set_statuses(self, out: dict, status: np.ndarray, message: np.ndarray,
                    images, max_sd_mm: float, min_quality: float) -> None:
    """Blanks the refused images' outputs (NaN, no outline) and sets the
    others' status and message (`_check`), in place."""
    for i in range(len(images)):
      if status[i] == 'refused':
        for key in out:
          if key != 'mask_outline':
            out[key][i] = math.nan
        if 'mask_outline' in out:
          out['mask_outline'][i] = np.zeros((0, 2))
      else:
        status[i], message[i] = self._check(
            out['hc_px'][i], out['hc_mm'][i], out['hc_mm_sd'][i],
            np.shape(images[i]), max_sd_mm, out['quality'][i], min_quality)

  def _outputs(self, views: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Every run's output on every view.

    Returns:
      {'value': float64 [views, runs, N] (normalised HC) or [views, runs, N,
      5] (the ellipse in model-input pixels, views as given): the kind's
      `value_shape`, 'quality': [views, runs, N] (NaN for a kind without a
      quality signal)}; a mask model adds 'mask',
      float32 [N, rows, cols], the mean soft mask over runs and views (the
      mirror's mirrored back).
    """
    num_images = len(views[0])
    value = np.zeros([len(views), len(self.runs), num_images] +
                     list(self.kind.value_shape), np.float64)
    quality = np.full([len(views), len(self.runs), num_images], math.nan)
    mask = None
    for start in range(0, num_images, BATCH_SIZE):
      stop = min(start + BATCH_SIZE, num_images)
      for v, view in enumerate(views):
        batch = np.zeros([BATCH_SIZE] + list(view.shape[1:]), np.float32)
        batch[:stop - start] = view[start:stop]  # Padded: one compiled shape.
        for member, variables in enumerate(self._variables):
          out = {k: np.asarray(x) for k, x in
                 self._forward(variables, batch).items()}
          if out['value'].shape[1:] != value.shape[3:]:
            raise workdir_lib.PredictError(
                f'the model returns {list(out["value"].shape)} for a batch '
                f'of {BATCH_SIZE}; its kind {self.kind.name!r} needs '
                f'{[BATCH_SIZE] + list(value.shape[3:])}')
          value[v, member, start:stop] = out['value'][:stop - start]
          if 'quality' in out:
            quality[v, member, start:stop] = out['quality'][:stop - start]
          if 'mask' in out:
            if mask is None:
              mask = np.zeros((num_images,) + out['mask'].shape[1:],
                              np.float32)
            part = out['mask'][:stop - start]
            mask[start:stop] += part[:, :, ::-1] if v == 1 else part
    result = {'value': value, 'quality': quality}
    if mask is not None:
      result['mask'] = mask / (len(views) * len(self.runs))
    return result

  def _resize(self, images) -> np.ndarray:
    """[N, 4] resize geometry of each image into the model input."""
    from hc_jax.data import cache as cache_lib  # pylint: disable=import-outside-toplevel
    original_hw = np.array([np.shape(image)[:2] for image in images],
                           np.int64).reshape(-1, 2)
    return cache_lib.resize_geometry(np.maximum(original_hw, 1),
                                     self.input_shape, self.resize_mode)
