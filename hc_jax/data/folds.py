"""Cross-validation folds for HC18, grouped by subject and balanced over HC.

HC18 names its images `NNN_HC.png`, `NNN_2HC.png`, ...: `NNN` is the subject
(examination) and images of one subject look alike, so every image of a subject
must land in the same fold. Subject numbers also rise with head size, so folds
drawn as contiguous subject ranges would each cover a different part of the HC
range. Here subjects are sorted by HC, cut into consecutive blocks of `num_folds`
subjects, and each block deals one subject to each fold at random: every fold
then sees the whole HC range with the same distribution.

For each test fold a validation set is carved out of the other (training)
folds, stratified by HC in the same way and grouped by subject.

The assignment is saved as human-readable JSON so that every run of an
experiment uses the same split:

  assignment = folds.assign_folds(filenames, hc_mm, num_folds=5, seed=0)
  assignment.to_json(workdir / 'folds.json')
  split = assignment.split(fold=0)  # {'train': [...], 'val': [...], 'test': [...]}
"""

import dataclasses
import json
import math
import numbers
import os
import re
from typing import Any, NamedTuple, Sequence

import numpy as np

_FILENAME_RE = re.compile(r'^(\d+)_(?:(\d+))?HC\.png$')
_JSON_FORMAT_VERSION = 1


def parse_filename(filename: str) -> tuple[int, int]:
  """Returns the subject and frame of an HC18 image filename.

  Args:
    filename: a bare image filename such as '010_HC.png' (frame 1) or
      '010_2HC.png' (frame 2); no directory, no '_Annotation' suffix.

  Returns:
    `(subject_id, frame)` as ints, e.g. (10, 2) for '010_2HC.png'.

  Raises:
    TypeError: if `filename` is not a string.
    ValueError: if `filename` is not of the form 'NNN_HC.png' or 'NNN_kHC.png'.
  """
  if not isinstance(filename, str):
    raise TypeError(f'filename must be a str, got {type(filename).__name__}: '
                    f'{filename!r}')
  match = _FILENAME_RE.match(filename)
  if match is None:
    raise ValueError(
        f"not an HC18 image filename: {filename!r}; expected 'NNN_HC.png' or "
        "'NNN_kHC.png' (e.g. '010_HC.png', '010_2HC.png'), without directory "
        "or '_Annotation' suffix")
  subject_id = int(match.group(1))
  frame = int(match.group(2)) if match.group(2) is not None else 1
  return subject_id, frame


class ImageFold(NamedTuple):
  """Where one image goes: its subject and its test fold."""
  filename: str
  subject_id: int
  fold: int


@dataclasses.dataclass(frozen=True)
class FoldAssignment:
  """A subject-grouped k-fold assignment with per-fold validation sets.

  Attributes:
    num_folds: number of folds; folds are numbered 0 .. num_folds - 1.
    seed: the seed the assignment was drawn with.
    val_fraction: fraction of training subjects held out for validation.
    images: one `ImageFold` per image, sorted by filename.
    val_filenames: for each test fold, the sorted validation filenames (drawn
      from the other folds).
  """
  num_folds: int
  seed: int
  val_fraction: float
  images: tuple[ImageFold, ...]
  val_filenames: tuple[tuple[str, ...], ...]
  # Whether the subjects are read from HC18 filenames (checked against
  # them), rather than given with the images (a folder data set).
  named_subjects: bool = True
  _fold_by_filename: dict[str, int] = dataclasses.field(
      init=False, repr=False, compare=False)

  def __post_init__(self):
    # Normalise (lists from JSON, unsorted input) so that equality means the
    # same assignment, then check it: a hand-edited JSON file must not be able
    # to leak a subject across folds.
    images = tuple(sorted(ImageFold(str(f), int(s), int(k))
                          for f, s, k in self.images))
    val_filenames = tuple(tuple(sorted(str(f) for f in names))
                          for names in self.val_filenames)
    object.__setattr__(self, 'images', images)
    object.__setattr__(self, 'val_filenames', val_filenames)
    object.__setattr__(self, 'val_fraction', float(self.val_fraction))
    object.__setattr__(self, '_fold_by_filename',
                       {image.filename: image.fold for image in images})
    self._check()

  def _check(self):
    """Raises ValueError if the assignment is inconsistent."""
    _check_num_folds(self.num_folds)
    _check_val_fraction(self.val_fraction)
    if not self.images:
      raise ValueError('FoldAssignment has no images')
    if len(self._fold_by_filename) != len(self.images):
      raise ValueError('FoldAssignment lists a filename more than once')
    subject_fold = {}
    subject_filenames = {}
    subject_of = {image.filename: image.subject_id for image in self.images}
    for image in self.images:
      if self.named_subjects and parse_filename(
          image.filename)[0] != image.subject_id:
        raise ValueError(f'{image.filename!r} is recorded with subject_id '
                         f'{image.subject_id}, its name says otherwise')
      if not 0 <= image.fold < self.num_folds:
        raise ValueError(f'{image.filename!r} has fold {image.fold}, outside '
                         f'0..{self.num_folds - 1}')
      if subject_fold.setdefault(image.subject_id, image.fold) != image.fold:
        raise ValueError(f'subject {image.subject_id} is in folds '
                         f'{subject_fold[image.subject_id]} and {image.fold}')
      subject_filenames.setdefault(image.subject_id, set()).add(image.filename)
    empty = sorted(set(range(self.num_folds)) - set(subject_fold.values()))
    if empty:
      raise ValueError(f'folds {empty} have no images')
    if len(self.val_filenames) != self.num_folds:
      raise ValueError(f'need one validation list per fold ({self.num_folds}),'
                       f' got {len(self.val_filenames)}')
    for fold, names in enumerate(self.val_filenames):
      unknown = sorted(set(names) - self._fold_by_filename.keys())
      if unknown or len(set(names)) != len(names):
        raise ValueError(f'validation list of fold {fold} has unknown or '
                         f'repeated filenames: {unknown[:5]}')
      val_subjects = set()
      for name in names:
        if self._fold_by_filename[name] == fold:
          raise ValueError(f'{name!r} is both test and validation in fold '
                           f'{fold}')
        val_subjects.add(subject_of[name])
      for subject_id in sorted(val_subjects):
        if not subject_filenames[subject_id] <= set(names):
          raise ValueError(f'fold {fold}: subject {subject_id} is split '
                           'between train and validation')
      num_train = (len(self.images) - len(names) -
                   sum(image.fold == fold for image in self.images))
      if num_train == 0:
        raise ValueError(f'fold {fold} leaves no training images')

  @property
  def filenames(self) -> list[str]:
    """All filenames, sorted."""
    return [image.filename for image in self.images]

  def fold_of(self, filename: str) -> int:
    """Returns the test fold of `filename`.

    Raises:
      KeyError: if `filename` is not in the assignment.
    """
    try:
      return self._fold_by_filename[filename]
    except KeyError:
      raise KeyError(f'{filename!r} is not in this fold assignment') from None

  def split(self, fold: int) -> dict[str, list[str]]:
    """Returns the train/val/test filenames for one test fold.

    Args:
      fold: the test fold, in 0 .. num_folds - 1.

    Returns:
      A dict with keys 'train', 'val' and 'test', each a sorted list of
      filenames; the three are disjoint and together hold every image, and no
      subject is in more than one of them.

    Raises:
      ValueError: if `fold` is not an integer in 0 .. num_folds - 1.
    """
    if (isinstance(fold, bool) or not isinstance(fold, numbers.Integral) or
        not 0 <= fold < self.num_folds):
      raise ValueError(f'fold must be an integer in [0, {self.num_folds - 1}] '
                       f'(num_folds={self.num_folds}), got {fold!r}')
    val = set(self.val_filenames[fold])
    test = [image.filename for image in self.images if image.fold == fold]
    train = [image.filename for image in self.images
             if image.fold != fold and image.filename not in val]
    return {'train': train, 'val': sorted(val), 'test': test}

  def to_json(self, path: str | os.PathLike[str]) -> None:
    """Writes the assignment as human-readable JSON (see `from_json`)."""
    payload = {
        'format_version': _JSON_FORMAT_VERSION,
        'num_folds': self.num_folds,
        'seed': self.seed,
        'val_fraction': self.val_fraction,
        'validation': [{'fold': fold, 'filenames': list(names)}
                       for fold, names in enumerate(self.val_filenames)],
        'images': [image._asdict() for image in self.images],
    }
    if not self.named_subjects:
      payload['named_subjects'] = False
    with open(path, 'w') as f:
      json.dump(payload, f, indent=2)
      f.write('\n')

  @classmethod
  def from_json(cls, path: str | os.PathLike[str]) -> 'FoldAssignment':
    """Reads an assignment written by `to_json`, checking it is consistent."""
    with open(path) as f:
      payload: dict[str, Any] = json.load(f)
    version = payload.get('format_version')
    if version != _JSON_FORMAT_VERSION:
      raise ValueError(f'{os.fspath(path)}: unsupported format_version '
                       f'{version!r}, expected {_JSON_FORMAT_VERSION}')
    validation = sorted(payload['validation'], key=lambda entry: entry['fold'])
    if [entry['fold'] for entry in validation] != list(
        range(payload['num_folds'])):
      raise ValueError(f'{os.fspath(path)}: validation must list each fold '
                       'exactly once')
    return cls(
        num_folds=payload['num_folds'],
        seed=payload['seed'],
        val_fraction=payload['val_fraction'],
        images=tuple(ImageFold(entry['filename'], entry['subject_id'],
                               entry['fold'])
                     for entry in payload['images']),
        val_filenames=tuple(tuple(entry['filenames'])
                            for entry in validation),
        named_subjects=bool(payload.get('named_subjects', True)))


def assign_folds(filenames: Sequence[str],
                 hc_mm: Sequence[float] | np.ndarray,
                 num_folds: int = 5,
                 val_fraction: float = 0.1,
                 seed: int = 0,
                 subject_ids: Sequence[int] | None = None) -> FoldAssignment:
  """Assigns images to folds by subject, balanced over the HC range.

  Subjects (all images of one `NNN`) are sorted by their mean HC and cut into
  consecutive blocks of `num_folds` subjects; each block gives one subject to
  each fold, at random (a last, partial block gives its subjects to distinct
  folds). Within a block the subjects with more images go to the folds that
  hold fewer images so far, so fold sizes in images stay within a few images.
  The result does not depend on the order of `filenames`.

  For each test fold, about `val_fraction` of the training subjects are held
  out for validation: the training subjects, sorted by HC, are cut into that
  many consecutive groups and one subject is drawn from each group.

  Args:
    filenames: image filenames such as '010_HC.png' (see `parse_filename`).
    hc_mm: head circumference in mm of each image, aligned with `filenames`.
    num_folds: number of folds, at least 2.
    val_fraction: fraction of training subjects for validation, in [0, 1).
    seed: non-negative integer seed; the same inputs and seed give the same
      assignment.
    subject_ids: each image's subject, aligned with `filenames` (a folder
      data set's); None reads them from HC18 filenames.

  Returns:
    The `FoldAssignment`.

  Raises:
    ValueError: on bad settings, filenames or HC values, or with fewer subjects
      than folds.
  """
  filenames, hc_mm = _checked_inputs(filenames, hc_mm, num_folds,
                                     val_fraction, seed)

  hc_by_filename = dict(zip(filenames, hc_mm.tolist()))
  if subject_ids is None:
    subject_by_filename = {f: parse_filename(f)[0] for f in filenames}
  else:
    if len(subject_ids) != len(filenames):
      raise ValueError(f'{len(subject_ids)} subject ids for '
                       f'{len(filenames)} filenames')
    subject_by_filename = dict(zip(filenames, (int(s) for s in subject_ids)))
  subject_filenames: dict[int, list[str]] = {}
  for filename in sorted(filenames):
    subject_filenames.setdefault(subject_by_filename[filename], []).append(
        filename)
  if len(subject_filenames) < num_folds:
    raise ValueError(f'need at least num_folds={num_folds} subjects, got '
                     f'{len(subject_filenames)} subjects in {len(filenames)} '
                     'images')
  subject_hc = {subject_id: float(np.mean([hc_by_filename[f] for f in names]))
                for subject_id, names in subject_filenames.items()}

  # One stream for the folds, one per test fold for its validation set: each
  # is reproducible on its own.
  fold_seed, *val_seeds = np.random.SeedSequence(seed).spawn(num_folds + 1)
  subject_fold = _deal_subjects_to_folds(
      subject_ids=sorted(subject_hc, key=lambda s: (subject_hc[s], s)),
      num_images={s: len(names) for s, names in subject_filenames.items()},
      num_folds=num_folds,
      rng=np.random.default_rng(fold_seed))

  val_filenames = _draw_val_filenames(subject_filenames, subject_hc,
                                      subject_fold, num_folds,
                                      val_fraction, val_seeds)

  return FoldAssignment(
      num_folds=int(num_folds),
      seed=int(seed),
      val_fraction=float(val_fraction),
      images=tuple(ImageFold(f, s, subject_fold[s])
                   for s, names in subject_filenames.items() for f in names),
      val_filenames=tuple(val_filenames),
      named_subjects=subject_ids is None)


def _checked_inputs(filenames, hc_mm, num_folds, val_fraction, seed
                    ) -> tuple[list[str], np.ndarray]:
  """`assign_folds`' inputs checked: (the filenames as a list, hc_mm as a
  float64 array).

  Raises:
    ValueError: on bad settings, duplicate filenames or non-finite HC.
  """
  _check_num_folds(num_folds)
  _check_val_fraction(val_fraction)
  if (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or
      seed < 0):
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}')
  filenames = list(filenames)
  hc_mm = np.asarray(hc_mm, dtype=np.float64)
  if hc_mm.ndim != 1 or len(hc_mm) != len(filenames):
    raise ValueError(f'hc_mm must be a list of one value per filename: got '
                     f'{len(filenames)} filenames and hc_mm of shape '
                     f'{hc_mm.shape}')
  if len(set(filenames)) != len(filenames):
    seen, duplicates = set(), []
    for filename in filenames:
      if filename in seen:
        duplicates.append(filename)
      seen.add(filename)
    raise ValueError(f'duplicate filenames: {sorted(set(duplicates))[:10]}')
  not_finite = [f for f, hc in zip(filenames, hc_mm) if not math.isfinite(hc)]
  if not_finite:
    raise ValueError(f'hc_mm is not finite for {len(not_finite)} images: '
                     f'{not_finite[:10]}')
  return filenames, hc_mm


def _draw_val_filenames(subject_filenames, subject_hc, subject_fold,
                        num_folds, val_fraction, val_seeds
                        ) -> list[tuple[str, ...]]:
  """Each test fold's validation images: its training subjects, sorted by
  HC, cut into `_num_val_subjects` groups, one subject drawn from each."""
  val_filenames = []
  for fold in range(num_folds):
    train_subjects = sorted((s for s in subject_hc if subject_fold[s] != fold),
                            key=lambda s: (subject_hc[s], s))
    num_val = _num_val_subjects(len(train_subjects), val_fraction)
    rng = np.random.default_rng(val_seeds[fold])
    val_subjects = [int(rng.choice(group)) for group in
                    np.array_split(np.asarray(train_subjects), num_val)
                    ] if num_val else []
    val_filenames.append(tuple(sorted(
        f for s in val_subjects for f in subject_filenames[s])))
  return val_filenames


def _deal_subjects_to_folds(subject_ids: list[int], num_images: dict[int, int],
                            num_folds: int,
                            rng: np.random.Generator) -> dict[int, int]:
  """Deals HC-sorted subjects, block by block, one to each fold."""
  subject_fold = {}
  images_per_fold = np.zeros(num_folds, dtype=np.int64)
  for start in range(0, len(subject_ids), num_folds):
    block = subject_ids[start:start + num_folds]
    block = [block[i] for i in rng.permutation(len(block))]
    # Stable sort: subjects with as many images stay in random order.
    block.sort(key=lambda s: -num_images[s])
    # Folds with the fewest images first, ties in random order.
    fold_order = np.lexsort((rng.permutation(num_folds), images_per_fold))
    for subject_id, fold in zip(block, fold_order):
      subject_fold[subject_id] = int(fold)
      images_per_fold[fold] += num_images[subject_id]
  return subject_fold


def _num_val_subjects(num_train_subjects: int, val_fraction: float) -> int:
  """About val_fraction of the subjects, at least one, leaving one to train."""
  if val_fraction == 0:
    return 0
  num_val = max(1, round(val_fraction * num_train_subjects))
  return min(num_val, num_train_subjects - 1)


def _check_num_folds(num_folds: int) -> None:
  if (isinstance(num_folds, bool) or not isinstance(num_folds, numbers.Integral)
      or num_folds < 2):
    raise ValueError(f'num_folds must be an integer >= 2, got {num_folds!r}')


def _check_val_fraction(val_fraction: float) -> None:
  if not (isinstance(val_fraction, numbers.Real) and 0 <= val_fraction < 1):
    raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction!r}')
