"""Tests for hc_jax.data.folds: subject-grouped, HC-balanced cross-validation folds."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from hc_jax.data import folds

NUM_FOLDS = 5
HC18_CSV = 'training_set_pixel_size_and_HC.csv'


def _hc18_dir() -> Path:
  """The HC18 data: $HC18_DIR, else the checkout's sibling shared/hc18."""
  if os.environ.get('HC18_DIR'):
    return Path(os.environ['HC18_DIR'])
  return Path(__file__).resolve().parents[2] / 'shared' / 'hc18'


def _fake_dataset(num_subjects: int = 240,
                  seed: int = 0) -> tuple[list[str], np.ndarray]:
  """About 300 HC18-like images; HC rises with subject_id, as in HC18.

  Subject numbers have gaps, most subjects have one image and some two to four
  ('NNN_HC.png', 'NNN_2HC.png', ...). The filenames come shuffled.
  """
  rng = np.random.default_rng(seed)
  subject_ids = np.sort(rng.choice(806, size=num_subjects, replace=False))
  frames_per_subject = rng.choice(4, size=num_subjects,
                                  p=[0.78, 0.16, 0.04, 0.02]) + 1
  frames_per_subject[[3, 100, 200]] = 4  # Always some four-image subjects.
  filenames, hc_mm = [], []
  for subject_id, num_frames in zip(subject_ids, frames_per_subject):
    subject_hc = 45 + 0.37 * subject_id + rng.normal(0, 10)
    for frame in range(1, num_frames + 1):
      infix = '' if frame == 1 else str(frame)
      filenames.append(f'{subject_id:03d}_{infix}HC.png')
      hc_mm.append(subject_hc + rng.normal(0, 1))
  order = rng.permutation(len(filenames))
  return [filenames[i] for i in order], np.asarray(hc_mm)[order]


def _subject(filename: str) -> int:
  return folds.parse_filename(filename)[0]


def _hc_balance_problems(fold_by_filename: dict[str, int],
                         hc_by_filename: dict[str, float],
                         rel_tolerance: float = 0.05) -> list[str]:
  """Ways in which the folds' HC distributions differ from the whole set's.

  Stratification puts a fold's k-th smallest subject in the k-th block of
  num_folds HC-sorted subjects, so a fold's median can be off by about one
  block's HC width: some % with only 24 subjects a fold (10 folds of 240).
  """
  all_hc = np.asarray(list(hc_by_filename.values()))
  low_decile, high_decile = np.quantile(all_hc, [0.1, 0.9])
  problems = []
  for fold in sorted(set(fold_by_filename.values())):
    fold_hc = np.asarray([hc_by_filename[f]
                          for f, k in fold_by_filename.items() if k == fold])
    for stat in (np.mean, np.median):
      overall, this_fold = stat(all_hc), stat(fold_hc)
      if abs(this_fold - overall) > rel_tolerance * overall:
        problems.append(f'fold {fold}: {stat.__name__} {this_fold:.1f} vs '
                        f'{overall:.1f} overall')
    if fold_hc.min() > low_decile:
      problems.append(f'fold {fold}: min {fold_hc.min():.1f} above the lowest '
                      f'decile ({low_decile:.1f})')
    if fold_hc.max() < high_decile:
      problems.append(f'fold {fold}: max {fold_hc.max():.1f} below the '
                      f'highest decile ({high_decile:.1f})')
  return problems


def _per_subject(
    fold_by_filename: dict[str, int], hc_by_filename: dict[str, float]
) -> tuple[dict[int, int], dict[int, float]]:
  """Per-image folds and HC to per-subject folds and mean HC."""
  fold_by_subject, hcs_by_subject = {}, {}
  for filename, fold in fold_by_filename.items():
    fold_by_subject[_subject(filename)] = fold
    hcs_by_subject.setdefault(_subject(filename), []).append(
        hc_by_filename[filename])
  return fold_by_subject, {s: float(np.mean(hcs))
                           for s, hcs in hcs_by_subject.items()}


def _check_assignment(assignment: folds.FoldAssignment, filenames: list[str],
                      hc_mm: np.ndarray) -> None:
  """Asserts the properties every assignment must have."""
  hc_by_filename = dict(zip(filenames, hc_mm.tolist()))
  all_filenames = set(filenames)
  num_folds = assignment.num_folds

  # Every image in exactly one test fold; no subject in two folds.
  assert sorted(assignment.filenames) == sorted(filenames)
  subject_folds = {}
  for filename in filenames:
    subject_folds.setdefault(_subject(filename), set()).add(
        assignment.fold_of(filename))
  assert all(len(k) == 1 for k in subject_folds.values())
  test_union = []
  for fold in range(num_folds):
    test_union += assignment.split(fold)['test']
  assert sorted(test_union) == sorted(filenames)

  # Each fold's split partitions the images, grouped by subject.
  val_sets = []
  for fold in range(num_folds):
    split = assignment.split(fold)
    assert set(split) == {'train', 'val', 'test'}
    for part in split.values():
      assert part == sorted(part)
    train, val, test = (set(split[k]) for k in ('train', 'val', 'test'))
    assert train | val | test == all_filenames
    assert len(train) + len(val) + len(test) == len(all_filenames)
    assert all(assignment.fold_of(f) == fold for f in test)
    assert all(assignment.fold_of(f) != fold for f in val)
    train_subjects, val_subjects, test_subjects = (
        {_subject(f) for f in part} for part in (train, val, test))
    assert not train_subjects & val_subjects
    assert not train_subjects & test_subjects
    assert not val_subjects & test_subjects
    # About val_fraction of the training subjects, spread over their HC range.
    num_train_val = len(train_subjects) + len(val_subjects)
    assert abs(len(val_subjects) -
               assignment.val_fraction * num_train_val) <= 1
    subject_hc = {}
    for f in train | val:
      subject_hc.setdefault(_subject(f), []).append(hc_by_filename[f])
    subject_hc = {s: np.mean(hcs) for s, hcs in subject_hc.items()}
    low, high = np.quantile(list(subject_hc.values()), [0.15, 0.85])
    val_hc = [subject_hc[s] for s in val_subjects]
    assert min(val_hc) <= low and max(val_hc) >= high
    val_sets.append(val)
  # A different validation set for each test fold.
  assert len({frozenset(v) for v in val_sets}) == num_folds

  # HC balanced over folds, per subject (what the folds are stratified on).
  # Per image, subjects with several images add noise that small sets feel.
  fold_by_filename = {f: assignment.fold_of(f) for f in filenames}
  fold_by_subject, hc_by_subject = _per_subject(fold_by_filename,
                                                hc_by_filename)
  assert _hc_balance_problems(fold_by_subject, hc_by_subject) == []

  # Fold sizes within a few images, subjects within 1.
  images_per_fold = np.bincount(list(fold_by_filename.values()),
                                minlength=num_folds)
  max_images_per_subject = max(
      np.bincount([_subject(f) for f in filenames]))
  assert images_per_fold.max() - images_per_fold.min() <= max_images_per_subject
  subjects_per_fold = np.bincount(
      [next(iter(k)) for k in subject_folds.values()], minlength=num_folds)
  assert subjects_per_fold.max() - subjects_per_fold.min() <= 1


@pytest.mark.parametrize('filename, expected', [
    ('010_HC.png', (10, 1)),
    ('010_2HC.png', (10, 2)),
    ('805_4HC.png', (805, 4)),
    ('000_HC.png', (0, 1)),
    ('1234_HC.png', (1234, 1)),
])
def test_parse_filename(filename, expected):
  assert folds.parse_filename(filename) == expected


@pytest.mark.parametrize('filename', [
    '010_HC_Annotation.png', '010_2HC', '010_HC.jpg', 'abc_HC.png',
    '010HC.png', '010_xHC.png', 'training_set/010_HC.png', '', '010_HC.png '])
def test_parse_filename_rejects(filename):
  with pytest.raises(ValueError, match='not an HC18 image filename'):
    folds.parse_filename(filename)


def test_fake_dataset_shape():
  filenames, hc_mm = _fake_dataset()
  assert 280 <= len(filenames) <= 340
  assert len({_subject(f) for f in filenames}) == 240
  assert any(f.endswith('_4HC.png') for f in filenames)


def test_properties_on_fake_data():
  filenames, hc_mm = _fake_dataset()
  assignment = folds.assign_folds(filenames, hc_mm, num_folds=NUM_FOLDS)
  assert (assignment.num_folds, assignment.seed,
          assignment.val_fraction) == (5, 0, 0.1)
  _check_assignment(assignment, filenames, hc_mm)


@pytest.mark.parametrize('num_folds, seed', [(2, 1), (3, 2), (10, 3)])
def test_properties_other_settings(num_folds, seed):
  filenames, hc_mm = _fake_dataset(seed=seed)
  assignment = folds.assign_folds(filenames, hc_mm, num_folds=num_folds,
                                  seed=seed)
  _check_assignment(assignment, filenames, hc_mm)


def test_contiguous_subject_ranges_fail_balance_check():
  # Sanity of the balance check itself: folds as contiguous runs of subject
  # numbers (which rise with head size) must be flagged.
  filenames, hc_mm = _fake_dataset()
  subject_ids = sorted({_subject(f) for f in filenames})
  fold_of_subject = {s: i * NUM_FOLDS // len(subject_ids)
                     for i, s in enumerate(subject_ids)}
  contiguous = {f: fold_of_subject[_subject(f)] for f in filenames}
  problems = _hc_balance_problems(
      *_per_subject(contiguous, dict(zip(filenames, hc_mm))))
  assert any('mean' in p for p in problems)
  assert any('median' in p for p in problems)
  assert any('lowest decile' in p for p in problems)
  assert any('highest decile' in p for p in problems)


def test_reproducible_for_a_seed_and_different_for_another():
  filenames, hc_mm = _fake_dataset()
  first = folds.assign_folds(filenames, hc_mm, seed=0)
  assert folds.assign_folds(filenames, hc_mm, seed=0) == first
  other = folds.assign_folds(filenames, hc_mm, seed=1)
  assert other != first
  moved = sum(first.fold_of(f) != other.fold_of(f) for f in filenames)
  assert moved > len(filenames) / 2
  assert other.val_filenames != first.val_filenames


def test_independent_of_input_order():
  filenames, hc_mm = _fake_dataset()
  order = np.argsort(filenames)
  assert folds.assign_folds(filenames, hc_mm) == folds.assign_folds(
      [filenames[i] for i in order], hc_mm[order])


def test_val_fraction_zero_gives_empty_validation():
  filenames, hc_mm = _fake_dataset()
  assignment = folds.assign_folds(filenames, hc_mm, val_fraction=0.0)
  for fold in range(NUM_FOLDS):
    split = assignment.split(fold)
    assert split['val'] == []
    assert len(split['train']) + len(split['test']) == len(filenames)


def test_json_round_trip(tmp_path):
  filenames, hc_mm = _fake_dataset()
  assignment = folds.assign_folds(filenames, hc_mm, val_fraction=0.2, seed=7)
  path = tmp_path / 'folds.json'
  assignment.to_json(path)
  restored = folds.FoldAssignment.from_json(path)
  assert restored == assignment
  for fold in range(NUM_FOLDS):
    assert restored.split(fold) == assignment.split(fold)

  payload = json.loads(path.read_text())
  assert (payload['num_folds'], payload['seed'],
          payload['val_fraction']) == (5, 7, 0.2)
  assert len(payload['images']) == len(filenames)
  assert set(payload['images'][0]) == {'filename', 'subject_id', 'fold'}
  assert [v['fold'] for v in payload['validation']] == list(range(NUM_FOLDS))
  assert '\n' in path.read_text()  # Indented, for people to read.


def test_from_json_rejects_subject_split_across_folds(tmp_path):
  filenames, hc_mm = _fake_dataset()
  path = tmp_path / 'folds.json'
  folds.assign_folds(filenames, hc_mm).to_json(path)
  payload = json.loads(path.read_text())
  image = next(i for i in payload['images']
               if i['filename'].endswith('_2HC.png'))
  image['fold'] = (image['fold'] + 1) % NUM_FOLDS
  path.write_text(json.dumps(payload))
  with pytest.raises(ValueError, match=f'subject {image["subject_id"]} is in'):
    folds.FoldAssignment.from_json(path)


@pytest.mark.parametrize('fold', [-1, 5, 100, 1.0, True, '0'])
def test_split_fold_out_of_range(fold):
  filenames, hc_mm = _fake_dataset()
  assignment = folds.assign_folds(filenames, hc_mm)
  with pytest.raises(ValueError, match=r'fold must be an integer in \[0, 4\]'):
    assignment.split(fold)


def test_fold_of_unknown_filename():
  filenames, hc_mm = _fake_dataset()
  with pytest.raises(KeyError, match='999_HC.png'):
    folds.assign_folds(filenames, hc_mm).fold_of('999_HC.png')


def test_assign_folds_rejects_bad_filenames():
  filenames, hc_mm = _fake_dataset()
  filenames[5] = '010_HC_Annotation.png'
  with pytest.raises(ValueError, match='010_HC_Annotation.png'):
    folds.assign_folds(filenames, hc_mm)


def test_assign_folds_rejects_too_few_subjects():
  filenames = ['001_HC.png', '001_2HC.png', '002_HC.png', '003_HC.png',
               '004_HC.png']
  with pytest.raises(ValueError, match='at least num_folds=5 subjects, got 4'):
    folds.assign_folds(filenames, [50.0, 51.0, 60.0, 70.0, 80.0], num_folds=5)
  # Exactly num_folds subjects is enough.
  assignment = folds.assign_folds(filenames, [50.0, 51.0, 60.0, 70.0, 80.0],
                                  num_folds=4)
  assert {assignment.fold_of(f) for f in filenames} == set(range(4))


@pytest.mark.parametrize('change, message', [
    (dict(num_folds=1), 'num_folds must be an integer >= 2'),
    (dict(num_folds=2.5), 'num_folds must be an integer >= 2'),
    (dict(val_fraction=1.0), r'val_fraction must be in \[0, 1\)'),
    (dict(val_fraction=-0.1), r'val_fraction must be in \[0, 1\)'),
    (dict(seed=-1), 'seed must be a non-negative integer'),
    (dict(hc_mm=[100.0] * 3), 'one value per filename'),
    (dict(filenames=['001_HC.png'] * 2 + [f'{i:03d}_HC.png'
                                          for i in range(2, 8)]),
     r"duplicate filenames: \['001_HC.png'\]"),
    (dict(hc_mm=[100.0, np.nan] + [100.0] * 6), 'not finite'),
    (dict(hc_mm=[100.0, np.inf] + [100.0] * 6), 'not finite'),
])
def test_assign_folds_errors(change, message):
  kwargs = dict(filenames=[f'{i:03d}_HC.png' for i in range(8)],
                hc_mm=np.linspace(50, 300, 8), num_folds=2)
  kwargs.update(change)
  with pytest.raises(ValueError, match=message):
    folds.assign_folds(**kwargs)


def test_real_hc18_training_set():
  csv_path = _hc18_dir() / HC18_CSV
  if not csv_path.exists():
    pytest.skip(f'HC18 not found at {csv_path} (set HC18_DIR)')
  with open(csv_path, newline='') as f:
    rows = list(csv.DictReader(f))
  filenames = [row['filename'] for row in rows]
  hc_mm = np.asarray([float(row['head circumference (mm)']) for row in rows])
  assert len(filenames) == 900
  assignment = folds.assign_folds(filenames, hc_mm, num_folds=NUM_FOLDS)
  _check_assignment(assignment, filenames, hc_mm)
  # With 900 images, the folds are balanced per image too.
  assert _hc_balance_problems({f: assignment.fold_of(f) for f in filenames},
                              dict(zip(filenames, hc_mm)),
                              rel_tolerance=0.03) == []
