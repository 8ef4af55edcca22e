"""Cross-validation scores of trained runs, alone or as a per-fold ensemble.

  python -m hc_jax.cv_score --runs=runs/grid/hcnet_label \
      [--runs=runs/grid/hcnet_ellipse ...] [--tta_flip] [--name=NAME] \
      [--out=per_image.csv] [--worst=10] [--summary_csv=FILE] [--hc18_dir=DIR]

  scores = cv_score.score(['runs/grid/hcnet_label', 'runs/grid/hcnet_ellipse'],
                          tta_flip=True)
  scores.mae_mm, scores.rows, scores.worst(10)

Each entry of `--runs` (comma-separated or repeated) is one member of the
ensemble: a run directory (it holds config.json) or a directory of fold runs
`fold<k>/` as `hc_jax.grid` writes them (`ROOT/<config>/`, and with
`--seeds` `ROOT/<config>_seed<s>/`, one member per seed). A `fold<k>/` may
also hold several runs of its fold (`fold<k>/seed<s>/`): the member's
prediction is then their mean, as `hc_jax.evaluation.inference` makes it. Every member
must hold the same folds, and every run the same fold assignment (the images
of its folds.json), so that fold k's test images are predicted by fold k's
runs only: no member has seen the images it is scored on, in training or in
selection.

A shipped model's archive (`hc_jax.shipped`, e.g.
`--runs=hc_jax/shipped/hcnet_mask.npz`) is a member too: each of its fold
models predicts its own test fold, the folds drawn again from the HC18 CSV
with the members' own fold settings (an archive keeps no folds.json), so that
the figures it ships with can be reproduced from the file alone.

The test images are read from the original PNGs of HC18's training_set/
(`--hc18_dir`; by default the directory each run's config names, else
`hc18.default_dir()`), checked to be the copy the runs trained on (the
source digest they recorded), and predicted with `hc_jax.evaluation.inference`, which
preprocesses them exactly as training did: one run alone gets the
predictions of its predictions_test.csv again. With `--tta_flip` each run's
prediction is the mean over the scan and its left-right mirror. The members'
HC in px of the original image are averaged, and converted to mm with each
image's pixel size; the reference HC is the one of HC18's CSV.

It prints one line per fold (images, MAE in mm), the errors pooled over every
scored image (MAE in mm, px and per cent, each ± SD; the median and worst
error in mm; how many predictions are below half or above 1.5 times the true
HC), and the worst images with each member's own prediction. `--out` writes
one row per image (`IMAGE_COLUMNS` and one `hc_mm_<member>` column per
member), `--summary_csv` appends one row (`SUMMARY_COLUMNS`). Bad input (no
runs, unfinished runs, members with other folds or fold assignments, a
missing image) is a one-line `error:` and exit status 2. Runs trained with
`score_test=False` (their test fold kept unseen while settings are chosen on
validation) are refused unless `--unseen_test_ok`.
"""

import argparse
import csv
import dataclasses
import os
import sys
from typing import Callable, Sequence

import numpy as np

from hc_jax import log
from hc_jax import workdir as workdir_lib
from hc_jax.data import folds as folds_lib
from hc_jax.data import hc18
from hc_jax.evaluation import archive as archive_lib
from hc_jax.evaluation import metrics

FOLD_DIR = workdir_lib.FOLD_DIR
# One row per scored image (the CSV of --out), then one column per member.
IMAGE_COLUMNS = ('fold', 'filename', 'subject_id', 'pixel_size_mm',
                 'hc_mm_true', 'hc_mm_pred', 'error_mm', 'hc_px_true',
                 'hc_px_pred', 'quality')
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
# Errors (mm) whose catching by the quality flag is tabulated.
FLAG_ERRORS_MM = (5.0, 10.0, 20.0)
DEFAULT_WORST = 10


class ScoreError(ValueError):
  """Runs that cannot be scored as asked (the command line exits 2)."""


def member_runs(root: str) -> dict[int, str]:
  """{fold: workdir} of one member.

  Args:
    root: a finished run (holds config.json), or a directory of `fold<k>/`
      workdirs, each a run or a directory of runs of that fold (e.g. one per
      seed, `fold<k>/seed<s>/`: their mean is the member's prediction, as
      `hc_jax.evaluation.inference.load` makes it).

  Returns:
    The workdirs by test fold (the fold of their runs' config.json), sorted.

  Raises:
    ScoreError: no such directory, no run in it, an unfinished run, or a
      `fold<k>/` whose runs are of another fold.
  """
  if archive_lib.is_archive(root):
    return _archive_members(root)
  if not os.path.isdir(root):
    raise ScoreError(f'{root} does not exist')
  if os.path.isfile(os.path.join(root, workdir_lib.CONFIG_FILE)):
    candidates = [root]
  else:
    candidates = list(workdir_lib.fold_dirs(root).values())
    if not candidates:
      subdirs = sorted(name for name in os.listdir(root)
                       if os.path.isdir(os.path.join(root, name)))
      configs = [
          name for name in subdirs if any(
              workdir_lib.FOLD_DIR.match(sub)
              for sub in os.listdir(os.path.join(root, name)))
      ]
      runs = [
          name for name in subdirs
          if os.path.isfile(os.path.join(root, name, workdir_lib.CONFIG_FILE))
      ]
      hint = (f'; it holds configs ({", ".join(configs[:5])}): pass one of '
              'them' if configs else
              f'; it holds runs ({", ".join(runs[:5])}): pass each as a '
              'member, comma-separated' if runs else '')
      raise ScoreError(f'{root} holds no runs: neither config.json nor '
                       f'fold<k>/ run directories{hint}')
  found = {}
  for workdir in candidates:
    folds = sorted({_fold_of(run) for run in runs_in(workdir)})
    if len(folds) > 1:
      raise ScoreError(f'{workdir} holds runs of folds {folds}; one fold each')
    match = workdir_lib.FOLD_DIR.match(
        os.path.basename(os.path.normpath(workdir)))
    if workdir != root and match and int(match[1]) != folds[0]:
      raise ScoreError(f'{workdir} holds a run of fold {folds[0]}, not '
                       f'{match[1]}')
    found[folds[0]] = workdir
  return dict(sorted(found.items()))


def _archive(run: str):
  """The shipped-model archive (or the one member) a run label names."""
  try:
    return archive_lib.read(run)
  except workdir_lib.PredictError as e:
    raise ScoreError(str(e)) from None


def _archive_members(path: str) -> dict[int, str]:
  """{fold: '<archive>:<member>'} of a shipped model's fold members.

  Raises:
    ScoreError: not a shipped model, or two members of one fold.
  """
  archive = _archive(path)
  found = {}
  for run, config in zip(archive.runs, archive.configs):
    fold = config.get('fold')
    if isinstance(fold, bool) or not isinstance(fold, int):
      raise ScoreError(f'{run} has no integer fold')
    if fold in found:
      raise ScoreError(f'{path} holds two members of fold {fold} '
                       f'({found[fold]}, {run}); score one of them')
    found[fold] = run
  return dict(sorted(found.items()))


def _config(run: str) -> dict:
  """A run's config (its config.json, or a shipped member's)."""
  if archive_lib.is_archive(run):
    return _archive(run).configs[0]
  return workdir_lib.read_json(os.path.join(run, workdir_lib.CONFIG_FILE))


def runs_in(workdir: str) -> list[str]:
  """The finished runs of a workdir: itself, or its run subdirectories (a
  shipped member is its own run).

  Raises:
    ScoreError: none, or one without results.json.
  """
  if archive_lib.is_archive(workdir):
    return [workdir]
  try:
    return workdir_lib.run_dirs(workdir)
  except workdir_lib.PredictError as e:
    raise ScoreError(str(e)) from None


def _fold_of(run: str) -> int:
  fold = _config(run).get('fold')
  if isinstance(fold, bool) or not isinstance(fold, int):
    raise ScoreError(
        f'{os.path.join(run, workdir_lib.CONFIG_FILE)} has no integer fold')
  return fold


def member_label(root: str) -> str:
  """A member's short name: its directory, or the config above `fold<k>`."""
  parts = os.path.normpath(os.path.abspath(root)).split(os.sep)
  if workdir_lib.FOLD_DIR.match(parts[-1]) and len(parts) > 1:
    return parts[-2]
  return parts[-1]


def member_labels(roots: Sequence[str]) -> list[str]:
  """Distinct labels for the members (numbered where names repeat)."""
  labels = [member_label(root) for root in roots]
  if len(set(labels)) < len(labels):
    labels = [f'{label}_{i}' for i, label in enumerate(labels)]
  return labels


def read_assignment(run: str, hc18_dir: str | None = None
                    ) -> folds_lib.FoldAssignment:
  """The fold assignment a run trained under (its folds.json).

  A shipped member keeps no folds.json: its folds are drawn again, as
  training drew them, from the HC18 copy's CSV (`hc18_dir`, checked by
  `find_hc18_dir` to be the copy it trained on) with its config's
  `num_folds`, `val_fraction` and `fold_seed`.

  Raises:
    ScoreError: when it is missing or unreadable.
  """
  if archive_lib.is_archive(run):
    config = _config(run)
    reference = read_reference(hc18_dir or find_hc18_dir([run]))
    names = sorted(reference)
    try:
      return folds_lib.assign_folds(
          names, [reference[name][1] for name in names],
          num_folds=config['num_folds'], val_fraction=config['val_fraction'],
          seed=config['fold_seed'])
    except (KeyError, TypeError, ValueError) as e:
      raise ScoreError(f'{run}: its folds cannot be drawn again '
                       f'({log.error_line(e)})') from None
  path = os.path.join(run, workdir_lib.FOLDS_FILE)
  if not os.path.isfile(path):
    raise ScoreError(f'{run} has no {workdir_lib.FOLDS_FILE}')
  try:
    return folds_lib.FoldAssignment.from_json(path)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ScoreError(f'{path} cannot be read '
                     f'({log.error_line(e)})') from None


def check_members(roots: Sequence[str], unseen_test_ok: bool = False,
                  hc18_dir: str | None = None
                  ) -> tuple[list[dict[int, str]], folds_lib.FoldAssignment]:
  """Every member's runs, checked to share folds and fold assignment.

  Args:
    roots: the members (see `member_runs`; a shipped model's archive is a
      member whose fold models are its members).
    unseen_test_ok: also accept runs trained with `score_test=False`, whose
      test fold was kept unseen while settings are chosen on validation.
    hc18_dir: the HC18 copy the folds of shipped members are drawn from
      (None: `find_hc18_dir`'s).

  Returns:
    ([{fold: workdir} per member], the shared fold assignment).

  Raises:
    ScoreError: no members, a member twice, members with different folds,
      runs whose folds.json assign the images differently, or (unless
      `unseen_test_ok`) a run trained with `score_test=False`.
  """
  if not roots:
    raise ScoreError('no runs given')
  normalised = [os.path.realpath(root) for root in roots]
  if len(set(normalised)) < len(normalised):
    raise ScoreError(f'a member is given twice: {", ".join(roots)}')
  members = [member_runs(root) for root in roots]
  for root, runs in zip(roots[1:], members[1:]):
    for fold in sorted(set(members[0]) ^ set(runs)):
      has, lacks = (roots[0], root) if fold in members[0] else (root, roots[0])
      raise ScoreError(f'fold {fold} is in {has} but missing in {lacks}; '
                       'members must hold the same folds')
  all_runs = _all_runs(members)
  if not unseen_test_ok:
    for run in all_runs:
      if _config(run).get('score_test') is False:
        raise ScoreError(
            f'{run} was trained with score_test=False: its test fold is '
            'kept unseen while settings are chosen on validation; pass '
            '--unseen_test_ok to score it anyway')
  if hc18_dir is None and any(archive_lib.is_archive(r) for r in all_runs):
    hc18_dir = find_hc18_dir(all_runs)
  assignment = read_assignment(all_runs[0], hc18_dir)
  for run in all_runs[1:]:
    other = read_assignment(run, hc18_dir)
    if (other.num_folds, other.images) != (assignment.num_folds,
                                           assignment.images):
      raise ScoreError(
          f'{run}/{workdir_lib.FOLDS_FILE} assigns the images to folds '
          f'differently from {all_runs[0]}/{workdir_lib.FOLDS_FILE}; an '
          'ensemble needs one fold assignment')
  for fold in members[0]:
    if not 0 <= fold < assignment.num_folds:
      raise ScoreError(
          f'{members[0][fold]} is a run of fold {fold}, but its '
          f'{workdir_lib.FOLDS_FILE} has {assignment.num_folds} folds')
  return members, assignment


def _all_runs(members: Sequence[dict[int, str]]) -> list[str]:
  """Every run of every member's workdirs."""
  return [run for workdirs in members for workdir in workdirs.values()
          for run in runs_in(workdir)]


def _source_digest(run: str) -> str | None:
  if archive_lib.is_archive(run):
    archive = _archive(run)
    documents = [archive.results[0], archive.configs[0]]
  else:
    documents = [
        workdir_lib.read_json(os.path.join(run, name))
        for name in (workdir_lib.RESULTS_FILE, workdir_lib.CONFIG_FILE)
    ]
  for document in documents:
    digest = document.get('source_digest')
    if digest:
      return str(digest)
  return None


def _configured_dir(run: str) -> str | None:
  """The HC18 directory a run's config names (or finds), or None."""
  data = _config(run).get('data', {})
  if data.get('source') == 'synthetic':  # Written into the run by training.
    return os.path.join(run, workdir_lib.SYNTHETIC_DIR)
  if data.get('hc18_dir') == 'download':
    return None
  return data.get('hc18_dir') or hc18.default_dir()


def find_hc18_dir(runs: Sequence[str], hc18_dir: str | None = None) -> str:
  """The HC18 directory to score on, checked against what the runs used.

  Args:
    runs: every run that is scored.
    hc18_dir: the directory to use; None for the first that a run's config
      names (or `hc18.default_dir()`) and that holds the training CSV.

  Returns:
    A directory with training_set/ and its CSV.

  Raises:
    ScoreError: none found, no extracted training_set/, or a copy other than
      the one a run trained on (by the source digest it recorded).
  """
  # pylint: disable=import-outside-toplevel
  from hc_jax.data import prepare
  folder, csv_name = hc18.SPLITS['train']
  if not hc18_dir:
    candidates = [_configured_dir(run) for run in runs]
    hc18_dir = next((path for path in candidates if path and os.path.isfile(
        os.path.join(path, csv_name))), None)
    if not hc18_dir:
      raise ScoreError('HC18 not found where the runs\' configs say nor by '
                       '$HC18_DIR or ../shared/hc18; pass --hc18_dir=DIR')
  if not os.path.isfile(os.path.join(hc18_dir, csv_name)):
    raise ScoreError(f'{hc18_dir} holds no {csv_name}')
  if not os.path.isdir(os.path.join(hc18_dir, folder)):
    raise ScoreError(f'{hc18_dir} has no {folder}/ directory (extract '
                     f'{folder}.zip there to score from its PNGs)')
  digest = prepare.source_digest(hc18_dir)
  for run in runs:
    trained_on = _source_digest(run)
    if trained_on and trained_on != digest:
      raise ScoreError(f'{run} trained on another HC18 copy (source digest '
                       f'{trained_on}) than {hc18_dir} ({digest}); pass '
                       '--hc18_dir of that copy')
  return hc18_dir


def read_reference(hc18_dir: str) -> dict[str, tuple[float, float]]:
  """{filename: (pixel size in mm, HC in mm)} of HC18's training CSV.

  Raises:
    hc18.HC18Error: listing every malformed row.
  """
  _, csv_name = hc18.SPLITS['train']
  problems = []
  # HC18's own CSV reader; the images are read only where they are scored.
  # pylint: disable=protected-access
  rows = hc18._read_csv(os.path.join(hc18_dir, csv_name), 3, problems)
  positive_number = hc18._positive_number
  # pylint: enable=protected-access
  reference = {}
  for row in rows:
    try:
      reference[row[0]] = (positive_number(row[1], 'pixel size (mm)'),
                           positive_number(row[2], 'head circumference (mm)'))
    except ValueError as e:
      problems.append(f'{csv_name}: {row[0]}: {e}')
  if problems:
    raise hc18.HC18Error(hc18_dir, problems)
  return reference


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
    worst_file: the image of `worst_mm`.
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
      raise ScoreError(f'{path}: {log.error_line(read)}')
    images.append(read[0])
  return images


def _predict_hc_px(workdir: str, images, pixel_sizes, tta_flip: bool,
                   filenames, model_options=None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """A workdir's HC in px of the original images (the mean of its runs), and
  its quality signal (NaN but for a mask model)."""
  from hc_jax.evaluation import inference  # pylint: disable=import-outside-toplevel
  try:
    out = inference.load(workdir, model_options)(
        images, list(pixel_sizes), tta_flip=tta_flip)
  except workdir_lib.PredictError as e:
    raise ScoreError(str(e)) from None
  hc_px = np.asarray(out['hc_px'], np.float64)
  for i in np.flatnonzero(~np.isfinite(hc_px))[:1]:
    raise ScoreError(f'{workdir} gives no HC for {filenames[i]}: '
                     f'{out["message"][i] or out["status"][i]}')
  return hc_px, np.asarray(out['quality'], np.float64)


def score(run_roots: Sequence[str], tta_flip: bool = False,
          hc18_dir: str | None = None,
          progress: Callable[[str], None] | None = None,
          unseen_test_ok: bool = False, part: str = 'test',
          model_options: dict | None = None) -> Scores:
  """Scores runs on their own test folds, alone or as an ensemble.

  Args:
    run_roots: the members, each a run or a directory of `fold<k>/` runs; all
      with the same folds and fold assignment.
    tta_flip: average each run's predictions on the scan and its mirror.
    hc18_dir: the HC18 copy to read the images and reference HC from; None
      for the runs' own (see `find_hc18_dir`).
    progress: called with a line after each fold (e.g. print).
    unseen_test_ok: also score runs trained with `score_test=False`.
    part: 'test' (each fold's test images, by its own runs) or 'val' (each
      fold's validation part, carved from its training folds: for choosing
      settings without looking at the test folds).
    model_options: model fields to set other than as trained that change no
      parameter (e.g. a mask model's `moments`; `inference.load`).

  Returns:
    The `Scores`.

  Raises:
    ScoreError: for runs that cannot be scored (see `check_members`,
      `find_hc18_dir`), or a test image missing from HC18's CSV or unreadable.
    hc18.HC18Error: for a malformed HC18 CSV.
  """
  if part not in PARTS:
    raise ScoreError(f'part must be one of {", ".join(PARTS)}; got {part!r}')
  run_roots = list(run_roots)
  members, assignment = check_members(run_roots,
                                      unseen_test_ok or part == 'val',
                                      hc18_dir)
  labels = member_labels(run_roots)
  hc18_dir = find_hc18_dir(_all_runs(members), hc18_dir)
  reference = read_reference(hc18_dir)
  subjects = {image.filename: image.subject_id for image in assignment.images}
  image_dir = os.path.join(hc18_dir, hc18.SPLITS['train'][0])
  rows, fold_scores = [], {}
  for fold in members[0]:
    filenames = assignment.split(fold)[part]
    missing = [name for name in filenames if name not in reference]
    if missing:
      raise ScoreError(f'{len(missing)} test image(s) of fold {fold} are not '
                       f'in {hc18_dir}\'s CSV, e.g. {missing[0]}')
    images = _read_images([os.path.join(image_dir, n) for n in filenames])
    pixel_size = np.array([reference[n][0] for n in filenames], np.float64)
    true_mm = np.array([reference[n][1] for n in filenames], np.float64)
    predicted = [_predict_hc_px(runs[fold], images, pixel_size, tta_flip,
                                filenames, model_options) for runs in members]
    member_px = np.stack([hc for hc, _ in predicted])
    quality = np.stack([q for _, q in predicted]).mean(0)
    pred_px = member_px.mean(0)
    true_px = true_mm / pixel_size
    for i, name in enumerate(filenames):
      row = {'fold': fold, 'filename': name, 'subject_id': subjects[name],
             'pixel_size_mm': pixel_size[i], 'hc_mm_true': true_mm[i],
             'hc_mm_pred': pred_px[i] * pixel_size[i],
             'error_mm': (pred_px[i] - true_px[i]) * pixel_size[i],
             'hc_px_true': true_px[i], 'hc_px_pred': pred_px[i],
             'quality': quality[i]}
      row.update({f'hc_mm_{label}': member_px[m, i] * pixel_size[i]
                  for m, label in enumerate(labels)})
      rows.append(row)
    fold_scores[fold] = {
        'num_images': len(filenames),
        'mae_mm': float(np.mean(np.abs(pred_px - true_px) * pixel_size))}
    if progress:
      progress(format_fold(fold, fold_scores[fold]))
  result = _scores(labels, run_roots, members, tta_flip, hc18_dir, rows,
                   fold_scores)
  result.part = part
  return result


def _scores(labels, roots, members, tta_flip, hc18_dir, rows, fold_scores
            ) -> Scores:
  """Scores from the per-image rows."""
  column = lambda key: np.array([row[key] for row in rows], np.float64)
  errors = metrics.hc_errors(column('hc_px_true'), column('hc_px_pred'),
                             column('pixel_size_mm'))
  abs_mm = np.abs(column('error_mm'))
  ratio = column('hc_px_pred') / column('hc_px_true')
  worst = int(np.argmax(abs_mm))
  return Scores(
      members=labels, roots=list(roots),
      runs={fold: [runs[fold] for runs in members] for fold in members[0]},
      tta_flip=tta_flip, hc18_dir=hc18_dir, rows=rows, folds=fold_scores,
      num_images=errors['num_images'], mae_mm=errors['mae_mm'],
      mae_mm_std=errors['mae_mm_std'], mae_px=errors['mae_px'],
      mae_px_std=errors['mae_px_std'], pmae=errors['pmae'],
      pmae_std=errors['pmae_std'], bias_mm=errors['bias_mm'],
      median_mm=float(np.median(abs_mm)), worst_mm=float(abs_mm[worst]),
      worst_file=rows[worst]['filename'],
      num_gross=int(np.sum(~((ratio >= GROSS_RATIO[0]) &
                             (ratio <= GROSS_RATIO[1])))),
      num_outside_10pct=int(np.sum(~((ratio >= CLOSE_RATIO[0]) &
                                     (ratio <= CLOSE_RATIO[1])))))


def flag_table(rows: Sequence[dict], thresholds: Sequence[float]
               ) -> list[dict]:
  """What flagging `quality < threshold` catches, per threshold.

  Args:
    rows: per-image rows with 'quality' and 'error_mm'.
    thresholds: quality thresholds.

  Returns:
    One dict per threshold: 'threshold', 'flagged' (images), 'flagged_pct',
    and for each error E of `FLAG_ERRORS_MM` 'over_<E>' (images with
    |error| > E mm) and 'caught_<E>' (of those, flagged); 'good_flagged'
    (flagged images with |error| <= the first E).
  """
  quality = np.array([row['quality'] for row in rows], np.float64)
  error = np.abs(np.array([row['error_mm'] for row in rows], np.float64))
  table = []
  for threshold in thresholds:
    flagged = quality < threshold
    entry = {'threshold': float(threshold), 'flagged': int(flagged.sum()),
             'flagged_pct': 100.0 * float(flagged.mean())}
    for limit in FLAG_ERRORS_MM:
      over = error > limit
      entry[f'over_{limit:g}'] = int(over.sum())
      entry[f'caught_{limit:g}'] = int((over & flagged).sum())
    entry['good_flagged'] = int((flagged & (error <= FLAG_ERRORS_MM[0])).sum())
    table.append(entry)
  return table


def format_flag_table(table: Sequence[dict]) -> str:
  """The flag table as Markdown."""
  head = ('| quality below | flagged | ' + ' | '.join(
      f'caught of > {e:g} mm' for e in FLAG_ERRORS_MM) +
          f' | flagged with error <= {FLAG_ERRORS_MM[0]:g} mm |')
  lines = [head, '|' + ' --- |' * (3 + len(FLAG_ERRORS_MM))]
  for entry in table:
    cells = [f'{entry["threshold"]:.3f}',
             f'{entry["flagged"]} ({entry["flagged_pct"]:.1f} %)']
    cells += [f'{entry[f"caught_{e:g}"]} / {entry[f"over_{e:g}"]}'
              for e in FLAG_ERRORS_MM]
    cells.append(str(entry['good_flagged']))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def format_fold(fold: int, fold_score: dict) -> str:
  return (f'fold {fold}: {fold_score["num_images"]} images, MAE '
          f'{fold_score["mae_mm"]:.2f} mm')


def format_report(scores: Scores, name: str, worst: int = DEFAULT_WORST
                  ) -> str:
  """The summary and the table of the `worst` images, as printed."""
  lines = [
      f'{name}: {scores.num_images} images, {len(scores.folds)} fold(s), '
      f'{len(scores.members)} member(s), flip TTA '
      f'{"on" if scores.tta_flip else "off"}',
      f'  MAE {scores.mae_mm:.2f} ± {scores.mae_mm_std:.2f} mm, '
      f'{scores.mae_px:.2f} ± {scores.mae_px_std:.2f} px, '
      f'{scores.pmae:.2f} ± {scores.pmae_std:.2f} %; bias '
      f'{scores.bias_mm:+.2f} mm',
      f'  median {scores.median_mm:.2f} mm, worst {scores.worst_mm:.2f} mm '
      f'({scores.worst_file}); {scores.num_gross} prediction(s) outside '
      f'{GROSS_RATIO[0]:g}x-{GROSS_RATIO[1]:g}x the true HC, '
      f'{scores.num_outside_10pct} outside {CLOSE_RATIO[0]:g}x-'
      f'{CLOSE_RATIO[1]:g}x']
  if worst > 0:
    header = ['fold', 'filename', 'true_mm', 'pred_mm', 'error_mm',
              'pixel_mm'] + (scores.member_columns if len(scores.members) > 1
                             else [])
    table = [header]
    for row in scores.worst(worst):
      table.append([str(row['fold']), row['filename'],
                    f'{row["hc_mm_true"]:.1f}', f'{row["hc_mm_pred"]:.1f}',
                    f'{row["error_mm"]:+.1f}', f'{row["pixel_size_mm"]:.4f}']
                   + [f'{row[c]:.1f}' for c in header[6:]])
    widths = [max(len(cells[i]) for cells in table)
              for i in range(len(header))]
    lines.append(f'worst {len(table) - 1}:')
    for cells in table:
      lines.append('  ' + '  '.join(
          cell.ljust(width) if i == 1 else cell.rjust(width)
          for i, (cell, width) in enumerate(zip(cells, widths))).rstrip())
  return '\n'.join(lines)


def _fmt(value) -> object:
  return round(value, 3) if isinstance(value, float) else value


def write_rows(path: str, scores: Scores) -> None:
  """Writes the per-image CSV (values rounded to 1e-3), atomically."""
  from hc_jax.evaluation import scan_files  # pylint: disable=import-outside-toplevel
  rows = [{key: (value if key == 'pixel_size_mm' else _fmt(value))
           for key, value in row.items()} for row in scores.rows]
  try:
    scan_files.write_csv(path, list(IMAGE_COLUMNS) + scores.member_columns,
                         rows, '--out')
  except workdir_lib.PredictError as e:
    raise ScoreError(str(e)) from None


def check_summary_csv(path: str) -> None:
  """Raises ScoreError unless `path` can take a `SUMMARY_COLUMNS` row."""
  if os.path.isdir(path):
    raise ScoreError(f'--summary_csv {path} is a directory')
  if os.path.isfile(path) and os.path.getsize(path):
    try:
      with open(path, newline='', encoding='utf-8') as f:
        header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
      raise ScoreError(f'--summary_csv {path} cannot be read '
                       f'({log.error_line(e)})') from None
    if tuple(header) not in (SUMMARY_COLUMNS, OLD_SUMMARY_COLUMNS):
      raise ScoreError(f'--summary_csv {path} has other columns than '
                       f'{",".join(SUMMARY_COLUMNS)}')
  elif not os.path.isdir(os.path.dirname(os.path.abspath(path))):
    raise ScoreError(f'--summary_csv {path}: its directory does not exist')


def append_summary(path: str, row: dict) -> None:
  """Appends one `SUMMARY_COLUMNS` row (and the header to a new file)."""
  check_summary_csv(path)
  new = not os.path.isfile(path) or not os.path.getsize(path)
  columns = SUMMARY_COLUMNS
  if not new:
    with open(path, newline='', encoding='utf-8') as f:
      columns = tuple(next(csv.reader(f), SUMMARY_COLUMNS))
  try:
    with open(path, 'a', newline='', encoding='utf-8') as f:
      writer = csv.DictWriter(f, fieldnames=columns)
      if new:
        writer.writeheader()
      writer.writerow({key: _fmt(row[key]) for key in columns})
  except OSError as e:
    raise ScoreError(f'--summary_csv {path} cannot be written '
                     f'({e.strerror or e})') from None


def _parse_args(argv) -> argparse.Namespace:
  from hc_jax import cli  # pylint: disable=import-outside-toplevel
  parser = cli.ArgumentParser(
      prog='python -m hc_jax.cv_score',
      description='Score trained fold runs on their own test folds, alone or '
      'as an ensemble of runs trained on the same folds.')
  parser.add_argument('--runs', action='append', required=True,
                      help='members, comma-separated or repeated: each a run '
                      'directory or a directory of fold<k>/ runs')
  parser.add_argument('--tta_flip', '--tta-flip', dest='tta_flip',
                      action='store_true',
                      help='average each run over the scan and its mirror')
  parser.add_argument('--name', help='name of this scoring (default: the '
                      'members\' names joined by +, and +flip)')
  parser.add_argument('--out', help='per-image CSV to write')
  parser.add_argument('--worst', type=int, default=DEFAULT_WORST,
                      help=f'images to list, largest error first (default '
                      f'{DEFAULT_WORST})')
  parser.add_argument('--summary_csv', '--summary-csv', dest='summary_csv',
                      help='CSV to append one summary row to')
  parser.add_argument('--hc18_dir', '--hc18-dir', dest='hc18_dir',
                      help='HC18 directory (default: the runs\' own)')
  parser.add_argument('--unseen_test_ok', '--unseen-test-ok',
                      dest='unseen_test_ok', action='store_true',
                      help='also score runs trained with score_test=False '
                      '(their test fold kept unseen during tuning)')
  parser.add_argument('--part', choices=PARTS, default='test',
                      help='score each fold\'s test images (default) or its '
                      'validation part, carved from its training folds, for '
                      'choosing settings')
  parser.add_argument('--moments', choices=('plain', 'window'),
                      help='mask models: the moment pass to use, if not the '
                      'one trained with (no parameter depends on it)')
  parser.add_argument('--window_radius', '--window-radius',
                      dest='window_radius', type=float,
                      help='mask models: the window\'s normalised radius of '
                      'moments=window, if not the one trained with')
  parser.add_argument('--quality_thresholds', '--quality-thresholds',
                      dest='quality_thresholds',
                      help='mask models: comma-separated quality thresholds '
                      'to print the flag table for (what flagging quality '
                      'below each catches)')
  args = parser.parse_args(argv)
  try:
    args.quality_thresholds = [float(x) for x in (
        args.quality_thresholds or '').split(',') if x.strip()]
  except ValueError:
    parser.error(f'--quality_thresholds must be numbers, got '
                 f'{args.quality_thresholds!r}')
  args.runs = [root.strip() for spec in args.runs for root in spec.split(',')
               if root.strip()]
  if not args.runs:
    parser.error('--runs names no runs')
  if args.worst < 0:
    parser.error(f'--worst must be >= 0, got {args.worst}')
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (0, or 2 for bad input)."""
  args = _parse_args(argv)
  # pylint: disable=import-outside-toplevel
  from hc_jax import cli
  from hc_jax.evaluation import scan_files
  try:
    # Fails fast, before TensorFlow is imported.
    check_members(args.runs, args.unseen_test_ok or args.part == 'val',
                  args.hc18_dir)
    if args.out:
      scan_files.check_writable(args.out, '--out')
    if args.summary_csv:
      check_summary_csv(args.summary_csv)
    cli.quiet_logs()
    options = {k: v for k, v in (('moments', args.moments),
                                 ('window_radius', args.window_radius))
               if v is not None}
    scores = score(args.runs, tta_flip=args.tta_flip, hc18_dir=args.hc18_dir,
                   progress=lambda line: print(line, flush=True),
                   unseen_test_ok=args.unseen_test_ok, part=args.part,
                   model_options=options or None)
    name = args.name or '+'.join(scores.members) + (
        '+flip' if args.tta_flip else '') + ''.join(
            f'+{k}={v}' for k, v in options.items()) + (
                '+val' if args.part == 'val' else '')
    print(format_report(scores, name, args.worst))
    if args.quality_thresholds:
      print(format_flag_table(flag_table(scores.rows,
                                         args.quality_thresholds)))
    if args.out:
      write_rows(args.out, scores)
      print(f'wrote {args.out}')
    if args.summary_csv:
      append_summary(args.summary_csv, scores.summary_row(name))
      print(f'appended to {args.summary_csv}')
  except cli.usage_errors() as e:
    print(f'error: {cli.error_text(e)}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
