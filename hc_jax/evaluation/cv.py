"""Cross-validation scores of trained runs, alone or as a per-fold ensemble.

  from hc_jax.evaluation import cv
  scores = cv.score(['runs/grid/hcnet_label', 'runs/grid/hcnet_ellipse'],
                    tta_flip=True)
  scores.mae_mm, scores.rows, scores.worst(10)

The members and their runs are found and checked by
`hc_jax.evaluation.cv_runs` (same folds, one fold assignment, the HC18 copy
they trained on); the report and CSVs are `hc_jax.evaluation.cv_report`'s,
and the pooled errors `hc_jax.evaluation.cv_table.pooled_errors`, as in the
grid's table.

The test images are read from the original PNGs of HC18's training_set/
(by default the directory each run's config names, else
`hc18.default_dir()`) and predicted with `hc_jax.evaluation.inference`,
which preprocesses them exactly as training did: one run alone gets the
predictions of its predictions_test.csv again. With `tta_flip` each run's
prediction is the mean over the scan and its left-right mirror. The members'
HC in px of the original image are averaged, and converted to mm with each
image's pixel size; the reference HC is the one of HC18's CSV.
"""

import dataclasses
import math
import os
from typing import Callable, Sequence

import numpy as np

from hc_jax import log
from hc_jax import workdir as workdir_lib
from hc_jax.data import hc18
from hc_jax.evaluation import cv_runs
from hc_jax.evaluation import cv_table

# One row per scored image (the CSV of --out), then one column per member.
IMAGE_COLUMNS = ('fold', 'filename', 'subject_id', 'pixel_size_mm',
                 'hc_mm_true', 'hc_mm_pred', 'error_mm', 'hc_px_true',
                 'hc_px_pred', 'quality', 'min_quality')
# One row per scoring (the CSV that --summary_csv appends to).
SUMMARY_COLUMNS = ('name', 'runs', 'tta_flip', 'folds', 'num_images',
                   'mae_mm', 'mae_mm_std', 'mae_px', 'mae_px_std', 'pmae',
                   'pmae_std', 'median_mm', 'worst_mm', 'worst_file',
                   'bias_mm', 'num_gross', 'num_outside_10pct', 'part')
# The columns of summary CSVs written before `num_outside_10pct` and `part`;
# rows are still appended to them, in their own columns.
OLD_SUMMARY_COLUMNS = SUMMARY_COLUMNS[:-2]
# A prediction below GROSS_RATIO[0] or above GROSS_RATIO[1] times the true
# HC is a gross error: the model measured something other than the head.
GROSS_RATIO = (0.5, 1.5)
# A prediction outside 0.9-1.1 times the true HC is counted apart.
CLOSE_RATIO = (0.9, 1.1)
# The parts of each fold that can be scored: its test fold, or the validation
# part carved from its training folds (for choosing settings).
PARTS = ('test', 'val')


@dataclasses.dataclass
class Scores:
  """The scores of one member or ensemble, pooled over its folds.

  Attributes:
    members: each member's label (its `hc_mm_<label>` column).
    roots: each member's directory, as given.
    runs: {fold: [each member's workdir (a run, or a directory of runs)]}.
    tta_flip: whether flip test-time augmentation was used.
    hc18_dir: the HC18 copy scored on.
    rows: one dict per image, sorted by fold and filename: `IMAGE_COLUMNS`
      (floats unrounded) and `member_columns`.
    folds: {fold: {'num_images', 'mae_mm'}}.
    num_images, mae_mm, mae_mm_std, mae_px, mae_px_std, pmae, pmae_std,
    bias_mm: as `metrics.hc_errors` (population SDs) over every image.
    median_mm, worst_mm: median and largest absolute error in mm.
    worst_file: the image of `worst_mm` (these as `cv_table.pooled_errors`).
    num_gross: predictions outside `GROSS_RATIO` times the true HC.
    num_outside_10pct: predictions outside `CLOSE_RATIO` times the true HC.
    part: 'test' or 'val', the part of each fold scored.
  """
  members: list[str]
  roots: list[str]
  runs: dict[int, list[str]]
  tta_flip: bool
  hc18_dir: str
  rows: list[dict]
  folds: dict[int, dict]
  num_images: int
  mae_mm: float
  mae_mm_std: float
  mae_px: float
  mae_px_std: float
  pmae: float
  pmae_std: float
  bias_mm: float
  median_mm: float
  worst_mm: float
  worst_file: str
  num_gross: int
  num_outside_10pct: int = 0
  part: str = 'test'

  @property
  def member_columns(self) -> list[str]:
    return [f'hc_mm_{label}' for label in self.members]

  def worst(self, count: int) -> list[dict]:
    """The `count` rows of the largest absolute error in mm, largest first."""
    return sorted(self.rows, key=lambda row: -abs(row['error_mm']))[:count]

  def summary_row(self, name: str) -> dict:
    """The `SUMMARY_COLUMNS` row of these scores."""
    row = {key: getattr(self, key) for key in SUMMARY_COLUMNS
           if hasattr(self, key)}
    row.update(name=name, runs=';'.join(self.roots),
               tta_flip=int(self.tta_flip),
               folds=' '.join(map(str, self.folds)))
    return row


def _read_images(paths: Sequence[str]) -> list[np.ndarray]:
  from hc_jax.evaluation import inference  # pylint: disable=import-outside-toplevel
  images = []
  for path, read in zip(paths, inference.parallel_map(hc18.read_grayscale,
                                                      paths)):
    if isinstance(read, Exception):
      raise cv_runs.ScoreError(f'{path}: {log.error_line(read)}')
    images.append(read[0])
  return images


def _predict_hc_px(workdir: str, images, pixel_sizes, tta_flip: bool,
                   filenames, model_options=None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """A workdir's HC in px of the original images (the mean of its runs), its
  quality signal (NaN but for a mask model) and its `Predictor`."""
  from hc_jax.evaluation import loading  # pylint: disable=import-outside-toplevel
  try:
    predictor = loading.load(workdir, model_options)
    out = predictor(images, list(pixel_sizes), tta_flip=tta_flip)
  except workdir_lib.PredictError as e:
    raise cv_runs.ScoreError(str(e)) from None
  hc_px = np.asarray(out['hc_px'], np.float64)
  for i in np.flatnonzero(~np.isfinite(hc_px))[:1]:
    raise cv_runs.ScoreError(f'{workdir} gives no HC for {filenames[i]}: '
                             f'{out["message"][i] or out["status"][i]}')
  return hc_px, np.asarray(out['quality'], np.float64), predictor



def score(run_roots: Sequence[str], tta_flip: bool = False,
          hc18_dir: str | None = None,
          progress: Callable[[str], None] | None = None,
          unseen_test_ok: bool = False, part: str = 'test',
          shifted_copy: bool = False,
          model_options: dict | None = None) -> Scores:
  """Scores runs on their own test folds, alone or as an ensemble.

  Args:
    run_roots: the members, each a run or a directory of `fold<k>/` runs; all
      with the same folds and fold assignment.
    tta_flip: average each run's predictions on the scan and its mirror.
    hc18_dir: the HC18 copy to read the images and reference HC from; None
      for the runs' own (see `cv_runs.find_hc18_dir`).
    progress: called with a line after each fold (e.g. print).
    unseen_test_ok: also score runs trained with `score_test=False`.
    shifted_copy: `hc18_dir` is a shifted copy of the runs' HC18
      (`python -m hc_jax.shifted`), not the copy they trained on.
    part: 'test' (each fold's test images, by its own runs) or 'val' (each
      fold's validation part, carved from its training folds: for choosing
      settings without looking at the test folds).
    model_options: model fields to set other than as trained that change no
      parameter (e.g. a mask model's `moments`; `loading.load`).

  Returns:
    The `Scores`.

  Raises:
    cv_runs.ScoreError: for runs that cannot be scored (see
      `cv_runs.check_members`, `cv_runs.find_hc18_dir`), or a test image
      missing from HC18's CSV or unreadable.
    hc18.HC18Error: for a malformed HC18 CSV.
  """
  if part not in PARTS:
    raise cv_runs.ScoreError(
        f'part must be one of {", ".join(PARTS)}; got {part!r}')
  run_roots = list(run_roots)
  members, assignment = cv_runs.check_members(
      run_roots, unseen_test_ok or part == 'val', hc18_dir)
  labels = cv_runs.member_labels(run_roots)
  hc18_dir = cv_runs.find_hc18_dir(cv_runs.all_runs(members), hc18_dir,
                                   check_digest=not shifted_copy)
  reference = cv_runs.read_reference(hc18_dir)
  subjects = {image.filename: image.subject_id for image in assignment.images}
  rows, fold_scores = [], {}
  for fold in members[0]:
    filenames = assignment.split(fold)[part]
    pixel_size, true_mm, member_px, quality, min_quality = _predict_fold(
        fold, filenames, [runs[fold] for runs in members], hc18_dir,
        reference, tta_flip, model_options)
    pred_px = member_px.mean(0)
    true_px = true_mm / pixel_size
    rows += _fold_rows(fold, filenames, subjects, labels, pixel_size,
                       true_mm, member_px, quality, min_quality)
    fold_scores[fold] = {
        'num_images': len(filenames),
        'mae_mm': float(np.mean(np.abs(pred_px - true_px) * pixel_size))}
    if progress:
      progress(format_fold(fold, fold_scores[fold]))
  result = _scores(labels, run_roots, members, tta_flip, hc18_dir, rows,
                   fold_scores)
  result.part = part
  return result


def _predict_fold(fold: int, filenames: Sequence[str],
                  workdirs: Sequence[str], hc18_dir: str, reference: dict,
                  tta_flip: bool, model_options: dict | None):
  """One fold's images predicted by each member's workdir of that fold.

  Returns:
    (pixel sizes in mm, reference HC in mm, each member's HC in px
    [member, image], the members' mean quality), as float64 arrays, and the
    fold's quality threshold (`Predictor.default_min_quality`).

  Raises:
    ScoreError: an image missing from the HC18 CSV or unreadable, or a
      member giving no HC for one.
  """
  missing = [name for name in filenames if name not in reference]
  if missing:
    raise cv_runs.ScoreError(
        f'{len(missing)} test image(s) of fold {fold} are not '
        f'in {hc18_dir}\'s CSV, e.g. {missing[0]}')
  image_dir = os.path.join(hc18_dir, hc18.SPLITS['train'][0])
  images = _read_images([os.path.join(image_dir, n) for n in filenames])
  pixel_size = np.array([reference[n][0] for n in filenames], np.float64)
  true_mm = np.array([reference[n][1] for n in filenames], np.float64)
  predicted = [_predict_hc_px(workdir, images, pixel_size, tta_flip,
                              filenames, model_options)
               for workdir in workdirs]
  member_px = np.stack([hc for hc, _, _ in predicted])
  quality = np.stack([q for _, q, _ in predicted]).mean(0)
  # The fold's threshold: its one member's stored one (of several, their
  # mean), as predict applies it.
  min_quality = float(np.mean([p.default_min_quality
                               for _, _, p in predicted]))
  return pixel_size, true_mm, member_px, quality, min_quality


def _fold_rows(fold, filenames, subjects, labels, pixel_size, true_mm,
               member_px, quality, min_quality=math.nan) -> list[dict]:
  """The `IMAGE_COLUMNS` and member columns of one fold's images."""
  pred_px = member_px.mean(0)
  true_px = true_mm / pixel_size
  rows = []
  for i, name in enumerate(filenames):
    row = {'fold': fold, 'filename': name, 'subject_id': subjects[name],
           'pixel_size_mm': pixel_size[i], 'hc_mm_true': true_mm[i],
           'hc_mm_pred': pred_px[i] * pixel_size[i],
           'error_mm': (pred_px[i] - true_px[i]) * pixel_size[i],
           'hc_px_true': true_px[i], 'hc_px_pred': pred_px[i],
           'quality': quality[i], 'min_quality': min_quality}
    row.update({f'hc_mm_{label}': member_px[m, i] * pixel_size[i]
                for m, label in enumerate(labels)})
    rows.append(row)
  return rows


def _scores(labels, roots, members, tta_flip, hc18_dir, rows, fold_scores
            ) -> Scores:
  """Scores from the per-image rows."""
  column = lambda key: np.array([row[key] for row in rows], np.float64)
  errors = cv_table.pooled_errors(
      column('hc_px_true'), column('hc_px_pred'), column('pixel_size_mm'),
      [row['filename'] for row in rows])
  ratio = column('hc_px_pred') / column('hc_px_true')
  return Scores(
      members=labels, roots=list(roots),
      runs={fold: [runs[fold] for runs in members] for fold in members[0]},
      tta_flip=tta_flip, hc18_dir=hc18_dir, rows=rows, folds=fold_scores,
      num_images=errors['num_images'], mae_mm=errors['mae_mm'],
      mae_mm_std=errors['mae_mm_std'], mae_px=errors['mae_px'],
      mae_px_std=errors['mae_px_std'], pmae=errors['pmae'],
      pmae_std=errors['pmae_std'], bias_mm=errors['bias_mm'],
      median_mm=errors['median_mm'], worst_mm=errors['worst_mm'],
      worst_file=errors['worst_file'],
      num_gross=int(np.sum(~((ratio >= GROSS_RATIO[0]) &
                             (ratio <= GROSS_RATIO[1])))),
      num_outside_10pct=int(np.sum(~((ratio >= CLOSE_RATIO[0]) &
                                     (ratio <= CLOSE_RATIO[1])))))


def format_fold(fold: int, fold_score: dict) -> str:
  return (f'fold {fold}: {fold_score["num_images"]} images, MAE '
          f'{fold_score["mae_mm"]:.2f} mm')
