"""Tests for hc_jax.predict and hc_jax.gestational_age on tiny trained runs."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from scipy import optimize

from conftest import REPO
from hc_jax import gestational_age
from hc_jax import hc18
from hc_jax import predict
from hc_jax import train


@pytest.fixture(scope='module')
def grid(phantom_hc18, tmp_path_factory):
  """Two finished tiny runs of one config, seeds 0 and 1: grid/fold{0,1}.

  Built like conftest's `tiny_config` (function-scoped, so not usable here),
  with one epoch.
  """
  from configs import default  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('grid')
  for seed in (0, 1):
    config = default.get_config()
    config.data.hc18_dir, config.data.tfds_data_dir = phantom_hc18
    config.image_size = 32
    config.num_epochs = 1
    config.batch_size = 8
    config.eval_batch_size = 8
    config.log_every_steps = 1000
    config.seed = seed
    train.train_and_evaluate(config, str(root / f'fold{seed}'))
  return str(root)


@pytest.fixture(scope='module')
def run(grid):
  return os.path.join(grid, 'fold0')


def _read_rows(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _test_fold(run_dir, hc18_dir):
  """(images, pixel sizes, training's hc_mm_pred) of a run's test fold."""
  rows = _read_rows(os.path.join(run_dir, train.PREDICTIONS_FILE))
  images = [hc18.read_grayscale(os.path.join(
      hc18_dir, 'training_set', r['filename']))[0] for r in rows]
  return (images, [float(r['pixel_size_mm']) for r in rows],
          np.array([float(r['hc_mm_pred']) for r in rows]))


def _copy_test_set(phantom_hc18, root):
  """A writable copy of the phantom test_set/ and its CSV under `root`."""
  shutil.copytree(os.path.join(phantom_hc18[0], 'test_set'), root / 'test_set')
  shutil.copy(os.path.join(phantom_hc18[0], 'test_set_pixel_size.csv'), root)
  return root / 'test_set', sorted(os.listdir(root / 'test_set'))


def test_hadlock_values():
  assert gestational_age.hadlock_ga_weeks(175.0) == pytest.approx(20.0, abs=0.1)
  assert gestational_age.hadlock_ga_weeks(346.0) == pytest.approx(40.1, abs=0.1)
  weeks = gestational_age.hadlock_ga_weeks(np.array([175.0, 346.0, np.nan]))
  assert weeks[:2] == pytest.approx([20.02, 40.07], abs=0.01)
  assert np.isnan(weeks[2])


def test_ga_flag_at_the_edges():
  flag = gestational_age.OUTSIDE_RANGE_FLAG
  assert [gestational_age.ga_flag(w) for w in (13.99, 14.0, 30.0, 42.0, 42.01)
          ] == [flag, '', '', '', flag]
  assert gestational_age.ga_flag(float('nan')) == ''
  for edge in (14.0, 42.0):  # The HC at each edge, flagged only beyond it.
    hc_mm = optimize.brentq(
        lambda hc: gestational_age.hadlock_ga_weeks(hc) - edge, 10.0, 500.0)
    below = gestational_age.ga_flag(gestational_age.hadlock_ga_weeks(hc_mm - 0.5))
    above = gestational_age.ga_flag(gestational_age.hadlock_ga_weeks(hc_mm + 0.5))
    assert (below, above) == (('outside 14-42 weeks', '') if edge == 14.0
                              else ('', 'outside 14-42 weeks'))


def test_load_reproduces_the_runs_test_predictions(run, phantom_hc18):
  """Same preprocessing and weights as training: predictions_test.csv again."""
  images, pixel_sizes, hc_mm_train = _test_fold(run, phantom_hc18[0])
  predictor = predict.load(run)
  assert not predictor.is_ensemble and predictor.image_size == 32
  out = predictor(images, pixel_sizes)
  np.testing.assert_allclose(out['hc_mm'], hc_mm_train, atol=1e-3)
  assert np.isnan(out['hc_mm_sd']).all()
  np.testing.assert_allclose(out['hc_mm'], out['hc_px'] * pixel_sizes)
  # More images than one batch: padding and batching change nothing.
  many = predictor(images * 3, pixel_sizes * 3)
  np.testing.assert_allclose(many['hc_mm'], np.tile(out['hc_mm'], 3),
                             rtol=1e-5)
  with pytest.raises(ValueError, match='image 0: expected a 2D uint8 image'):
    predictor([images[0][..., None]])


def test_cli_on_a_test_set_with_bad_files(run, phantom_hc18, tmp_path, capsys):
  test_dir, good = _copy_test_set(phantom_hc18, tmp_path)
  scan = np.asarray(Image.open(test_dir / good[0]))
  (test_dir / 'corrupt_HC.png').write_bytes(b'\x89PNG\r\n\x1a\n not a png')
  Image.fromarray(scan.astype(np.uint16) * 256).save(test_dir / '16bit_HC.png')
  Image.fromarray(scan).save(test_dir / 'norow_HC.png')  # Good, but no CSV row.
  with open(tmp_path / 'test_set_pixel_size.csv', 'a') as f:
    f.write('corrupt_HC.png,0.1\n16bit_HC.png,0.1\n999_HC.png,0.1\n')
  out = tmp_path / 'predictions.csv'
  code = predict.main([f'--workdir={run}', f'--images={test_dir}',
                       f'--images={test_dir / "999_HC.png"}', f'--out={out}'])
  assert code == 1
  rows = {row['filename']: row for row in _read_rows(out)}
  assert len(rows) == len(good) + 4
  sizes = {r['filename']: float(r['pixel size(mm)']) for r in _read_rows(
      tmp_path / 'test_set_pixel_size.csv')}
  for name in good:
    row = rows[name]
    assert row['status'] == 'ok', row
    assert float(row['pixel_size_mm']) == sizes[name]
    assert float(row['hc_mm']) == pytest.approx(
        float(row['hc_px']) * sizes[name], abs=2e-3)
    assert float(row['ga_weeks']) == pytest.approx(
        gestational_age.hadlock_ga_weeks(float(row['hc_mm'])), abs=0.01)
    assert row['hc_mm_sd'] == ''
  assert 'corrupt' in rows['corrupt_HC.png']['status']
  assert '16-bit' in rows['16bit_HC.png']['status']
  assert rows['999_HC.png']['status'] == 'file is missing'
  assert 'no pixel size' in rows['norow_HC.png']['status']
  for name in ('corrupt_HC.png', '16bit_HC.png', '999_HC.png', 'norow_HC.png'):
    assert rows[name]['hc_px'] == rows[name]['hc_mm'] == ''
  summary = capsys.readouterr().out
  assert f'{len(good)} of {len(good) + 4} images predicted, 4 failed' in summary
  for name in ('corrupt_HC.png', '16bit_HC.png', '999_HC.png', 'norow_HC.png'):
    assert f'failed: {name}:' in summary


def test_images_without_pixel_size_give_px_only(run, phantom_hc18, tmp_path):
  scans = tmp_path / 'scans'
  scans.mkdir()
  names = sorted(os.listdir(os.path.join(phantom_hc18[0], 'test_set')))[:2]
  for name in names:
    shutil.copy(os.path.join(phantom_hc18[0], 'test_set', name), scans)
  out = tmp_path / 'predictions.csv'
  code = predict.main([f'--workdir={run}',
                       f'--images={",".join(str(scans / n) for n in names)}',
                       f'--out={out}'])
  assert code == 0
  rows = _read_rows(out)
  assert [row['filename'] for row in rows] == names
  for row in rows:
    assert row['status'] == 'ok' and float(row['hc_px']) != 0
    assert row['hc_mm'] == row['pixel_size_mm'] == row['ga_weeks'] == ''


def test_overlays_one_png_per_scan_of_its_size(run, phantom_hc18, tmp_path):
  test_dir, good = _copy_test_set(phantom_hc18, tmp_path)
  overlays = tmp_path / 'overlays'
  code = predict.main([f'--workdir={run}', f'--images={test_dir}',
                       f'--out={tmp_path / "p.csv"}', f'--overlays={overlays}'])
  assert code == 0
  assert sorted(os.listdir(overlays)) == sorted(
      n[:-4] + predict.OVERLAY_SUFFIX for n in good)
  for name in good:
    scan = Image.open(test_dir / name)
    overlay = Image.open(overlays / (name[:-4] + predict.OVERLAY_SUFFIX))
    assert overlay.size == scan.size
    # The text box changed the top-left corner and left the rest alone.
    drawn = np.asarray(overlay.convert('L'), np.int16)
    original = np.asarray(scan, np.int16)
    assert (drawn[:20, :60] != original[:20, :60]).any()
    assert (drawn[-20:, -60:] == original[-20:, -60:]).all()


def test_fold_ensemble_and_flip_tta(grid, phantom_hc18, tmp_path):
  images, pixel_sizes, _ = _test_fold(os.path.join(grid, 'fold0'),
                                      phantom_hc18[0])
  members = [predict.load(os.path.join(grid, f'fold{k}'))(images, pixel_sizes)
             for k in (0, 1)]
  ensemble = predict.load(grid)
  assert ensemble.is_ensemble and len(ensemble.runs) == 2
  out = ensemble(images, pixel_sizes)
  member_mm = np.stack([m['hc_mm'] for m in members])
  np.testing.assert_allclose(out['hc_mm'], member_mm.mean(0), rtol=1e-6)
  np.testing.assert_allclose(out['hc_mm_sd'], member_mm.std(0, ddof=1),
                             rtol=1e-5)
  assert (out['hc_mm_sd'] > 0).all()

  flipped = ensemble(images, pixel_sizes, tta_flip=True)
  assert np.abs(flipped['hc_mm'] - out['hc_mm']).max() > 1e-2
  # TTA is the mean over the image and its mirror (flipping the scan before
  # resizing equals flipping after, bar float rounding).
  mirrored = ensemble([np.ascontiguousarray(i[:, ::-1]) for i in images],
                      pixel_sizes)
  np.testing.assert_allclose(flipped['hc_mm'],
                             (out['hc_mm'] + mirrored['hc_mm']) / 2, atol=1e-3)

  test_dir, good = _copy_test_set(phantom_hc18, tmp_path)
  csv_path = tmp_path / 'p.csv'
  assert predict.main([f'--workdir={grid}', f'--images={test_dir}',
                       f'--out={csv_path}', '--tta-flip']) == 0
  rows = _read_rows(csv_path)
  assert len(rows) == len(good)
  assert all(float(row['hc_mm_sd']) > 0 for row in rows)


def test_unfinished_or_mismatched_runs_are_clear_errors(run, tmp_path, capsys):
  unfinished = tmp_path / 'unfinished'
  unfinished.mkdir()
  shutil.copy(os.path.join(run, 'config.json'), unfinished)
  with pytest.raises(ValueError, match='has no results.json: training did not '
                     'finish'):
    predict.load(str(unfinished))
  Image.fromarray(np.zeros([8, 8], np.uint8)).save(tmp_path / 'a.png')
  assert predict.main([f'--workdir={unfinished}', f'--images={tmp_path}',
                       f'--out={tmp_path / "p.csv"}']) == 2
  assert 'training did not finish' in capsys.readouterr().err

  mixed = tmp_path / 'mixed'
  for name, image_size in (('a', 32), ('b', 64)):
    (mixed / name).mkdir(parents=True)
    with open(os.path.join(run, 'config.json')) as f:
      config = json.load(f)
    config['image_size'] = image_size
    with open(mixed / name / 'config.json', 'w') as f:
      json.dump(config, f)
    shutil.copy(os.path.join(run, 'results.json'), mixed / name)
  with pytest.raises(ValueError, match='image_size=64'):
    predict.load(str(mixed))


def test_command_line_usage_errors(tmp_path):
  command = [sys.executable, '-m', 'hc_jax.predict',
             f'--workdir={tmp_path / "nowhere"}', f'--images={tmp_path}',
             f'--out={tmp_path / "p.csv"}']
  Image.fromarray(np.zeros([8, 8], np.uint8)).save(tmp_path / 'a.png')
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          check=False)
  assert result.returncode == 2, result.stderr
  assert 'error: workdir' in result.stderr and 'does not exist' in result.stderr
  result = subprocess.run(command[:3], cwd=REPO, capture_output=True, text=True,
                          check=False)
  assert result.returncode == 2 and 'required' in result.stderr


def test_parallel_map_keeps_order_and_returns_errors_per_item():
  def fn(x):
    if x == 3:
      raise ValueError('three')
    return x * x
  out = predict.parallel_map(fn, range(7))
  assert [o if not isinstance(o, Exception) else str(o) for o in out] == [
      0, 1, 4, 'three', 16, 25, 36]
  assert predict.parallel_map(fn, []) == []
