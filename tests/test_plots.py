"""Tests of the figures: each is written, and the numbers drawn are right."""

import os

import numpy as np
import pytest

from hc_jax import plots
from hc_jax import workdir as workdir_lib
from hc_jax.data import phantom_set
from hc_jax.evaluation import cv_table
from hc_jax.evaluation import figures
from hc_jax.evaluation import gestational_age
from test_grid import fake_grid, write_run

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _is_png(path):
  with open(path, 'rb') as f:
    return os.path.getsize(path) > 1000 and f.read(8) == PNG_SIGNATURE


@pytest.fixture(name='pooled')
def _pooled(tmp_path):
  fake_grid(str(tmp_path / 'grid'))
  config_dir = str(tmp_path / 'grid' / 'good')
  workdirs = list(workdir_lib.fold_dirs(config_dir).values())
  return workdirs, cv_table.pool_predictions(workdirs)


def test_each_figure_is_written(pooled, tmp_path):
  workdirs, predictions = pooled
  out = tmp_path / 'figures'
  paths = [
      figures.scatter_hc(predictions, str(out / 'scatter.png'), 'good'),
      figures.bland_altman(predictions, str(out / 'ba.png'), 'good'),
      figures.error_by_trimester(predictions, str(out / 'trimester.png')),
      figures.learning_curves(workdirs, str(out / 'curves.png'), 'good'),
  ]
  assert paths == [str(out / name) for name in
                   ('scatter.png', 'ba.png', 'trimester.png', 'curves.png')]
  for path in paths:
    assert _is_png(path), path


def test_limits_of_agreement():
  true_mm = np.array([100.0, 150.0, 200.0, 250.0])
  pred_mm = np.array([103.0, 149.0, 206.0, 251.0])
  difference = pred_mm - true_mm
  agreement = figures.limits_of_agreement(true_mm, pred_mm)
  sd = difference.std(ddof=1)
  assert agreement['bias_mm'] == pytest.approx(2.25)
  assert agreement['sd_mm'] == pytest.approx(sd)
  assert agreement['lower_mm'] == pytest.approx(2.25 - 1.96 * sd)
  assert agreement['upper_mm'] == pytest.approx(2.25 + 1.96 * sd)


def test_trimesters_follow_hadlock_ga_of_the_true_hc():
  hc_mm = np.array([60.0, 80.0, 100.0, 200.0, 250.0, 270.0, 330.0])
  ga_weeks = gestational_age.hadlock_ga_weeks(hc_mm)
  expected = np.where(ga_weeks < 14, 0, np.where(ga_weeks < 28, 1, 2))
  np.testing.assert_array_equal(figures.trimester_index(hc_mm), expected)
  np.testing.assert_array_equal(expected, [0, 0, 1, 1, 1, 2, 2])


def test_worst_cases_show_the_largest_errors(tmp_path):
  truth = phantom_set.write_hc18(str(tmp_path / 'hc18'), num_train=8,
                                 num_test=1, seed=3)['train']
  filenames = [record['filename'] for record in truth]
  pixel_size = np.array([record['pixel_size_mm'] for record in truth])
  true_px = np.array([record['hc_mm'] for record in truth]) / pixel_size
  pred_px = true_px + np.arange(len(truth))  # The last image is the worst.
  write_run(str(tmp_path / 'run'), 0, 'cnn_263k', 'mse', filenames, true_px,
            pred_px, pixel_size)
  predictions = cv_table.pool_predictions([str(tmp_path / 'run')])
  path = figures.worst_cases(predictions, str(tmp_path / 'worst.png'),
                           hc18_dir=str(tmp_path / 'hc18'), num_cases=4)
  assert path == str(tmp_path / 'worst.png') and _is_png(path)
  # The run's config names a missing HC18 copy: no scans, no figure.
  assert figures.worst_cases(predictions, str(tmp_path / 'none.png')) is None
  assert not (tmp_path / 'none.png').exists()


def test_images_dir_follows_the_run_config(tmp_path):
  workdir = tmp_path / 'run'
  write_run(str(workdir), 0, 'cnn_263k', 'mse', [], [], [], [],
            finished=False)
  assert figures.images_dir(str(workdir)) is None  # Its hc18_dir is missing.
  assert figures.images_dir(str(workdir), '/given') == '/given'
  (workdir / 'config.json').write_text('{"data": {"source": "synthetic"}}')
  os.makedirs(workdir / 'data' / 'hc18_synthetic')
  assert figures.images_dir(str(workdir)) == str(
      workdir / 'data' / 'hc18_synthetic')


def test_learning_curves_without_epochs_is_an_error(tmp_path):
  with pytest.raises(ValueError, match='no epochs'):
    figures.learning_curves([str(tmp_path)], str(tmp_path / 'x.png'))


def test_command_line_plots_the_best_config_of_a_grid(tmp_path, capsys):
  fake_grid(str(tmp_path / 'grid'))
  out = tmp_path / 'figures'
  assert plots.main([f'--root={tmp_path / "grid"}', f'--out={out}']) == 0
  printed = capsys.readouterr().out
  # 'good' is the best complete config; its scans are not in the test's data.
  assert sorted(os.listdir(out)) == [
      'good_bland_altman.png', 'good_error_by_trimester.png',
      'good_learning_curves.png', 'good_scatter.png']
  assert 'worst cases skipped' in printed
  assert all(_is_png(out / name) for name in os.listdir(out))
  assert plots.main([f'--root={tmp_path / "grid"}', f'--out={out}',
                     '--config=all']) == 0
  assert len(os.listdir(out)) == 12


def test_command_line_takes_a_single_run(tmp_path, capsys):
  fake_grid(str(tmp_path / 'grid'))
  run = tmp_path / 'grid' / 'worse' / 'fold3'
  assert plots.main([f'--root={run}', f'--out={tmp_path / "out"}']) == 0
  assert len(capsys.readouterr().out.splitlines()) == 5  # 4 paths + the note.
  assert sorted(os.listdir(tmp_path / 'out'))[0] == 'fold3_bland_altman.png'


def test_command_line_errors_are_one_line(tmp_path, capsys):
  assert plots.main([f'--root={tmp_path / "nope"}', '--out=x']) == 2
  assert capsys.readouterr().err.strip() == (
      f'error: {tmp_path / "nope"} does not exist')
  fake_grid(str(tmp_path / 'grid'))
  assert plots.main([f'--root={tmp_path / "grid"}', f'--out={tmp_path}',
                     '--config=resnet_mse']) == 2
  assert 'no finished runs of config' in capsys.readouterr().err
