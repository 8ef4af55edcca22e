"""Tests of the cross-validation grid: running, resuming, pooling, the table."""

import csv
import json
import os
import re
import shlex
import sys

import numpy as np
import pytest
from scipy import stats

from conftest import REPO
from hc_jax import grid
from hc_jax import losses
from hc_jax import metrics
from hc_jax import workdir as workdir_lib
from hc_jax.evaluation import cv_table
from hc_jax.training import train

MSE_CONFIG = os.path.join(REPO, 'configs', 'cnn263k_mse.py')
MAE_CONFIG = os.path.join(REPO, 'configs', 'cnn263k_mae.py')
# Images per test fold, unequal so that pooling differs from a mean of folds.
FOLD_SIZES = (3, 5, 4, 7, 2)


def write_run(workdir, fold, model, loss, filenames, hc_px_true, hc_px_pred,
              pixel_size_mm, num_folds=5, finished=True, epochs=3):
  """Writes the files a run of hc_jax.training.train leaves, with given predictions."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'model': model, 'loss': loss, 'fold': fold,
               'num_folds': num_folds,
               'data': {'source': 'hc18', 'hc18_dir': '/no/such/dir'}}, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for epoch in range(1, epochs + 1):
      f.write(json.dumps({'epoch': epoch, 'step': 10 * epoch,
                          'train_loss': 1.0 / epoch,
                          'val_mae_mm': 20.0 / epoch + fold}) + '\n')
  if not finished:
    return
  metrics.write_predictions(
      os.path.join(workdir, workdir_lib.PREDICTIONS_FILE),
      metrics.prediction_rows(filenames, [0] * len(filenames), pixel_size_mm,
                              hc_px_true, hc_px_pred))
  with open(os.path.join(workdir, workdir_lib.RESULTS_FILE), 'w') as f:
    json.dump({'model': model, 'loss': loss, 'fold': fold,
               'selected_epoch': 2}, f)


def fake_grid(root, seed=0):
  """Three configs on the same images: 'good' and 'worse' with five folds,
  'partial' (lowest errors of all) with folds 0, 2 and 4 only.

  Returns:
    {config: (filenames, hc_px_true, hc_px_pred, pixel_size_mm)} of the
    images of the folds written, each array in filename order.
  """
  rng = np.random.default_rng(seed)
  num_images = sum(FOLD_SIZES)
  filenames = np.array([f'{i:03d}_HC.png' for i in range(num_images)])
  fold_of = np.repeat(np.arange(len(FOLD_SIZES)), FOLD_SIZES)
  # Rounded as predictions_test.csv stores them, so the files hold exactly
  # these numbers.
  true_px = np.round(rng.uniform(300, 1500, num_images), 3)
  pixel_size = rng.uniform(0.05, 0.25, num_images)
  noise = {'good': 20.0, 'worse': 45.0, 'partial': 5.0}
  written = {}
  for name, scale in noise.items():
    pred_px = np.round(true_px + rng.normal(0, scale, num_images), 3)
    folds = (0, 2, 4) if name == 'partial' else range(len(FOLD_SIZES))
    for fold in folds:
      keep = fold_of == fold
      write_run(os.path.join(root, name, f'fold{fold}'), fold, 'cnn_263k',
                name, filenames[keep], true_px[keep], pred_px[keep],
                pixel_size[keep])
    keep = np.isin(fold_of, folds)
    written[name] = (filenames[keep], true_px[keep], pred_px[keep],
                     pixel_size[keep])
  return written


def _rows_by_config(rows):
  return {row['config']: row for row in rows}


def test_grid_rows_pool_every_image_of_the_folds(tmp_path):
  written = fake_grid(str(tmp_path))
  rows = _rows_by_config(cv_table.grid_rows(str(tmp_path)))
  for name, (filenames, true_px, pred_px, pixel_size) in written.items():
    row = rows[name]
    abs_px = np.abs(pred_px - true_px)
    abs_mm = abs_px * pixel_size
    abs_pct = 100 * abs_px / true_px
    assert row['num_images'] == len(filenames)
    assert row['mae_px'] == pytest.approx(abs_px.mean(), rel=1e-9)
    assert row['mae_px_std'] == pytest.approx(abs_px.std(), rel=1e-9)
    assert row['mae_mm'] == pytest.approx(abs_mm.mean(), rel=1e-9)
    assert row['mae_mm_std'] == pytest.approx(abs_mm.std(), rel=1e-9)
    assert row['pmae'] == pytest.approx(abs_pct.mean(), rel=1e-9)
    assert row['pmae_std'] == pytest.approx(abs_pct.std(), rel=1e-9)
  # Pooled over images, not the mean of the fold means.
  _, true_px, pred_px, pixel_size = written['good']
  fold_of = np.repeat(np.arange(len(FOLD_SIZES)), FOLD_SIZES)
  abs_mm = np.abs(pred_px - true_px) * pixel_size
  fold_means = [abs_mm[fold_of == k].mean() for k in range(len(FOLD_SIZES))]
  assert abs(np.mean(fold_means) - rows['good']['mae_mm']) > 1e-3


def test_incomplete_rows_are_flagged_and_not_chosen_as_best(tmp_path):
  fake_grid(str(tmp_path))
  rows = _rows_by_config(cv_table.grid_rows(str(tmp_path)))
  assert rows['partial']['mae_mm'] < rows['good']['mae_mm']  # As designed.
  assert (rows['partial']['num_folds'], rows['partial']['folds'],
          rows['partial']['complete']) == (3, [0, 2, 4], False)
  assert rows['good']['complete'] and rows['worse']['complete']
  assert [name for name, row in rows.items() if row['best']] == ['good']
  cv_table.write_tables(list(rows.values()), str(tmp_path))
  table = (tmp_path / 'results.md').read_text()
  partial_line = next(line for line in table.splitlines()
                      if line.startswith('| partial'))
  assert 'incomplete: 3/5 folds' in partial_line
  good_line = next(line for line in table.splitlines()
                   if line.startswith('| good'))
  assert '| best |' in good_line and 'incomplete' not in good_line


def test_wilcoxon_against_the_best_matches_scipy(tmp_path):
  written = fake_grid(str(tmp_path))
  rows = _rows_by_config(cv_table.grid_rows(str(tmp_path)))

  def abs_mm(name):
    filenames, true_px, pred_px, pixel_size = written[name]
    return dict(zip(filenames, np.abs(pred_px - true_px) * pixel_size))

  best = abs_mm('good')
  for name in ('worse', 'partial'):
    other = abs_mm(name)
    shared = sorted(set(best) & set(other))
    expected = stats.wilcoxon([best[f] for f in shared],
                              [other[f] for f in shared]).pvalue
    assert rows[name]['wilcoxon_num_pairs'] == len(shared)
    assert rows[name]['wilcoxon_p'] == pytest.approx(expected, rel=1e-12)
  assert rows['partial']['wilcoxon_num_pairs'] == rows['partial']['num_images']
  assert rows['worse']['wilcoxon_p'] < 0.05  # Errors about twice as large.
  assert np.isnan(rows['good']['wilcoxon_p'])


def test_tables_are_written_and_printed(tmp_path, capsys):
  fake_grid(str(tmp_path))
  assert grid.main(['--root', str(tmp_path), '--aggregate_only']) == 0
  printed = capsys.readouterr().out
  assert '| Config |' in printed and 'results.md' in printed
  with open(tmp_path / 'results.csv', newline='') as f:
    table = {row['config']: row for row in csv.DictReader(f)}
  rows = _rows_by_config(cv_table.grid_rows(str(tmp_path)))
  assert set(table) == {'good', 'worse', 'partial'}
  for name, row in rows.items():
    assert float(table[name]['mae_mm']) == pytest.approx(row['mae_mm'])
    assert int(table[name]['num_images']) == row['num_images']
    assert table[name]['complete'] == str(row['complete'])
  assert table['partial']['folds'] == '0 2 4'


def test_an_image_in_two_test_folds_is_an_error(tmp_path):
  for fold in (0, 1):
    write_run(str(tmp_path / 'a' / f'fold{fold}'), fold, 'cnn_263k', 'mse',
              ['001_HC.png', f'00{fold + 2}_HC.png'], [500.0, 600.0],
              [510.0, 590.0], [0.1, 0.1])
  with pytest.raises(ValueError, match='001_HC.png in the test fold of more'):
    cv_table.grid_rows(str(tmp_path))


def test_grid_rows_of_an_empty_or_missing_root_is_an_error(tmp_path, capsys):
  with pytest.raises(ValueError, match='holds no'):
    cv_table.grid_rows(str(tmp_path))
  assert grid.main(['--root', str(tmp_path / 'nope'), '--aggregate_only']) == 2
  assert 'error: grid root' in capsys.readouterr().err


def _record_calls(monkeypatch, fail_folds=()):
  """Replaces training by a recorder that leaves a results.json per run."""
  calls = []

  def fake_train_and_evaluate(config, workdir):
    calls.append((config.model, config.loss, config.fold, config.num_epochs,
                  workdir))
    if config.fold in fail_folds:
      raise FloatingPointError('loss is nan at step 3 (epoch 1)')
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, workdir_lib.RESULTS_FILE), 'w') as f:
      json.dump({'fold': config.fold, 'planned_epochs': config.num_epochs}, f)
    return {}

  def fake_train_members(configs, workdirs):
    return [fake_train_and_evaluate(c, w) for c, w in zip(configs, workdirs)]

  monkeypatch.setattr(train, 'train_and_evaluate', fake_train_and_evaluate)
  monkeypatch.setattr(train, 'train_members', fake_train_members)
  return calls


def test_finished_runs_are_skipped_and_others_run(tmp_path, monkeypatch):
  calls = _record_calls(monkeypatch)
  root = str(tmp_path)
  os.makedirs(tmp_path / 'cnn263k_mse' / 'fold0')
  (tmp_path / 'cnn263k_mse' / 'fold0' / workdir_lib.RESULTS_FILE).write_text(
      '{"planned_epochs": 3}')
  os.makedirs(tmp_path / 'cnn263k_mse' / 'fold1')  # Unfinished: resumed.
  done = grid.run_grid([MSE_CONFIG, MAE_CONFIG], [0, 1], root,
                       overrides=['num_epochs=3'])
  workdir = lambda stem, fold: os.path.join(root, stem, f'fold{fold}')
  assert calls == [
      ('cnn_263k', 'mse', 1, 3, workdir('cnn263k_mse', 1)),
      ('cnn_263k', 'mae', 0, 3, workdir('cnn263k_mae', 0)),
      ('cnn_263k', 'mae', 1, 3, workdir('cnn263k_mae', 1))]
  assert done['skipped'] == [workdir('cnn263k_mse', 0)]
  assert len(done['trained']) == 3 and not done['failed']
  calls.clear()
  done = grid.run_grid([MSE_CONFIG, MAE_CONFIG], [0, 1], root,
                       overrides=['num_epochs=3'])
  assert not calls and len(done['skipped']) == 4


def test_a_nan_run_is_reported_and_the_grid_goes_on(tmp_path, monkeypatch):
  calls = _record_calls(monkeypatch, fail_folds=(0,))
  done = grid.run_grid([MSE_CONFIG], [0, 1], str(tmp_path))
  assert [call[2] for call in calls] == [0, 1]
  assert done['failed'] == [str(tmp_path / 'cnn263k_mse' / 'fold0')]
  assert done['trained'] == [str(tmp_path / 'cnn263k_mse' / 'fold1')]


def test_a_workdir_of_another_config_is_an_error(tmp_path, monkeypatch):
  calls = _record_calls(monkeypatch)
  workdir = tmp_path / 'cnn263k_mse' / 'fold0'
  os.makedirs(workdir)
  config = grid.load_config(MSE_CONFIG, ['num_epochs=5', 'fold=0'])
  (workdir / 'config.json').write_text(json.dumps(config.to_dict()))
  # Where the data is may change; what is trained may not.
  grid.run_grid([MSE_CONFIG], [0], str(tmp_path),
                ['num_epochs=5', 'data.cache_dir=/elsewhere'])
  assert len(calls) == 1
  with pytest.raises(ValueError, match='learning_rate=0.001 there, 0.01 now'):
    grid.run_grid([MSE_CONFIG], [0], str(tmp_path),
                  ['num_epochs=5', 'learning_rate=0.01'])
  assert len(calls) == 1


def test_more_epochs_extend_a_finished_run_as_main_does(tmp_path,
                                                        monkeypatch):
  calls = _record_calls(monkeypatch)
  grid.run_grid([MSE_CONFIG], [0], str(tmp_path), ['num_epochs=5'])
  done = grid.run_grid([MSE_CONFIG], [0], str(tmp_path), ['num_epochs=5'])
  assert len(calls) == 1 and len(done['skipped']) == 1
  done = grid.run_grid([MSE_CONFIG], [0], str(tmp_path), ['num_epochs=7'])
  assert [call[3] for call in calls] == [5, 7] and done['trained']


@pytest.mark.parametrize('change, refused', [
    ('num_epochs=7', None),  # Extends the run.
    ('checkpoint_every_seconds=5.0', None),
    ('data.cache_dir=/elsewhere', None),
    ('learning_rate=0.01', 'learning_rate=0.001 there, 0.01 now'),
    ('loss=mae', "loss='mse' there, 'mae' now"),
    ('augment.flip=False', 'augment.flip=True there, False now'),
])
def test_main_and_grid_accept_and_refuse_the_same_changes(
    tmp_path, monkeypatch, capsys, change, refused):
  """One resume rule: a field that may change is taken by both commands; a
  field that says what is trained is refused by both, in the same line."""
  # pylint: disable=import-outside-toplevel
  from hc_jax import main as main_lib
  from hc_jax.training import trainer
  started = []

  class FakeTrainer:

    def __init__(self, configs, workdirs):
      started.append(list(workdirs))
      self.num_members = len(configs)

    def run(self):
      return [{}] * self.num_members

  monkeypatch.setattr(trainer, 'Trainer', FakeTrainer)
  workdir = os.path.join(str(tmp_path), 'cnn263k_mse', 'fold0')
  os.makedirs(workdir)
  saved = grid.load_config(MSE_CONFIG, ['num_epochs=5', 'fold=0'])
  with open(os.path.join(workdir, workdir_lib.CONFIG_FILE), 'w') as f:
    json.dump(saved.to_dict(), f)
  overrides = ['num_epochs=5', 'tune_malloc=False', change]
  status = main_lib.main([f'--config={MSE_CONFIG}', f'--workdir={workdir}'] +
                         [f'--config.{override}' for override in overrides])
  main_lines = capsys.readouterr().err.strip().splitlines()
  try:
    grid.run_grid([MSE_CONFIG], [0], str(tmp_path), overrides)
    grid_error = None
  except ValueError as e:
    grid_error = str(e)
  if refused is None:
    assert status == 0 and grid_error is None, (main_lines, grid_error)
    assert started == [[workdir], [workdir]]
  else:
    assert status == 2 and not started
    assert refused in grid_error and '\n' not in grid_error, grid_error
    assert main_lines[-1] == f'error: {grid_error}'


@pytest.mark.parametrize('path, overrides, message', [
    ('configs/no_such.py', [], 'not found'),
    (MSE_CONFIG, ['num_epoch=3'], "did you mean 'num_epochs'"),
    (MSE_CONFIG, ['num_epochs=three'], 'invalid literal'),
    (MSE_CONFIG, ['num_epochs'], 'not KEY=VALUE'),
])
def test_bad_configs_and_overrides_are_one_clear_line(path, overrides, message):
  with pytest.raises(ValueError, match=message) as error:
    grid.load_config(path, overrides)
  assert '\n' not in str(error.value)


def test_overrides_are_parsed_by_field_type():
  config = grid.load_config(MAE_CONFIG, [
      'num_epochs=3', 'learning_rate=1e-4', 'augment.flip=false',
      'augment.scale_range=(0.9, 1.1)', 'data.cache_dir=/tmp/x'])
  assert (config.loss, config.num_epochs, config.learning_rate) == (
      'mae', 3, 1e-4)
  assert config.augment.flip is False
  assert tuple(config.augment.scale_range) == (0.9, 1.1)
  assert config.data.cache_dir == '/tmp/x'


def test_command_line_takes_both_override_forms(tmp_path, monkeypatch):
  calls = _record_calls(monkeypatch)
  status = grid.main([f'--configs={MSE_CONFIG}', '--folds=2',
                      f'--root={tmp_path}', '--override', 'num_epochs=4',
                      '--config.loss=huber'])
  assert calls == [('cnn_263k', 'huber', 2, 4,
                    str(tmp_path / 'cnn263k_mse' / 'fold2'))]
  # The fake run wrote no predictions, so the table has an empty row.
  assert status == 0
  with pytest.raises(SystemExit):
    grid.main([f'--root={tmp_path}'])  # --configs missing.


def _run_real_grid(phantom_hc18, root, config_paths, folds):
  hc18_dir, tfds_dir = phantom_hc18
  return grid.main([
      f'--configs={",".join(config_paths)}',
      f'--folds={",".join(map(str, folds))}', f'--root={root}',
      '--override', 'num_epochs=1', '--override', 'image_size=32',
      '--override', 'eval_batch_size=8',
      f'--config.data.hc18_dir={hc18_dir}',
      f'--config.data.cache_dir={tfds_dir}'])


def _check_pooled_against_fold_results(root, name, row, folds):
  """The pooled MAE is the image-weighted mean of the folds' own results."""
  results = []
  for fold in folds:
    with open(root / name / f'fold{fold}' / workdir_lib.RESULTS_FILE) as f:
      results.append(json.load(f))
  assert [r['fold'] for r in results] == list(folds)
  assert [r['loss'] for r in results] == [name.split('_')[1]] * len(folds)
  num_images = sum(r['test_num_images'] for r in results)
  assert row['num_images'] == num_images
  weighted = sum(r['test_mae_mm'] * r['test_num_images']
                 for r in results) / num_images
  assert row['mae_mm'] == pytest.approx(weighted, abs=1e-2)


def test_real_run_of_one_config_and_fold(phantom_hc18, tmp_path, capsys):
  root = tmp_path / 'grid'
  status = _run_real_grid(phantom_hc18, root, [MAE_CONFIG], [3])
  out, err = capsys.readouterr()
  assert status == 0, err
  assert 'starting: nothing to resume' in out  # Each run says what it does.
  (row,) = cv_table.grid_rows(str(root))
  assert (row['config'], row['num_folds'], row['folds']) == (
      'cnn263k_mae', 1, [3])
  _check_pooled_against_fold_results(root, 'cnn263k_mae', row, [3])
  # Run again: the finished run is skipped, the table is the same.
  status = _run_real_grid(phantom_hc18, root, [MAE_CONFIG], [3])
  assert status == 0 and 'finished, skipped' in capsys.readouterr().out
  assert cv_table.grid_rows(str(root))[0]['mae_mm'] == row['mae_mm']


@pytest.mark.slow  # About 40 s on two free CPU cores, 70 s on busy ones.
def test_real_grid_of_two_configs_and_two_folds(phantom_hc18, tmp_path, capsys):
  root = tmp_path / 'grid'
  status = _run_real_grid(phantom_hc18, root, [MSE_CONFIG, MAE_CONFIG], [0, 1])
  assert status == 0, capsys.readouterr().err
  rows = _rows_by_config(cv_table.grid_rows(str(root)))
  assert set(rows) == {'cnn263k_mse', 'cnn263k_mae'}
  for name, row in rows.items():
    assert (row['num_folds'], row['complete']) == (2, False)
    _check_pooled_against_fold_results(root, name, row, (0, 1))
  assert sum(row['best'] for row in rows.values()) == 1
  assert (root / 'results.md').read_text().count('incomplete: 2/5 folds') == 2


def _readme_loss_module_and_grid_command():
  with open(os.path.join(REPO, 'README.md')) as f:
    section = f.read().split('## Losses of your own', 1)[1].split('\n## ')[0]
  module = re.findall(r'```python\n(.*?)```', section, re.S)[0]
  command = re.findall(r'```bash\n(.*?)\n```', section, re.S)[0]
  return module, command


def test_the_readmes_loss_module_trains_through_the_grid(
    phantom_hc18, tmp_path, monkeypatch):
  monkeypatch.setattr(losses, 'LOSSES', dict(losses.LOSSES))
  monkeypatch.setattr(losses, 'CONFIG_SETTINGS', dict(losses.CONFIG_SETTINGS))
  monkeypatch.setitem(sys.modules, 'my_losses', None)  # Removed after.
  module, command = _readme_loss_module_and_grid_command()
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'my_losses.py').write_text(module)
  argv = shlex.split(command)
  assert argv[:3] == ['python', '-m', 'hc_jax.grid']
  # The README's command as printed, then (the last flag wins) one fold of
  # the phantom copy, shrunk to seconds.
  hc18_dir, tfds_dir = phantom_hc18
  root = tmp_path / 'grid'
  status = grid.main(
      [arg.replace('=configs/', f'={REPO}/configs/') for arg in argv[3:]] +
      ['--folds=3', f'--root={root}', '--config.num_epochs=1',
       '--config.image_size=32', '--config.eval_batch_size=8',
       f'--config.data.hc18_dir={hc18_dir}',
       f'--config.data.cache_dir={tfds_dir}'])
  assert status == 0
  log_cosh = losses.get_loss('log_cosh')
  residuals = np.array([-30.0, -1.0, 0.0, 0.5, 40.0])
  np.testing.assert_allclose(log_cosh(residuals, 0.0),
                             np.mean(np.log(np.cosh(residuals))), rtol=1e-5)
  with open(root / 'cnn263k_mse' / 'fold3' / workdir_lib.RESULTS_FILE) as f:
    assert json.load(f)['loss'] == 'log_cosh'
  (row,) = cv_table.grid_rows(str(root))
  assert row['folds'] == [3] and np.isfinite(row['mae_mm'])


def test_a_missing_losses_module_is_one_line(tmp_path, capsys):
  status = grid.main([f'--configs={MSE_CONFIG}', '--folds=0',
                      f'--root={tmp_path}', '--losses_module=no_such.py',
                      '--config.loss=log_cosh'])
  assert status == 2
  assert capsys.readouterr().err == (
      'error: losses module no_such.py: no such file\n')


def test_seeds_repeat_every_run_in_its_own_directory(tmp_path):
  runs = grid.plan([MSE_CONFIG], [0, 2], str(tmp_path), seeds=[1, 2])
  assert [(config.seed, config.fold) for config, _ in runs] == [
      (1, 0), (1, 2), (2, 0), (2, 2)]
  assert [os.path.relpath(workdir, tmp_path) for _, workdir in runs] == [
      os.path.join('cnn263k_mse_seed1', 'fold0'),
      os.path.join('cnn263k_mse_seed1', 'fold2'),
      os.path.join('cnn263k_mse_seed2', 'fold0'),
      os.path.join('cnn263k_mse_seed2', 'fold2')]
  assert len(grid.stack_groups(runs)) == 1  # Seeds and folds stack.
  with pytest.raises(SystemExit) as exit_info:
    grid.main(['--configs', MSE_CONFIG, '--root', str(tmp_path),
               '--seeds', 'x'])
  assert exit_info.value.code == 2


def test_help_shows_the_one_config_override_spelling(capsys):
  with pytest.raises(SystemExit):
    grid.main(['--help'])
  text = capsys.readouterr().out
  assert '--config.KEY=VALUE' in text and '--override' not in text
