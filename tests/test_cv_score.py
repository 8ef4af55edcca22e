"""Tests for hc_jax.cv_score on tiny runs trained on phantom scans.

Two members (seeds 0 and 1) of one config, each on folds 0 and 1, trained
together as `hc_jax.grid --seeds=0,1 --stack` lays them out:
ROOT/default_seed<s>/fold<k>.
"""

import csv
import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import REPO
from hc_jax import cv_score
from hc_jax import grid as grid_lib
from hc_jax import workdir as workdir_lib
from hc_jax.data import folds as folds_lib
from hc_jax.data import hc18
from hc_jax.evaluation import cv
from hc_jax.evaluation import cv_report
from hc_jax.evaluation import cv_runs
from hc_jax.evaluation import loading

FOLDS = (0, 1)


@pytest.fixture(scope='module', autouse=True)
def fast_compile():
  """Compile time dominates these tiny runs: skip XLA's optimisations."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


@pytest.fixture(scope='module')
def members(phantom_hc18, tmp_path_factory):
  """[ROOT/default_seed0, ROOT/default_seed1], each with fold0/ and fold1/,
  trained as members of one step (one compilation)."""
  hc18_dir, cache_dir = phantom_hc18
  root = str(tmp_path_factory.mktemp('cv_grid'))
  overrides = [f'data.hc18_dir={hc18_dir}', f'data.cache_dir={cache_dir}',
               'image_size=32', 'num_epochs=1', 'batch_size=8',
               'eval_batch_size=8',
               'members_per_call=vmap']
  done = grid_lib.run_grid([os.path.join(REPO, 'configs', 'default.py')],
                           FOLDS, root, overrides, stack=True, seeds=(0, 1))
  assert len(done['trained']) == 4
  return [os.path.join(root, f'default_seed{seed}') for seed in (0, 1)]


@pytest.fixture(scope='module')
def single(members):
  """The plain scores of the first member alone."""
  return cv.score(members[:1])


def _by_name(rows, key='hc_mm_pred'):
  return {row['filename']: float(row[key]) for row in rows}


def _read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_one_member_reproduces_its_test_predictions(members, single):
  """Scoring from the PNGs gives the trainer's own test predictions."""
  assert single.members == ['default_seed0'] and list(single.folds) == [0, 1]
  for fold in FOLDS:
    run = os.path.join(members[0], f'fold{fold}')
    assert single.runs[fold] == [run]
    expected = _read_csv(os.path.join(run, workdir_lib.PREDICTIONS_FILE))
    got = [row for row in single.rows if row['fold'] == fold]
    assert [r['filename'] for r in got] == [r['filename'] for r in expected]
    for key in ('hc_mm_pred', 'hc_mm_true', 'hc_px_pred', 'hc_px_true',
                'error_mm', 'pixel_size_mm', 'subject_id'):
      np.testing.assert_allclose([float(r[key]) for r in got],
                                 [float(r[key]) for r in expected],
                                 rtol=1e-3, atol=2e-3, err_msg=key)
    with open(os.path.join(run, workdir_lib.RESULTS_FILE)) as f:
      results = json.load(f)
    assert single.folds[fold]['num_images'] == results['test_num_images']
    assert single.folds[fold]['mae_mm'] == pytest.approx(
        results['test_mae_mm'], rel=1e-3)
  assert single.num_images == sum(len(_read_csv(os.path.join(
      members[0], f'fold{k}', workdir_lib.PREDICTIONS_FILE))) for k in FOLDS)
  errors = np.abs([row['error_mm'] for row in single.rows])
  assert single.mae_mm == pytest.approx(errors.mean())
  assert single.worst_mm == errors.max() and single.median_mm == pytest.approx(
      np.median(errors))
  assert single.worst(1)[0]['filename'] == single.worst_file


def test_ensemble_is_the_mean_of_its_members_within_each_fold(
    members, single, tmp_path, capsys):
  ensemble = cv.score(members)
  second = cv.score(members[1:])
  assert ensemble.member_columns == ['hc_mm_default_seed0',
                                     'hc_mm_default_seed1']
  assignment = folds_lib.FoldAssignment.from_json(
      os.path.join(members[0], 'fold0', 'folds.json'))
  for fold in FOLDS:
    # Fold k's images are fold k's test images, predicted by fold k's runs.
    assert [row['filename'] for row in ensemble.rows if row['fold'] == fold
            ] == assignment.split(fold)['test']
    assert ensemble.runs[fold] == [os.path.join(m, f'fold{fold}')
                                   for m in members]
  own = [_by_name(single.rows), _by_name(second.rows)]
  for row in ensemble.rows:
    name = row['filename']
    assert row['hc_mm_default_seed0'] == pytest.approx(own[0][name])
    assert row['hc_mm_default_seed1'] == pytest.approx(own[1][name])
    assert row['hc_mm_pred'] == pytest.approx((own[0][name] + own[1][name]) / 2)
    assert row['hc_px_pred'] * row['pixel_size_mm'] == pytest.approx(
        row['hc_mm_pred'])
  assert max(abs(own[0][n] - own[1][n]) for n in own[0]) > 1e-2

  # The seeds as one member, ROOT/<config>/fold<k>/seed<s>/: the same mean.
  nested = tmp_path / 'seeds'
  for fold in FOLDS:
    for seed, member in enumerate(members):
      (nested / f'fold{fold}').mkdir(parents=True, exist_ok=True)
      os.symlink(os.path.join(member, f'fold{fold}'),
                 nested / f'fold{fold}' / f'seed{seed}')
  as_one = cv.score([str(nested)])
  assert as_one.member_columns == ['hc_mm_seeds']
  np.testing.assert_allclose([row['hc_mm_pred'] for row in as_one.rows],
                             [row['hc_mm_pred'] for row in ensemble.rows],
                             rtol=1e-6)

  out, summary = tmp_path / 'images.csv', tmp_path / 'summary.csv'
  flags = [f'--runs={",".join(members)}', f'--out={out}', '--worst=3',
           f'--summary_csv={summary}']
  assert cv_score.main(flags) == 0
  cv_report.append_summary(str(summary), ensemble.summary_row('again'))
  printed = capsys.readouterr().out
  assert 'fold 0: ' in printed and 'fold 1: ' in printed
  assert 'default_seed0+default_seed1: ' in printed and 'worst 3:' in printed
  rows = _read_csv(out)
  assert list(rows[0]) == list(cv.IMAGE_COLUMNS) + ensemble.member_columns
  assert [r['filename'] for r in rows] == [r['filename'] for r in ensemble.rows]
  np.testing.assert_allclose([float(r['hc_mm_pred']) for r in rows],
                             [r['hc_mm_pred'] for r in ensemble.rows],
                             atol=1e-3)
  table = _read_csv(summary)
  assert [r['name'] for r in table] == ['default_seed0+default_seed1', 'again']
  assert float(table[0]['mae_mm']) == pytest.approx(ensemble.mae_mm, abs=1e-3)
  assert int(table[0]['num_images']) == ensemble.num_images


@pytest.mark.slow  # Predicts every test image twice more.
def test_flip_tta_is_the_mean_of_the_scan_and_its_mirror(
    members, single, phantom_hc18):
  flipped = cv.score(members[:1], tta_flip=True)
  plain = _by_name(single.rows, 'hc_px_pred')
  assert flipped.tta_flip and [r['filename'] for r in flipped.rows] == list(
      plain)
  assert max(abs(r['hc_px_pred'] - plain[r['filename']])
             for r in flipped.rows) > 1e-2
  for fold in FOLDS:
    rows = [row for row in flipped.rows if row['fold'] == fold]
    mirrored = loading.load(os.path.join(members[0], f'fold{fold}'))(
        [np.ascontiguousarray(hc18.read_grayscale(os.path.join(
            phantom_hc18[0], 'training_set', row['filename']))[0][:, ::-1])
         for row in rows])['hc_px']
    # Flipping before or after the resize differs only by float rounding.
    np.testing.assert_allclose(
        [row['hc_px_pred'] for row in rows],
        (np.array([plain[row['filename']] for row in rows]) + mirrored) / 2,
        rtol=1e-4)


def _error_line(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  return err[0]


def test_bad_runs_are_one_line_errors(members, phantom_hc18, tmp_path, capsys):
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert cv_score.main([f'--runs={empty}']) == 2
  assert 'holds no runs' in _error_line(capsys)
  assert cv_score.main([f'--runs={tmp_path / "nowhere"}']) == 2
  assert 'does not exist' in _error_line(capsys)
  # The directory above the members: say which members it holds.
  assert cv_score.main([f'--runs={os.path.dirname(members[0])}']) == 2
  assert 'pass one of them' in _error_line(capsys)
  with pytest.raises(SystemExit) as exit_info:
    cv_score.main(['--runs=,'])
  assert exit_info.value.code == 2
  assert 'names no runs' in _error_line(capsys)

  partial = tmp_path / 'partial'
  partial.mkdir()
  os.symlink(os.path.join(members[1], 'fold0'), partial / 'fold0')
  assert cv_score.main([f'--runs={members[0]},{partial}']) == 2
  assert 'fold 1 is in' in _error_line(capsys)
  with pytest.raises(cv_runs.ScoreError, match='fold 1 is in'):
    cv.score([members[0], str(partial)])

  # A run whose folds.json assigns the images otherwise: never pooled.
  other = tmp_path / 'other'
  shutil.copytree(members[1], other, symlinks=True,
                  ignore=shutil.ignore_patterns('data', 'tensorboard'))
  with open(os.path.join(phantom_hc18[0], hc18.SPLITS['train'][1])) as f:
    labels = list(csv.reader(f))[1:]
  folds_lib.assign_folds([row[0] for row in labels],
                         [float(row[2]) for row in labels], num_folds=5,
                         val_fraction=0.1, seed=7).to_json(
                             other / 'fold1' / 'folds.json')
  assert cv_score.main([f'--runs={members[0]},{other}']) == 2
  assert 'assigns the images to folds differently' in _error_line(capsys)

  # Runs whose test fold is kept unseen while settings are tuned.
  unseen = tmp_path / 'unseen'
  shutil.copytree(members[1], unseen, symlinks=True,
                  ignore=shutil.ignore_patterns('data', 'tensorboard'))
  with open(unseen / 'fold1' / 'config.json') as f:
    config = json.load(f)
  with open(unseen / 'fold1' / 'config.json', 'w') as f:
    json.dump({**config, 'score_test': False}, f)
  assert cv_score.main([f'--runs={members[0]},{unseen}']) == 2
  assert 'trained with score_test=False' in _error_line(capsys)
  checked, _ = cv_runs.check_members([members[0], str(unseen)],
                                      unseen_test_ok=True)
  assert checked[1] == {0: str(unseen / 'fold0'), 1: str(unseen / 'fold1')}
  # A directory of runs that are not fold<k>/: name them one by one.
  loose = tmp_path / 'loose'
  loose.mkdir()
  for seed, member in enumerate(members):
    os.symlink(os.path.join(member, 'fold0'), loose / f'seed{seed}')
  assert cv_score.main([f'--runs={loose}']) == 2
  assert 'holds runs (seed0, seed1): pass each as a member' in _error_line(
      capsys)

  # A fold<k>/ directory whose run is of another fold.
  swapped = tmp_path / 'swapped'
  swapped.mkdir()
  os.symlink(os.path.join(members[0], 'fold0'), swapped / 'fold1')
  assert cv_score.main([f'--runs={swapped}']) == 2
  assert 'holds a run of fold 0, not 1' in _error_line(capsys)
  # An unfinished run.
  unfinished = tmp_path / 'unfinished' / 'fold0'
  unfinished.mkdir(parents=True)
  shutil.copy(os.path.join(members[0], 'fold0', 'config.json'), unfinished)
  assert cv_score.main([f'--runs={unfinished.parent}']) == 2
  assert 'training did not finish' in _error_line(capsys)
  # Another HC18 copy than the one the runs trained on.
  changed = tmp_path / 'hc18'
  shutil.copytree(phantom_hc18[0], changed)
  (changed / 'training_set' / 'extra.png').write_bytes(b'')
  assert cv_score.main([f'--runs={members[0]}', f'--hc18_dir={changed}']) == 2
  assert 'trained on another HC18 copy' in _error_line(capsys)
  # A directory that is not HC18.
  assert cv_score.main([f'--runs={members[0]}', f'--hc18_dir={tmp_path}']) == 2
  assert 'holds no training_set_pixel_size_and_HC.csv' in _error_line(capsys)


def test_validation_part_reproduces_the_trainers_validation_mae(members):
  """--part=val scores each fold's validation part, not its test fold."""
  val = cv.score(members[:1], part='val')
  assert val.part == 'val'
  for fold in FOLDS:
    run = os.path.join(members[0], f'fold{fold}')
    assignment = cv_runs.read_assignment(run)
    names = sorted(r['filename'] for r in val.rows if r['fold'] == fold)
    assert names == sorted(assignment.split(fold)['val'])
    assert not set(names) & set(assignment.split(fold)['test'])
    with open(os.path.join(run, 'metrics.jsonl')) as f:
      last = [json.loads(line) for line in f if 'val_mae_mm' in line][-1]
    assert val.folds[fold]['mae_mm'] == pytest.approx(last['val_mae_mm'],
                                                      rel=1e-3)
  with pytest.raises(cv_runs.ScoreError, match='part must be one of'):
    cv.score(members[:1], part='train')


def test_flag_table_counts_what_a_threshold_catches():
  rows = [{'quality': q, 'error_mm': e} for q, e in
          [(0.95, 1.0), (0.9, -2.0), (0.6, 12.0), (0.5, -25.0), (0.85, 6.0)]]
  table = cv_report.flag_table(rows, [0.7, 0.88])
  assert table[0]['flagged'] == 2 and table[0]['caught_10'] == 2
  assert table[0]['over_5'] == 3 and table[0]['caught_5'] == 2
  assert table[0]['over_20'] == 1 and table[0]['caught_20'] == 1
  assert table[1]['flagged'] == 3 and table[1]['caught_5'] == 3
  assert table[1]['good_flagged'] == 0
  assert '2 / 2' in cv_report.format_flag_table(table)


def test_a_shipped_archive_is_scored_as_its_runs(members, single, tmp_path,
                                                 capsys):
  """An exported archive's members predict their own test folds, the folds
  drawn again from the CSV (an archive keeps no folds.json)."""
  from hc_jax import shipped  # pylint: disable=import-outside-toplevel
  from hc_jax import archive as archive_lib
  archive = str(tmp_path / 'tiny.npz')
  shipped.export(members[0], archive)
  got = cv.score([archive])
  assert list(got.folds) == list(FOLDS)
  assert [r['filename'] for r in got.rows] == [
      r['filename'] for r in single.rows]
  np.testing.assert_allclose(list(_by_name(got.rows).values()),
                             list(_by_name(single.rows).values()), rtol=1e-5)
  for fold in FOLDS:
    run = os.path.join(members[0], f'fold{fold}')
    drawn = cv_runs.read_assignment(got.runs[fold][0])
    assert drawn.split(fold) == cv_runs.read_assignment(run).split(fold)
  # One member of the archive alone is one fold's run.
  one = archive_lib.read(f'{archive}:fold1')
  assert one.members == ['fold1'] and one.configs[0]['fold'] == 1
  assert cv_runs.member_runs(archive) == {0: f'{archive}:fold0',
                                           1: f'{archive}:fold1'}
  assert cv_score.main([f'--runs={archive}:nothing']) == 2
  assert 'has no member' in capsys.readouterr().err
