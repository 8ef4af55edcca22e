"""What a model's output is: one object per output kind, beside the networks.

Each model class declares its kind (`output_kind: ClassVar = kinds.MASK`;
`hc_jax.models.kind_of` reads it), and everything that depends on what a
model returns asks that object rather than switching on a name:

  kind = models.kind_of(config)
  loss_of = kind.loss_of(model, config)   # Training: a batch's loss.
  hc_of = kind.hc_of(model)               # Training: the normalised HC [B].
  forward = kind.forward(model, height, width)  # Inference: {'value', ...}.
  value = kind.mirror(value, width)       # A mirrored view's value, back.
  hc_px, ellipses_px = kind.to_original(value, resize, normalisers_px)
  kind.grid(model), kind.columns, kind.cells(out, i), kind.overlay(out, i)

The three kinds:

* `HC` ('hc'): one normalised HC per image `[B]` (the paper's CNNs, `hcnet`);
  its HC in px is the value times the run's normaliser.
* `ELLIPSE` ('ellipse'): six raw ellipse values `[B, 6]`
  (`hc_jax.nets.ellipse_head`, `hcnet_ellipse`); the HC is the decoded
  ellipse's perimeter in original pixels.
* `MASK` ('mask'): a head-mask logit map and its moments' geometry, a dict
  (`hc_jax.nets.mask_head`, `hcnet_mask`); the ellipse is the moments', and
  the mask's outline is drawn on the overlay. `MASK_LABEL` ('mask_label',
  `hcnet_mask_label`) is the same kind with another quality signal, the
  HC's agreement with the HC of the mirrored scan (`FLIP_AGREEMENT`).

A kind may have a quality signal (`Quality`): a function of the model's
outputs, in [0, 1], whose value below a threshold makes a prediction
'uncertain'. The signal and its default threshold are the kind's
attributes, so a model with another signal declares a variant, e.g.
`dataclasses.replace(kinds.MASK, quality=kinds.Quality(...))`, and predict
takes the threshold from the model (`--min-quality` overrides it).

Nothing here reads files; `hc_jax.training.step` and
`hc_jax.evaluation.inference` run what these functions return.
"""

import dataclasses
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from hc_jax.data import ellipse as ellipse_lib
from hc_jax.nets import ellipse_head
from hc_jax.nets import mask_head

# The CSV columns of a kind that predicts the head's ellipse, after
# `hc_jax.evaluation.prediction_rows.COLUMNS`: the ellipse in px of the
# original image, then its centre and semi-axes in mm.
ELLIPSE_COLUMNS = ('center_x_px', 'center_y_px', 'semi_axis_a_px',
                   'semi_axis_b_px', 'angle_rad', 'center_x_mm', 'center_y_mm',
                   'semi_axis_a_mm', 'semi_axis_b_mm')
# The CSV column of a kind's quality signal, after the others.
QUALITY_COLUMN = 'quality'


def _fmt(value: float | None, digits: int) -> str:
  """A CSV cell: the value with `digits` decimals, '' for None or NaN."""
  return '' if value is None or not math.isfinite(value) else (
      f'{value:.{digits}f}')


@dataclasses.dataclass(frozen=True)
class Quality:
  """A quality signal of a model's outputs.

  Attributes:
    name: what the signal is, for the reader (e.g. 'own_ellipse_iou').
    of: `(outputs, grid) -> [B]` in [0, 1], 1 the best; `outputs` is the
      model's output on a batch (`train=False`), `grid` its kind's `grid`.
    min_value: the default threshold: a prediction whose quality is below
      it is 'uncertain'.
    meaning: what a low value says, the start of the 'uncertain' message.
    mirrored: `of` also takes the outputs on the left-right mirrored batch,
      `(outputs, grid, mirrored_outputs)` (a second forward pass).
  """
  name: str
  of: Callable[..., jax.Array]
  min_value: float
  meaning: str
  mirrored: bool = False


# A mask model's quality: the soft IoU of its mask and the ellipse of the
# mask's own moments (`mask_head.quality`, computed in the model's graph).
# Its default threshold, for a run that stores none, is the 10th percentile
# of hcnet_mask's quality on the five folds' validation parts, chosen there;
# a run stores its own (`quality_record`); see docs/results.md.
OWN_ELLIPSE_IOU = Quality(
    name='own_ellipse_iou', of=lambda outputs, grid: outputs['quality'],
    min_value=0.959, meaning='the head mask is not an ellipse')


def flip_agreement(outputs, grid, mirrored) -> jax.Array:
  """`[B]` 1 - |h - h'| / mean(h, h'): h the moments' perimeter (input px) on
  the scan, h' on its mirror image (a perimeter does not change with a
  mirroring, so a model that measures the head, not the view, agrees)."""
  del grid
  identity = jnp.asarray([1.0, 1.0, 0.0, 0.0], jnp.float32)
  h = mask_head.hc_px_from_moments(outputs['cov'], identity)
  h_mirror = mask_head.hc_px_from_moments(mirrored['cov'], identity)
  return 1.0 - jnp.abs(h - h_mirror) / jnp.maximum(
      (h + h_mirror) / 2, 1e-6)


# The label-only mask model's quality: its HC's agreement with its HC of the
# mirrored scan (its mask is no filled head, so `OWN_ELLIPSE_IOU` says
# nothing). The default threshold is the 10th percentile of hcnet_mask_label's
# flip agreement on fold 0's validation part (69 images), chosen there, for
# a run that stores none; see docs/results.md ("HC values only").
FLIP_AGREEMENT = Quality(
    name='flip_agreement', of=flip_agreement, min_value=0.986,
    meaning='its HC changes with a mirrored view', mirrored=True)


# The share of a model's validation images its stored threshold flags
# (`choose_threshold`): the 10th percentile of its quality there.
FLAGGED_FRACTION = 0.10


def choose_threshold(values, flagged_fraction: float = FLAGGED_FRACTION
                     ) -> float:
  """The quality threshold flagging `flagged_fraction` of `values`: their
  quantile (linear interpolation, as `np.quantile`)."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if not values.size:
    raise ValueError('no finite quality values to choose a threshold from')
  return float(np.quantile(values, flagged_fraction))


def quality_record(quality: Quality, values) -> dict:
  """What a run stores of its quality signal on its validation part (its
  results.json's 'quality'): the signal's name, the chosen threshold, the
  rule and the values (6 decimals), which an ensemble pools."""
  values = [round(float(v), 6) for v in np.asarray(values, np.float64)]
  return {'signal': quality.name,
          'threshold': choose_threshold(values),
          'flagged_fraction': FLAGGED_FRACTION,
          'part': 'val', 'num_images': len(values),
          'values': values}


def stored_threshold(results, quality: 'Quality | None') -> float | None:
  """The threshold stored with a model: of one run, its own; of several (an
  ensemble or a shipped model), the `choose_threshold` of their pooled
  validation values. None when the kind has no signal, or when a run
  records none or another signal's (its kind's default then applies)."""
  if quality is None:
    return None
  records = [dict(result or {}).get('quality') for result in results]
  if not records or any(not record or record.get('signal') != quality.name
                        for record in records):
    return None
  if len(records) == 1:
    return float(records[0]['threshold'])
  return choose_threshold([v for record in records
                           for v in record.get('values', ())])


@dataclasses.dataclass(frozen=True)
class Kind:
  """The 'hc' kind, and the interface every kind has.

  Attributes:
    name: the kind's name (`KINDS`), as in `models.output_kind`.
    quality: the kind's quality signal, or None.
    value_shape: (class) each image's 'value' of `forward`, `()` for a
      normalised HC, `(5,)` for an ellipse in model-input pixels.
    predicts_ellipse: (class) whether `to_original` gives the head's ellipse.
  """
  name: str = 'hc'
  quality: Quality | None = None

  value_shape: ClassVar[tuple[int, ...]] = ()
  predicts_ellipse: ClassVar[bool] = False

  def grid(self, model) -> tuple[int, int] | None:
    """The model's output grid, (stride, margin in cells), or None."""
    del model
    return None

  # Training.

  def needs_outlines(self, config) -> str:
    """What, in the config's loss, needs the reference ellipse (an
    annotation outline) of the training images ('' for nothing: the HC
    values suffice)."""
    del config
    return ''

  def loss_of(self, model, config) -> Callable[..., jax.Array]:
    """`(outputs, ellipses, resize, target, normaliser_px, image_hw,
    loss_fn) -> loss` of a batch, for `hc_jax.training.step.train_step`."""
    del model, config
    return (lambda out, ellipses, resize, target, normaliser_px, image_hw,
            loss_fn: loss_fn(out, target))

  def hc_of(self, model) -> Callable[..., jax.Array]:
    """`(outputs, resize, normaliser_px, image_hw) -> [B]` normalised HC."""
    del model
    return lambda out, resize, normaliser_px, image_hw: out

  # Inference.

  def predictions(self, outputs, height: int, width: int) -> dict:
    """{'value': [B, *value_shape]} (and 'mask' for a mask) of the model's
    outputs on `height` x `width` inputs."""
    del height, width
    return {'value': outputs}

  def forward(self, model, height: int, width: int):
    """`(variables, images) -> predictions` with 'quality' [B] where the
    kind has a signal: the function `hc_jax.evaluation.loading` jits."""
    grid = self.grid(model)

    def forward(variables, images):
      outputs = model.apply(variables, images, train=False)
      out = self.predictions(outputs, height, width)
      if self.quality is not None and self.quality.mirrored:
        mirrored = model.apply(variables, images[:, :, ::-1], train=False)
        out['quality'] = self.quality.of(outputs, grid, mirrored)
      elif self.quality is not None:
        out['quality'] = self.quality.of(outputs, grid)
      return out

    return forward

  def mirror(self, value: np.ndarray, width: int) -> np.ndarray:
    """The value of a left-right mirrored input, mirrored back."""
    del width
    return value

  def to_original(self, value: np.ndarray, resize: np.ndarray,
                  normalisers_px) -> tuple[np.ndarray, np.ndarray | None]:
    """Every run's HC in px of the original images, and the ellipses.

    Args:
      value: `[views, runs, N, *value_shape]`, the mirrored view mirrored
        back (`mirror`).
      resize: `[N, 4]` each image's resize geometry.
      normalisers_px: `[runs]` the runs' normalisers.

    Returns:
      (float64 `[runs, N]`, the mean over the views; float64 `[views *
      runs, N, 5]` the ellipses in original pixels, or None).
    """
    del resize
    return value.mean(0) * np.asarray(normalisers_px)[:, None], None

  # The prediction's CSV row and overlay.

  @property
  def columns(self) -> tuple[str, ...]:
    """The CSV columns the kind adds after
    `hc_jax.evaluation.prediction_rows.COLUMNS`."""
    return (QUALITY_COLUMN,) if self.quality is not None else ()

  def cells(self, out: dict, i: int) -> dict[str, str]:
    """The cells of `columns` for image `i` of a predictor's output."""
    if self.quality is None:
      return {}
    return {QUALITY_COLUMN: _fmt(out['quality'][i], 4)}

  def overlay(self, out: dict, i: int) -> dict[str, Any]:
    """What the overlay of image `i` draws: {'ellipse': `[5]` in original
    px or None, 'outline': `[K, 2]` points or None}."""
    del out, i
    return {'ellipse': None, 'outline': None}


@dataclasses.dataclass(frozen=True)
class EllipseKind(Kind):
  """The 'ellipse' kind: six raw values per image, decoded to an ellipse."""
  name: str = 'ellipse'

  value_shape: ClassVar[tuple[int, ...]] = (5,)
  predicts_ellipse: ClassVar[bool] = True

  def needs_outlines(self, config):
    del config
    return 'an ellipse model'

  def loss_of(self, model, config):
    del model
    weight = config.get('ellipse_weight', 1.0)
    return (lambda out, ell, resize, target, norm, hw, loss_fn:
            ellipse_head.train_loss(out, ell, resize, target, norm, hw,
                                    loss_fn, weight))

  def hc_of(self, model):
    del model
    return (lambda out, resize, norm, hw:
            ellipse_head.normalised_hc(out, resize, norm, *hw))

  def predictions(self, outputs, height, width):
    return {'value': ellipse_head.decode(outputs, height, width)}

  def mirror(self, value, width):
    return ellipse_lib.mirror_ellipses(value, width)

  def to_original(self, value, resize, normalisers_px):
    del normalisers_px
    num_views, num_runs, num_images = value.shape[:3]
    resize = np.broadcast_to(resize, value.shape[:3] + (4,))
    ellipse_in = np.asarray(value, np.float64).astype(np.float32)
    hc_px = np.asarray(ellipse_head.hc_px(ellipse_in, resize), np.float64)
    ellipses = np.asarray(ellipse_head.to_original_pixels(ellipse_in, resize),
                          np.float64)
    return hc_px.mean(0), ellipses.reshape(num_views * num_runs, num_images,
                                           5)

  @property
  def columns(self):
    return ELLIPSE_COLUMNS + super().columns

  def cells(self, out, i):
    values = list(out['ellipse_px'][i]) + list(out['ellipse_mm'][i][:4])
    cells = {column: _fmt(value, 6 if column == 'angle_rad' else 3)
             for column, value in zip(ELLIPSE_COLUMNS, values)}
    return {**cells, **super().cells(out, i)}

  def overlay(self, out, i):
    return {'ellipse': out['ellipse_px'][i], 'outline': None}


@dataclasses.dataclass(frozen=True)
class MaskKind(EllipseKind):
  """The 'mask' kind: a head mask whose moments give the ellipse."""
  name: str = 'mask'
  quality: Quality | None = OWN_ELLIPSE_IOU

  def grid(self, model):
    return model.stride, model.margin // model.stride

  def needs_outlines(self, config):
    """A mask model with a mask term; a label-only one (only 'hc' and
    'shape') trains from HC values."""
    weights = dict(config.get('mask_loss', {}) or {})
    if any(weights.get(term, 1.0 if term in ('bce', 'dice') else 0.0)
           for term in ('bce', 'dice', 'ellipse', 'rays')):
      return ('a mask model with mask terms (mask_loss.bce, .dice, .ellipse '
              'or .rays > 0)')
    return ''

  def loss_of(self, model, config):
    stride, cells = self.grid(model)
    weights = dict(config.get('mask_loss', {}) or {})
    return (lambda out, ell, resize, target, norm, hw, loss_fn:
            mask_head.train_loss(out, ell, resize, target, norm, stride, cells,
                                 loss_fn, weights))

  def hc_of(self, model):
    del model
    return lambda out, resize, norm, hw: mask_head.hc_px(out, resize) / norm

  def predictions(self, outputs, height, width):
    del height, width
    return {'value': outputs['ellipse_in'],
            'mask': jax.nn.sigmoid(outputs['logits'])}

  def outlines(self, masks: np.ndarray, resize: np.ndarray,
               grid: tuple[int, int]) -> list[np.ndarray]:
    """The 0.5 contour of each soft mask `[N, rows, cols]`: `[K, 2]` (x, y)
    in original pixels.

    The points are the centres of the mask cells inside (p >= 0.5) with a
    4-neighbour outside, mapped through the image's resize geometry.
    """
    stride, cells = grid
    rows, cols = masks.shape[1:]
    x, y = (np.asarray(a, np.float64) for a in
            mask_head.grid_coordinates(rows, cols, stride, cells))
    outlines = []
    for mask, (sx, sy, ox, oy) in zip(masks, resize):
      inside = mask >= 0.5
      padded = np.pad(inside, 1)
      edge = inside & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] &
                        padded[1:-1, :-2] & padded[1:-1, 2:])
      i, j = np.nonzero(edge)
      outlines.append(np.stack([(x[j] - ox) / sx, (y[i] - oy) / sy], -1))
    return outlines

  def overlay(self, out, i):
    return {'ellipse': out['ellipse_px'][i],
            'outline': out['mask_outline'][i] if 'mask_outline' in out
                       else None}


HC = Kind()
ELLIPSE = EllipseKind()
MASK = MaskKind()
# A mask model trained from HC values alone (`hcnet_mask_label`): its mask
# is not a filled head, so the mask's agreement with its own ellipse says
# nothing; no quality signal until one is chosen on validation data.
MASK_LABEL = dataclasses.replace(MASK, name='mask_label',
                                 quality=FLIP_AGREEMENT)
KINDS = {kind.name: kind for kind in (HC, ELLIPSE, MASK, MASK_LABEL)}


def get(kind: 'Kind | str') -> Kind:
  """The kind object of `kind`: itself, or the kind registered by that name.

  Raises:
    ValueError: for a name not in `KINDS`.
  """
  if isinstance(kind, Kind):
    return kind
  if kind not in KINDS:
    raise ValueError(f'unknown output kind {kind!r}; one of '
                     f'{", ".join(KINDS)}')
  return KINDS[kind]
