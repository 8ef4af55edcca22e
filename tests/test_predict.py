"""Tests for hc_jax.predict (with hc_jax.evaluation.inference, hc_jax.workdir and
hc_jax.evaluation.scan_files behind it) and hc_jax.evaluation.gestational_age.

Loading, restoring and preprocessing are tested on tiny trained runs; the
command line's statuses, exit codes and bad-input handling on a stub model
whose predictions are set by the test (`_stub`), so they are exact and fast.
"""

import builtins
import csv
import errno
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
from PIL import Image
import pytest
from scipy import optimize

from conftest import REPO
from hc_jax import predict
from hc_jax import workdir as workdir_lib
from hc_jax.data import cache as cache_lib
from hc_jax.data import ellipse as ellipse_lib
from hc_jax.data import hc18
from hc_jax.data import normalise
from hc_jax.data import phantom
from hc_jax.evaluation import gestational_age
from hc_jax.evaluation import inference
from hc_jax.evaluation import loading
from hc_jax.evaluation import output_files
from hc_jax.evaluation import prediction_rows
from hc_jax.evaluation import scan_files
from hc_jax.nets import ellipse_head
from hc_jax.training import train


@pytest.fixture(scope='module')
def grid(phantom_hc18, tmp_path_factory):
  """Two finished tiny runs of one config, seeds 0 and 1: grid/fold{0,1}.

  Built like conftest's `tiny_config` (function-scoped, so not usable here),
  with one epoch; trained as two members of one step (one compilation; a
  member's results do not depend on the others, tests/test_train.py).
  """
  from configs import default  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('grid')
  configs = []
  for seed in (0, 1):
    config = default.get_config()
    config.data.hc18_dir, config.data.cache_dir = phantom_hc18
    config.image_size = 32
    config.num_epochs = 1
    config.batch_size = 8
    config.eval_batch_size = 8
    config.seed = seed
    configs.append(config)
  train.train_members(configs, [str(root / f'fold{seed}') for seed in (0, 1)])
  return str(root)


@pytest.fixture(scope='module')
def run(grid):
  return os.path.join(grid, 'fold0')


def _read_rows(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _test_fold(run_dir, hc18_dir):
  """(images, pixel sizes, training's hc_mm_pred) of a run's test fold."""
  rows = _read_rows(os.path.join(run_dir, workdir_lib.PREDICTIONS_FILE))
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


def test_a_relative_workdir_works(run, phantom_hc18, monkeypatch):
  """As in the README: --workdir=runs/<name> relative to the shell."""
  images, pixel_sizes, hc_mm_train = _test_fold(run, phantom_hc18[0])
  monkeypatch.chdir(os.path.dirname(os.path.dirname(run)))
  relative = os.path.relpath(run)
  assert not os.path.isabs(relative)
  out = predict.load(relative)(images, pixel_sizes)
  np.testing.assert_allclose(out['hc_mm'], hc_mm_train, atol=1e-3)


def test_cli_on_a_trained_run(run, phantom_hc18, tmp_path, capsys):
  """The command line end to end with a real model: rows agree with `load`."""
  test_dir, good = _copy_test_set(phantom_hc18, tmp_path)
  out = tmp_path / 'predictions.csv'
  code = predict.main([f'--workdir={run}', f'--images={test_dir}',
                       f'--out={out}'])
  rows = _read_rows(out)
  assert [row['filename'] for row in rows] == good
  sizes = {r['filename']: float(r['pixel size(mm)']) for r in _read_rows(
      tmp_path / 'test_set_pixel_size.csv')}
  images = [hc18.read_grayscale(str(test_dir / name))[0] for name in good]
  expected = predict.load(run)(images, [sizes[n] for n in good])
  for i, row in enumerate(rows):
    assert row['status'] == expected['status'][i]
    assert float(row['hc_px']) == pytest.approx(expected['hc_px'][i], abs=2e-3)
    assert float(row['pixel_size_mm']) == sizes[row['filename']]
    assert (row['ga_weeks'] == '') == (row['status'] == 'implausible')
  flagged = sum(row['status'] != 'ok' for row in rows)
  assert code == (1 if flagged else 0)
  assert (f'{len(rows) - flagged} of {len(rows)} images predicted'
          in capsys.readouterr().out)


def test_the_csv_names_the_model_of_a_workdir(run, grid, phantom_hc18,
                                              tmp_path):
  """A run or a fold ensemble: the model of its config and the base name
  of the folder given; the submission keeps HC18's columns."""
  test_dir, good = _copy_test_set(phantom_hc18, tmp_path)
  with open(os.path.join(run, workdir_lib.CONFIG_FILE)) as f:
    model = json.load(f)['model']
  for workdir, name in ((run, f'{model} (fold0)'),
                        (grid, f'{model} ({os.path.basename(grid)})')):
    out = tmp_path / 'p.csv'
    predict.main([f'--workdir={workdir}', f'--images={test_dir / good[0]}',
                  f'--out={out}'])
    rows = _read_rows(out)
    assert [row['model'] for row in rows] == [name], rows
  assert rows[0]['filename'] == good[0]
  assert predict.load(run).name == f'{model} (fold0)'


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
                       f'--out={csv_path}', '--tta-flip',
                       '--max-sd-mm=0']) == 1
  rows = _read_rows(csv_path)
  assert len(rows) == len(good)
  assert all(float(row['hc_mm_sd']) > 0 for row in rows)
  # Every plausible row is uncertain: the runs disagree by more than 0 mm.
  assert {row['status'] for row in rows} <= {'uncertain', 'implausible'}
  assert 'uncertain' in {row['status'] for row in rows}


def test_non_square_input_predicts_as_the_trainer_evaluates(
    tiny_config, phantom_hc18, tmp_path):
  """A run on 32 rows x 48 columns: scans are prepared as for training
  (resize, uint8, z-score) and get the trainer's own test predictions."""
  hc18_dir, cache_dir = phantom_hc18
  tiny_config.image_width = 48
  tiny_config.num_epochs = 1
  workdir = str(tmp_path / 'wide')
  train.train_and_evaluate(tiny_config, workdir)
  predictor = predict.load(workdir)
  assert predictor.input_shape == (32, 48)
  # The prepared (resized, uint8) training images, z-scored as the trainer
  # does, are what predict makes of the PNGs.
  arrays, _ = cache_lib.prepare(hc18_dir, (32, 48), 'stretch', cache_dir)
  scans = [hc18.read_grayscale(os.path.join(hc18_dir, 'training_set', name))[0]
           for name in arrays['filename'][:8]]
  np.testing.assert_allclose(
      np.stack([predictor.preprocess(scan) for scan in scans]),
      normalise.zscore_batch(arrays['images'][:8]), atol=1e-5)
  # The test fold: the trainer's evaluation (rounded to 0.001 mm) again.
  images, pixel_sizes, hc_mm_train = _test_fold(workdir, hc18_dir)
  out = predictor(images, pixel_sizes)
  np.testing.assert_allclose(out['hc_mm'], hc_mm_train, rtol=1e-4, atol=6e-4)
  assert set(out['status']) <= {'ok', 'implausible'}

  # The command line, with scans just above and below the 48x32 input.
  scan_dir = tmp_path / 'scans'
  scan_dir.mkdir()
  for name, image in zip(('a.png', 'b.png'), images):
    Image.fromarray(image).save(scan_dir / name)
  for name, (width, height) in (('fits.png', (48, 32)),
                                ('narrow.png', (47, 100)),
                                ('low.png', (100, 31))):
    Image.fromarray(_scan(width, height)).save(scan_dir / name)
  csv_path = tmp_path / 'p.csv'
  predict.main([f'--workdir={workdir}', f'--images={scan_dir}',
                f'--out={csv_path}'])
  rows = {row['filename']: row for row in _read_rows(csv_path)}
  assert sorted(rows) == ['a.png', 'b.png', 'fits.png', 'low.png',
                          'narrow.png']
  for i, name in enumerate(('a.png', 'b.png')):
    assert rows[name]['status'] == out['status'][i]
    assert float(rows[name]['hc_px']) == pytest.approx(out['hc_px'][i],
                                                       abs=1e-3)
  assert rows['fits.png']['status'] != 'refused'
  for name, size in (('narrow.png', '47x100'), ('low.png', '100x31')):
    assert rows[name]['status'] == 'refused', rows[name]
    assert (f'image is {size} px, smaller than the model input 48x32'
            in rows[name]['message'])


def test_older_config_without_image_width_is_square(run, phantom_hc18,
                                                     tmp_path):
  images, pixel_sizes, _ = _test_fold(run, phantom_hc18[0])
  expected = predict.load(run)(images, pixel_sizes)['hc_mm']
  copy = _copy_run(run, tmp_path)
  with open(copy / 'config.json') as f:
    config = json.load(f)
  for key in ('image_width', 'source_digest', 'layers_resolved'):
    config.pop(key, None)
  with open(copy / 'config.json', 'w') as f:
    json.dump(config, f)
  predictor = predict.load(str(copy))
  assert predictor.input_shape == (32, 32)
  np.testing.assert_allclose(predictor(images, pixel_sizes)['hc_mm'],
                             expected, rtol=1e-6)


def test_unfinished_or_mismatched_runs_are_clear_errors(run, tmp_path, capsys):
  unfinished = tmp_path / 'unfinished'
  unfinished.mkdir()
  shutil.copy(os.path.join(run, 'config.json'), unfinished)
  with pytest.raises(workdir_lib.PredictError, match='has no results.json: '
                     'training did not finish'):
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
  with pytest.raises(workdir_lib.PredictError, match='image_size=64'):
    predict.load(str(mixed))
  # An older run's config.json has no image_width: a square input (0).
  for name, image_width in (('a', None), ('b', 48)):
    with open(os.path.join(run, 'config.json')) as f:
      config = json.load(f)
    config.pop('image_width', None)
    if image_width:
      config['image_width'] = image_width
    with open(mixed / name / 'config.json', 'w') as f:
      json.dump(config, f)
  with pytest.raises(workdir_lib.PredictError, match='image_width=48 but .* has 0'):
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
  out = inference.parallel_map(fn, range(7))
  assert [o if not isinstance(o, Exception) else str(o) for o in out] == [
      0, 1, 4, 'three', 16, 25, 36]
  assert inference.parallel_map(fn, []) == []


# --- Checkpoints: only params and batch statistics are read. ---


def _copy_run(run, root):
  copy = root / 'run'
  shutil.copytree(run, copy)
  return copy


def _state_files(run_dir):
  best = os.path.join(workdir_lib.best_checkpoint(str(run_dir)), 'state')
  return [os.path.join(folder, name) for folder, _, names in os.walk(best)
          for name in names]


def test_restore_reads_only_params_and_batch_stats(run, phantom_hc18,
                                                   tmp_path):
  """A best checkpoint whose optimiser state (and other fields) would not fit
  the optimiser of today's config still loads, with the same predictions."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  images, pixel_sizes, _ = _test_fold(run, phantom_hc18[0])
  expected = predict.load(run)(images, pixel_sizes)['hc_mm']
  variables = predict.load(run)._variables[0]  # pylint: disable=protected-access
  copy = _copy_run(run, tmp_path)
  shutil.rmtree(copy / 'checkpoints' / 'best')
  state = {'step': np.int32(7), 'params': variables['params'],
           'batch_stats': variables['batch_stats'],
           'opt_state': {'nu': np.zeros(3, np.float32)},  # Another optimiser.
           'ema_params': {'w': np.ones(2, np.float32)}}   # An extra field.
  manager = ocp.CheckpointManager(str(copy / 'checkpoints' / 'best'))
  manager.save(3, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      progress=ocp.args.JsonSave({'epoch': 3})))
  manager.wait_until_finished()
  manager.close()
  from hc_jax.training import manifest  # pylint: disable=import-outside-toplevel
  # As hc_jax saves it: a manifest makes the checkpoint verifiable.
  manifest.write(str(copy / 'checkpoints' / 'best' / '3'))
  out = predict.load(str(copy))(images, pixel_sizes)
  np.testing.assert_allclose(out['hc_mm'], expected, rtol=1e-6)


@pytest.mark.parametrize('keep_manifest', [True, False])
def test_truncated_checkpoint_is_a_clear_error(run, tmp_path, keep_manifest):
  copy = _copy_run(run, tmp_path)
  biggest = max(_state_files(copy), key=os.path.getsize)
  with open(biggest, 'rb') as f:
    data = f.read()
  with open(biggest, 'wb') as f:
    f.write(data[:len(data) // 2])
  if not keep_manifest:  # Left to orbax's own checks.
    for manifest in (copy / 'checkpoints' / 'best').rglob('*manifest*'):
      manifest.unlink()
  with pytest.raises(workdir_lib.PredictError, match='checkpoint'):
    predict.load(str(copy))
  Image.fromarray(_scan(64, 48)).save(tmp_path / 'a.png')
  result = subprocess.run(
      [sys.executable, '-m', 'hc_jax.predict', f'--workdir={copy}',
       f'--images={tmp_path / "a.png"}', f'--out={tmp_path / "p.csv"}'],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and str(copy) in errors[0], result.stderr
  assert not (tmp_path / 'p.csv').exists()


def test_late_closed_event_loop_errors_are_dropped():
  """Only the command line's one-line error is printed for a damaged
  checkpoint, not tensorstore's late reports from orbax's closed loop."""
  seen = []
  from hc_jax import cli  # pylint: disable=import-outside-toplevel
  hook = cli.quiet_closed_event_loop(seen.append)
  for error in (RuntimeError('Event loop is closed'), RuntimeError('other'),
                ValueError('Event loop is closed')):
    hook(types.SimpleNamespace(exc_type=type(error), exc_value=error,
                               exc_traceback=None, err_msg=None, object=None))
  assert [str(u.exc_value) for u in seen] == ['other', 'Event loop is closed']


def test_missing_checkpoint_and_broken_results(run, tmp_path):
  copy = _copy_run(run, tmp_path)
  (copy / 'results.json').write_text('{"normaliser_px": ')
  with pytest.raises(workdir_lib.PredictError, match='results.json'):
    predict.load(str(copy))
  shutil.copy(os.path.join(run, 'results.json'), copy)
  shutil.rmtree(copy / 'checkpoints')
  with pytest.raises(workdir_lib.PredictError, match='no best checkpoint'):
    predict.load(str(copy))


# --- The command line on a stub model: statuses, exit codes, bad input. ---


class _Prepared:
  def __init__(self, array):
    self._array = array

  def numpy(self):
    return self._array


def _stub(member_scales=(1.0,), image_size=32, train_hc_mm=None,
          train_hc_px=None):
  """A Predictor whose HC in px is 10x the scan's top-left pixel, times each
  member's scale (so an ensemble's runs disagree as the test sets)."""
  def prepare(image):
    prepared = np.zeros([image_size, image_size, 1], np.float32)
    prepared[0, 0, 0] = image.numpy()[0, 0, 0] if hasattr(
        image, 'numpy') else image[0, 0, 0]
    return _Prepared(prepared)

  def forward(scale, batch):
    return {'value': batch[:, 0, 0, 0] * scale}

  return inference.Predictor(
      runs=[f'run{i}' for i in range(len(member_scales))],
      image_size=image_size, resize_mode='stretch',
      normalisers_px=[10.0] * len(member_scales),
      _variables=list(member_scales), _forward=forward, _prepare=prepare,
      train_hc_mm=train_hc_mm, train_hc_px=train_hc_px)


def _phantom(width, height, seed=0):
  """A phantom scan (fan, speckle, a head): scan-like, not refused."""
  return phantom.render_scan(np.random.default_rng(seed), height, width,
                             0.5 * width, 0.5 * height, 0.3 * height,
                             0.25 * height, 0.4)


def _scan(width, height, hc_px=1000.0, seed=0):
  """A phantom scan for which the stub predicts `hc_px` (a multiple of 10)."""
  scan = _phantom(width, height, seed)
  scan[0, 0] = int(hc_px // 10)
  return scan


@pytest.fixture
def stub_cli(monkeypatch, tmp_path):
  """Runs predict.main with `load` returning a stub; returns (code, rows)."""
  predictor = {'value': _stub()}
  monkeypatch.setattr(predict, 'load', lambda workdir: predictor['value'])
  workdir = tmp_path / 'workdir'
  workdir.mkdir()

  def run_cli(*flags, stub=None):
    if stub is not None:
      predictor['value'] = stub
    out = tmp_path / 'p.csv'
    if out.exists():
      out.unlink()
    code = predict.main([f'--workdir={workdir}', f'--out={out}', *flags])
    rows = {r['filename']: r for r in _read_rows(out)} if out.exists() else None
    return code, rows
  return run_cli


def test_impossible_hc_is_implausible_not_ok(stub_cli, tmp_path, capsys):
  scans = tmp_path / 'scans'
  scans.mkdir()
  for name, hc_px in (('good.png', 1000), ('tiny.png', 30),
                      ('huge.png', 2550)):
    Image.fromarray(_scan(800, 540, hc_px)).save(scans / name)
  with open(tmp_path / 'sizes.csv', 'w') as f:
    f.write('filename,pixel size(mm)\ngood.png,0.15\ntiny.png,1.0\n'
            'huge.png,0.5\n')
  code, rows = stub_cli(f'--images={scans}',
                        f'--pixel-sizes={tmp_path / "sizes.csv"}')
  assert code == 1
  assert rows['good.png']['status'] == 'ok'
  assert float(rows['good.png']['hc_mm']) == pytest.approx(150.0)
  assert rows['good.png']['ga_weeks'] and rows['good.png']['message'] == ''
  # 30 px is less than a tenth of the short side; 2550 px * 0.5 mm = 1275 mm.
  for name in ('tiny.png', 'huge.png'):
    assert rows[name]['status'] == 'implausible', rows[name]
    assert 'outside the plausible' in rows[name]['message']
    assert rows[name]['ga_weeks'] == rows[name]['ga_flag'] == ''
  assert '1 of 3 images predicted' in capsys.readouterr().out
  # Without a pixel size, the px range alone applies.
  code, rows = stub_cli(f'--images={scans / "tiny.png"}')
  assert code == 1 and rows['tiny.png']['status'] == 'implausible'


def test_training_range_applies_where_recorded(stub_cli, tmp_path):
  Image.fromarray(_scan(800, 540, 1000)).save(tmp_path / 'a.png')
  (tmp_path / 's.csv').write_text('filename,pixel size(mm)\na.png,0.15\n')
  flags = (f'--images={tmp_path / "a.png"}', f'--pixel-sizes={tmp_path / "s.csv"}')
  # 150 mm: plausible for HC18, but the model only saw 200-300 mm heads.
  code, rows = stub_cli(*flags, stub=_stub(train_hc_mm=(200.0, 300.0),
                                           train_hc_px=(500.0, 2000.0)))
  assert code == 1 and rows['a.png']['status'] == 'implausible'
  assert '182-330 mm' in rows['a.png']['message']  # Widened by 10%.
  code, rows = stub_cli(*flags, stub=_stub(train_hc_mm=(100.0, 300.0),
                                           train_hc_px=(1200.0, 2000.0)))
  assert rows['a.png']['status'] == 'implausible' and 'px' in (
      rows['a.png']['message'])
  code, rows = stub_cli(*flags, stub=_stub(train_hc_mm=(100.0, 300.0),
                                           train_hc_px=(500.0, 2000.0)))
  assert code == 0 and rows['a.png']['status'] == 'ok'


def test_training_ranges_from_results():
  keys = workdir_lib.TRAIN_RANGE_KEYS
  results = [dict(zip(keys, (50, 300, 400, 1500))),
             dict(zip(keys, (45, 320, 380, 1400)))]
  assert workdir_lib.training_ranges(results) == ((45, 320), (380, 1500))
  assert workdir_lib.training_ranges(results + [{}]) == (None, None)


def test_disagreeing_ensemble_is_uncertain(stub_cli, tmp_path, capsys):
  Image.fromarray(_scan(800, 540, 1000)).save(tmp_path / 'a.png')
  (tmp_path / 's.csv').write_text('filename,pixel size(mm)\na.png,0.15\n')
  flags = (f'--images={tmp_path / "a.png"}', f'--pixel-sizes={tmp_path / "s.csv"}')
  # Members at 150 and 165 mm: SD 10.6 mm.
  code, rows = stub_cli(*flags, stub=_stub(member_scales=(1.0, 1.1)))
  assert code == 1 and rows['a.png']['status'] == 'uncertain'
  assert float(rows['a.png']['hc_mm_sd']) == pytest.approx(10.607, abs=1e-3)
  assert rows['a.png']['ga_weeks']  # Still estimated, but flagged.
  assert 'uncertain: a.png' in capsys.readouterr().out
  code, rows = stub_cli(*flags, '--max-sd-mm=11')
  assert code == 0 and rows['a.png']['status'] == 'ok'
  code, rows = stub_cli(*flags, '--max-sd-mm=nan')
  assert code == 2 and rows is None


def test_non_scans_are_refused(stub_cli, tmp_path):
  scans = tmp_path / 'scans'
  scans.mkdir()
  Image.fromarray(np.full([540, 800], 128, np.uint8)).save(scans / 'flat.png')
  Image.fromarray(np.full([1, 1], 200, np.uint8)).save(scans / 'dot.png')
  Image.fromarray(_scan(20, 100)).save(scans / 'narrow.png')
  nearly = np.zeros([540, 800], np.uint8)
  nearly[0, :3] = 255
  Image.fromarray(nearly).save(scans / 'nearly.png')
  Image.fromarray(_scan(800, 540)).save(scans / 'scan.png')
  code, rows = stub_cli(f'--images={scans}')
  assert code == 1
  assert rows['scan.png']['status'] == 'ok'
  for name, reason in (('flat.png', 'constant image'),
                       ('dot.png', 'smaller than the model input'),
                       ('narrow.png', 'smaller than the model input'),
                       ('nearly.png', 'nearly constant image')):
    assert rows[name]['status'] == 'refused', rows[name]
    assert reason in rows[name]['message']
    assert rows[name]['hc_px'] == rows[name]['ga_weeks'] == ''


def test_bad_files_are_errors_that_say_what_they_are(stub_cli, tmp_path,
                                                     monkeypatch, capsys):
  scans = tmp_path / 'scans'
  scans.mkdir()
  scan = _scan(800, 540)
  Image.fromarray(scan).save(scans / 'good.png')
  (scans / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not a png')
  Image.fromarray(scan.astype(np.uint16) * 256).save(scans / '16bit.png')
  os.symlink('loop_b.png', scans / 'loop_a.png')
  os.symlink('loop_a.png', scans / 'loop_b.png')
  os.symlink('nowhere.png', scans / 'dangling.png')
  Image.fromarray(scan).save(scans / 'locked.png')
  real_open = builtins.open

  def locked_open(file, *args, **kwargs):  # Tests run as root, too.
    if str(file).endswith('locked.png'):
      raise PermissionError(errno.EACCES, 'Permission denied', str(file))
    return real_open(file, *args, **kwargs)
  monkeypatch.setattr(builtins, 'open', locked_open)
  code, rows = stub_cli(f'--images={scans}')
  assert code == 1
  assert rows['good.png']['status'] == 'ok'
  for name, message in (('corrupt.png', 'corrupt'), ('16bit.png', '16-bit'),
                        ('loop_a.png', 'symbolic link loop'),
                        ('loop_b.png', 'symbolic link loop'),
                        ('dangling.png', 'broken symbolic link'),
                        ('locked.png', 'permission denied')):
    assert rows[name]['status'] == 'error', rows[name]
    assert message in rows[name]['message'], rows[name]
    assert rows[name]['hc_px'] == ''
  summary = capsys.readouterr().out
  assert '1 of 7 images predicted, 6 failed or flagged' in summary
  assert 'error: loop_a.png: symbolic link loop' in summary


def test_rows_and_overlays_keyed_by_relative_path(stub_cli, tmp_path):
  scans = tmp_path / 'scans'
  for folder, hc_px in (('a', 1000), ('b', 1200)):
    (scans / folder).mkdir(parents=True)
    Image.fromarray(_scan(800, 540, hc_px)).save(scans / folder / '001_HC.png')
  overlays = tmp_path / 'overlays'
  code, rows = stub_cli(f'--images={scans}', f'--overlays={overlays}')
  assert code == 0
  assert float(rows['a/001_HC.png']['hc_px']) == 1000
  assert float(rows['b/001_HC.png']['hc_px']) == 1200
  assert (overlays / 'a' / '001_HC_prediction.png').is_file()
  assert (overlays / 'b' / '001_HC_prediction.png').is_file()
  # Two --images directories: keyed from their common parent.
  code, rows = stub_cli(f'--images={scans / "a"},{scans / "b"}')
  assert sorted(rows) == ['a/001_HC.png', 'b/001_HC.png']
  # A second run does not take the overlays it wrote for scans.
  shutil.copytree(overlays, scans / 'overlays')
  code, rows = stub_cli(f'--images={scans}')
  assert sorted(rows) == ['a/001_HC.png', 'b/001_HC.png']


def test_overlay_one_png_per_scan_of_its_size(stub_cli, tmp_path):
  scans = tmp_path / 'scans'
  scans.mkdir()
  Image.fromarray(_scan(800, 540, 1000)).save(scans / 'x.png')
  Image.fromarray(_scan(64, 48, 100)).save(scans / 'y.png')
  (scans / 's.csv').write_text('filename,pixel size(mm)\nx.png,0.15\ny.png,2\n')
  overlays = tmp_path / 'overlays'
  code, rows = stub_cli(f'--images={scans}', f'--overlays={overlays}',
                        f'--pixel-sizes={scans / "s.csv"}')
  assert code == 0, rows
  for name in ('x', 'y'):
    scan = Image.open(scans / f'{name}.png')
    overlay = Image.open(overlays / f'{name}{scan_files.OVERLAY_SUFFIX}')
    assert overlay.size == scan.size
  drawn = np.asarray(Image.open(overlays / 'x_prediction.png').convert('L'),
                     np.int16)
  original = np.asarray(Image.open(scans / 'x.png'), np.int16)
  assert (drawn[:20, :60] != original[:20, :60]).any()
  assert (drawn[-20:, -60:] == original[-20:, -60:]).all()


def test_overlays_name_the_model_in_their_caption(stub_cli, tmp_path,
                                                  monkeypatch):
  scans = tmp_path / 'scans'
  scans.mkdir()
  Image.fromarray(_scan(400, 300, 1000)).save(scans / 'x.png')
  drawn_lines = []
  draw = output_files.write_overlay
  monkeypatch.setattr(output_files, 'write_overlay', lambda image, lines,
                      *a, **k: (drawn_lines.append(lines),
                                draw(image, lines, *a, **k)))
  overlays = {}
  for name in ('', 'cnn_263k (fold0)', 'hcnet_mask (cv_grid)'):
    stub = _stub()
    stub.name = name
    folder = tmp_path / f'overlays{len(overlays)}'
    code, rows = stub_cli(f'--images={scans}', f'--overlays={folder}',
                          stub=stub)
    assert code == 0, rows
    assert rows['x.png']['model'] == name
    overlays[name] = np.asarray(Image.open(folder / 'x_prediction.png'))
  assert [lines[-1] for lines in drawn_lines] == [
      'HC 1000.0 px (pixel size unknown)', 'model: cnn_263k (fold0)',
      'model: hcnet_mask (cv_grid)']
  # The name is drawn: the captions differ, in the caption's corner only.
  unnamed = overlays['']
  for name in ('cnn_263k (fold0)', 'hcnet_mask (cv_grid)'):
    changed = np.argwhere((overlays[name] != unnamed).any(-1))
    assert len(changed), name
    assert changed[:, 0].max() < 100 and changed[:, 1].max() < 300, name
  assert (overlays['cnn_263k (fold0)'][:100, :300]
          != overlays['hcnet_mask (cv_grid)'][:100, :300]).any()


def test_pixel_size_lookup(stub_cli, tmp_path):
  scans = tmp_path / 'test_set'
  scans.mkdir()
  for name in ('a.png', 'b.png'):
    Image.fromarray(_scan(800, 540, 1000)).save(scans / name)
  # Found beside the images directory, HC18 style; b.png has no row.
  (tmp_path / 'test_set_pixel_size.csv').write_text(
      'filename,pixel size(mm)\na.png,0.15\n')
  code, rows = stub_cli(f'--images={scans}')
  assert code == 0
  assert float(rows['a.png']['pixel_size_mm']) == 0.15
  # Its HC in px stays, and the message says why there is no mm.
  assert rows['b.png']['status'] == 'ok' and rows['b.png']['hc_px']
  assert rows['b.png']['hc_mm'] == ''
  assert 'no pixel size for it in' in rows['b.png']['message']
  # Without any CSV: HC in px only, and still ok.
  os.remove(tmp_path / 'test_set_pixel_size.csv')
  code, rows = stub_cli(f'--images={scans}')
  assert code == 0
  assert rows['a.png']['hc_mm'] == rows['a.png']['ga_weeks'] == ''


@pytest.mark.parametrize('content, message', [
    ('filename,pixel size(mm)\na.png,0.1\na.png,0.2\n',
     'line 3: a.png has pixel size 0.2 mm, but 0.1 mm on line 2'),
    ('filename,pixel size(mm)\na.png,0.1\nb.png,x\n', 'line 3: expected'),
    ('filename,pixel size(mm)\n', 'holds no rows'),
    (b'\x89PNG\r\n\x1a\n\xff\xfe\x00', 'is not UTF-8 text'),
    ('a.png,0.1\nb.png\n', 'line 2: expected'),
])
def test_bad_pixel_size_csv_is_a_usage_error(stub_cli, tmp_path, capsys,
                                             content, message):
  Image.fromarray(_scan(800, 540)).save(tmp_path / 'a.png')
  sizes = tmp_path / 'sizes.csv'
  if isinstance(content, bytes):
    sizes.write_bytes(content)
  else:
    sizes.write_text(content)
  code, rows = stub_cli(f'--images={tmp_path / "a.png"}',
                        f'--pixel-sizes={sizes}')
  assert code == 2 and rows is None
  err = capsys.readouterr().err
  assert 'error: ' in err and str(sizes) in err and message in err, err


def test_identical_duplicate_pixel_sizes_are_a_warning(tmp_path, capsys,
                                                        stub_cli):
  Image.fromarray(_scan(800, 540)).save(tmp_path / 'a.png')
  sizes = tmp_path / 'sizes.csv'
  sizes.write_text('a.png,0.1\nb.png,0.2\na.png,0.1\n')  # No header.
  code, rows = stub_cli(f'--images={tmp_path / "a.png"}',
                        f'--pixel-sizes={sizes}')
  assert code == 0 and float(rows['a.png']['pixel_size_mm']) == 0.1
  assert 'warning: ' in capsys.readouterr().err
  with pytest.warns(UserWarning, match='line 3: a.png is listed again'):
    assert scan_files.read_pixel_sizes(str(sizes)) == {'a.png': 0.1, 'b.png': 0.2}


def test_unwritable_out_is_a_usage_error_leaving_nothing(stub_cli, tmp_path,
                                                          capsys):
  Image.fromarray(_scan(800, 540)).save(tmp_path / 'a.png')
  images = f'--images={tmp_path / "a.png"}'
  before = sorted(os.listdir(tmp_path))
  code = predict.main(['--workdir=x', images, f'--out={tmp_path}'])
  assert code == 2
  assert f'error: --out {tmp_path} is a directory' in capsys.readouterr().err
  (tmp_path / 'file').write_text('')
  code = predict.main(['--workdir=x', images,
                       f'--out={tmp_path / "file" / "p.csv"}'])
  assert code == 2
  err = capsys.readouterr().err
  assert err.startswith('error: --out') and 'cannot be written' in err
  code = predict.main(['--workdir=x', images, f'--out={tmp_path / "p.csv"}',
                       f'--overlays={tmp_path / "file"}'])
  assert code == 2 and '--overlays' in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == sorted(before + ['file'])


def test_help_lists_statuses_and_exit_codes(capsys):
  with pytest.raises(SystemExit) as info:
    predict.main(['--help'])
  assert info.value.code == 0
  text = capsys.readouterr().out
  for word in prediction_rows.STATUSES + ('exit codes', '--max-sd-mm', 'message'):
    assert word in text
  for code in ('0  every image', '1  some images', '2  usage'):
    assert code in text
  for word in ('--submission', 'center_x_px', 'semi_axes_a_mm', 'angle_rad'):
    assert word in text


# --- Ellipse models: a stub whose ellipse is set by the scan. ---


def _ellipse_stub(a_in=12.0, b_in=8.0, member_scales=(1.0,)):
  """A Predictor of an ellipse model on 32x32 inputs (every 8th pixel of a
  256x256 scan). Its ellipse, in model-input pixels, is centred on the
  brightest input pixel (c, r), has semi-axes a_in, b_in (times the
  member's scale), and the angle of the direction from the input's centre
  to (c, r): mirroring the input mirrors the ellipse."""
  size = 32

  def prepare(image):
    image = np.asarray(image, np.float32)
    step = max(1, image.shape[0] // size)
    return _Prepared(np.ascontiguousarray(image[::step, ::step][:size, :size]))

  def inverse_softplus(value):
    return np.log(np.expm1(value))

  def forward(scale, batch):
    raw = np.zeros([len(batch), 6])
    for i, view in enumerate(np.asarray(batch)[..., 0]):
      row, col = np.unravel_index(np.argmax(view), view.shape)
      angle = np.arctan2(row - 15.5, col - 15.5) % np.pi
      raw[i, :2] = [np.log((c + 0.5) / (size - c - 0.5)) for c in (col, row)]
      raw[i, 2:4] = [inverse_softplus(axis * scale / (size / 2) -
                                      ellipse_head.MIN_SEMI_AXIS) -
                     ellipse_head.SOFTPLUS_SHIFT for axis in (a_in, b_in)]
      raw[i, 4:] = np.cos(2 * angle), np.sin(2 * angle)
    return {'value': np.asarray(ellipse_head.decode(raw, size, size))}

  return inference.Predictor(
      runs=[f'run{i}' for i in range(len(member_scales))],
      image_size=size, resize_mode='stretch',
      normalisers_px=[1.0] * len(member_scales),
      _variables=list(member_scales), _forward=forward, _prepare=prepare,
      kind='ellipse')


def _bright_scan(row, col, seed=0):
  """A 256x256 phantom scan whose brightest pixel, at input (row, col) of
  `_ellipse_stub`, is scan pixel (8 row, 8 col); `_stub` predicts 1000 px."""
  scan = np.minimum(_phantom(256, 256, seed), 200)
  scan[0, 0] = 100
  scan[8 * row, 8 * col] = 255
  return scan


def _stretched(x_in, y_in):
  """Input pixel -> scan pixel for a 256x256 scan stretched to 32x32."""
  scale, offset = 32 / 256, 0.5 * 32 / 256 - 0.5
  return (x_in - offset) / scale, (y_in - offset) / scale


def test_ellipse_model_rows(stub_cli, tmp_path):
  scans = tmp_path / 'scans'
  scans.mkdir()
  Image.fromarray(_bright_scan(4, 24)).save(scans / 'a.png')
  (tmp_path / 's.csv').write_text('filename,pixel size(mm)\na.png,0.3\n')
  out = tmp_path / 'p.csv'
  code, rows = stub_cli(f'--images={scans}',
                        f'--pixel-sizes={tmp_path / "s.csv"}',
                        stub=_ellipse_stub())
  assert code == 0, rows
  with open(out, newline='') as f:
    assert tuple(next(csv.reader(f))) == (prediction_rows.COLUMNS +
                                          prediction_rows.ELLIPSE_COLUMNS)
  row = rows['a.png']
  cells = {key: float(row[key]) for key in prediction_rows.ELLIPSE_COLUMNS}
  center_x, center_y = _stretched(24, 4)
  expected_px = {'center_x_px': center_x, 'center_y_px': center_y,
                 'semi_axis_a_px': 12 * 8, 'semi_axis_b_px': 8 * 8,
                 'angle_rad': np.arctan2(4 - 15.5, 24 - 15.5) % np.pi}
  for key, value in expected_px.items():
    assert cells[key] == pytest.approx(value, abs=2e-3), key
    if key != 'angle_rad':
      assert cells[key.replace('_px', '_mm')] == pytest.approx(
          value * 0.3, abs=2e-3), key
  assert float(row['hc_px']) == pytest.approx(
      ellipse_lib.ramanujan_perimeter(96, 64), abs=2e-3)
  # A label-only model keeps its columns exactly.
  stub_cli(f'--images={scans}', stub=_stub())
  with open(out, newline='') as f:
    assert next(csv.reader(f)) == [
        'filename', 'pixel_size_mm', 'hc_px', 'hc_mm', 'hc_mm_sd', 'ga_weeks',
        'ga_flag', 'status', 'message', 'model']
  # Without a pixel size: the mm cells are empty, px ones written.
  code, rows = stub_cli(f'--images={scans}', stub=_ellipse_stub())
  assert rows['a.png']['center_x_mm'] == rows['a.png']['semi_axis_a_mm'] == ''
  assert float(rows['a.png']['center_x_px']) == pytest.approx(center_x,
                                                              abs=2e-3)


def test_ellipse_flip_tta_mirrors_the_ellipse_back():
  """The mirror's ellipse is mirrored back before the views are combined,
  so a model that follows the scan gives the same ellipse with TTA."""
  predictor = _ellipse_stub()
  scans = [_bright_scan(4, 24), _bright_scan(20, 3, seed=1)]
  plain = predictor(scans, [0.3, 0.3])
  flipped = predictor(scans, [0.3, 0.3], tta_flip=True)
  np.testing.assert_allclose(flipped['ellipse_px'], plain['ellipse_px'],
                             atol=1e-3)
  np.testing.assert_allclose(flipped['hc_mm'], plain['hc_mm'], rtol=1e-6)
  # Mirroring the scan mirrors the ellipse: x -> W - 1 - x, angle -> pi - angle.
  mirrored = predictor([np.ascontiguousarray(s[:, ::-1]) for s in scans],
                       [0.3, 0.3])['ellipse_px']
  assert mirrored[:, 4] != pytest.approx(plain['ellipse_px'][:, 4], abs=0.1)


def test_ellipse_ensemble_hc_is_the_mean_and_the_ellipse_agrees():
  predictor = _ellipse_stub(member_scales=(1.0, 1.2))
  scans = [_bright_scan(4, 24)]
  out = predictor(scans, [0.3])
  members = [_ellipse_stub(member_scales=(s,))(scans, [0.3])
             for s in (1.0, 1.2)]
  assert out['hc_mm'][0] == pytest.approx(
      np.mean([m['hc_mm'][0] for m in members]), rel=1e-6)
  assert out['hc_mm_sd'][0] > 0
  ellipse = out['ellipse_px'][0]
  assert ellipse_lib.ramanujan_perimeter(ellipse[2], ellipse[3]) == (
      pytest.approx(out['hc_px'][0], rel=1e-9))
  np.testing.assert_allclose(ellipse[2:4], [96 * 1.1, 64 * 1.1], rtol=1e-3)
  np.testing.assert_allclose(ellipse[[0, 1, 4]],
                             members[0]['ellipse_px'][0][[0, 1, 4]], atol=1e-3)
  np.testing.assert_allclose(out['ellipse_mm'][0][:4], ellipse[:4] * 0.3)


def test_combine_ellipses_is_safe_for_the_angle():
  # Angles either side of 0 (== pi) average to 0, not pi/2.
  ellipses = np.array([[[10, 20, 30, 20, 0.1]], [[12, 22, 30, 20,
                                                    np.pi - 0.1]]])
  hc_px = ellipse_lib.ramanujan_perimeter(30, 20) * np.ones(1)
  combined = inference.combine_ellipses(ellipses, hc_px)[0]
  np.testing.assert_allclose(combined[:2], [11, 21])
  assert min(combined[4], np.pi - combined[4]) < 1e-9
  assert ellipse_lib.ramanujan_perimeter(combined[2], combined[3]) == (
      pytest.approx(hc_px[0]))
  # One ellipse written as (a, b, angle) and as (b, a, angle + pi/2): itself.
  same = np.array([[[0, 0, 30, 20, 0.3]], [[0, 0, 20, 30, 0.3 + np.pi / 2]]])
  np.testing.assert_allclose(
      inference.combine_ellipses(same, hc_px)[0], [0, 0, 30, 20, 0.3],
      atol=1e-9)
  # Mirroring: x -> W - 1 - x, angle -> pi - angle, in [0, pi).
  np.testing.assert_allclose(
      ellipse_lib.mirror_ellipses(np.array([3.0, 4, 5, 2, 0.0]), 10),
      [6, 4, 5, 2, 0])
  np.testing.assert_allclose(
      ellipse_lib.mirror_ellipses(np.array([3.0, 4, 5, 2, 0.5]), 10),
      [6, 4, 5, 2, np.pi - 0.5])


def test_ellipse_overlay_draws_the_outline(stub_cli, tmp_path):
  scans = tmp_path / 'scans'
  scans.mkdir()
  Image.fromarray(_bright_scan(16, 16)).save(scans / 'a.png')
  overlays = tmp_path / 'overlays'
  for stub, name in ((_ellipse_stub(), 'ellipse'), (_stub(), 'label')):
    code, rows = stub_cli(f'--images={scans}',
                          f'--overlays={overlays / name}', stub=stub)
    assert code == 0, rows
  # The stub's ellipse: centred on input pixel (16, 16), at pi/4.
  points = np.round(output_files.ellipse_points(
      [*_stretched(16, 16), 96, 64, np.pi / 4])).astype(int)
  points = points[points[:, 1] > 70]  # Below the text.
  for name in ('ellipse', 'label'):
    overlay = np.asarray(Image.open(overlays / name / 'a_prediction.png'))
    green = (overlay[..., 1] == 255) & (overlay[..., 0] == 0)
    near = np.zeros_like(green)  # Green within one pixel.
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        near |= np.roll(green, (dy, dx), axis=(0, 1))
    on_outline = near[points[:, 1], points[:, 0]].mean()
    if name == 'ellipse':
      assert on_outline > 0.95, on_outline
    else:
      assert on_outline == 0
    assert not green[120:136, 120:136].any()  # The inside is untouched.


def test_a_missing_path_on_the_command_line_is_a_usage_error(
    stub_cli, tmp_path, capsys):
  """Exit 2 and one line; no CSV row for it, and none written."""
  scans = tmp_path / 'scans'
  scans.mkdir()
  Image.fromarray(_scan(800, 540)).save(scans / 'good.png')
  out = tmp_path / 'hc.csv'
  code = predict.main([f'--images={scans / "good.png"}',
                       f'--images={tmp_path / "gone"}', f'--out={out}'])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and not out.exists()
  assert err == [f'error: --images {tmp_path / "gone"} does not exist']
  # A file given next to another keeps its name relative to their folder.
  code, rows = stub_cli(f'--images={scans / "good.png"}')
  assert list(rows) == ['good.png']


@pytest.mark.parametrize('size', ['1e308', '0.00001', '50'])
def test_an_absurd_pixel_size_is_an_error_row(stub_cli, tmp_path, size):
  scans = tmp_path / 'scans'
  scans.mkdir()
  for name in ('a.png', 'b.png'):
    Image.fromarray(_scan(800, 540)).save(scans / name)
  sizes = tmp_path / 'sizes.csv'
  sizes.write_text(f'filename,pixel size(mm)\na.png,{size}\nb.png,0.1\n')
  code, rows = stub_cli(f'--images={scans}', f'--pixel-sizes={sizes}')
  assert code == 1
  assert rows['a.png']['status'] == 'error' and rows['a.png']['hc_mm'] == ''
  assert 'is not a scan\'s: outside 0.001-10 mm' in rows['a.png']['message']
  assert rows['b.png']['status'] == 'ok'


def test_a_phantom_trained_model_says_so_in_rows_and_summary(
    stub_cli, tmp_path, capsys):
  import dataclasses  # pylint: disable=import-outside-toplevel
  scans = tmp_path / 'scans'
  scans.mkdir()
  Image.fromarray(_scan(800, 540)).save(scans / 'a.png')
  stub = dataclasses.replace(_stub(), trained_on_phantoms=True)
  code, rows = stub_cli(f'--images={scans}', stub=stub)
  captured = capsys.readouterr()
  assert prediction_rows.PHANTOM_NOTE in rows['a.png']['message']
  assert 'note: the model was trained on phantom scans, not HC18' in (
      captured.out)
  # The first line says what the slow start goes to.
  assert any(line.startswith('1 scan file(s): loading ') for line in
             captured.err.splitlines())
  code, rows = stub_cli(f'--images={scans}', stub=_stub())
  assert prediction_rows.PHANTOM_NOTE not in rows['a.png']['message']
  assert 'note: the model was trained on phantom' not in (
      capsys.readouterr().out)


def test_a_run_trained_on_phantoms_is_known_as_such(run, tmp_path):
  assert not loading.load(run).trained_on_phantoms  # data.source='hc18'.
  copy = tmp_path / 'synthetic_run'
  shutil.copytree(run, copy)
  with open(copy / 'config.json') as f:
    config = json.load(f)
  config['data']['source'] = 'synthetic'
  with open(copy / 'config.json', 'w') as f:
    json.dump(config, f)
  assert loading.load(str(copy)).trained_on_phantoms


def test_predict_never_writes_over_what_it_did_not_write(run, stub_cli,
                                                         tmp_path, capsys):
  """Not an input scan, not a run's file, not any other file; an earlier
  predict CSV may be replaced."""
  scans = tmp_path / 'scans'
  scans.mkdir()
  scan = scans / 'a.png'
  Image.fromarray(_scan(800, 540)).save(scan)
  before = scan.read_bytes()
  assert predict.main([f'--images={scans}', f'--out={scan}']) == 2
  assert 'is one of the input scans; not overwritten' in (
      capsys.readouterr().err)
  assert scan.read_bytes() == before
  results = os.path.join(run, 'results.json')
  with open(results, 'rb') as f:
    kept = f.read()
  assert predict.main([f'--workdir={run}', f'--images={scans}',
                       f'--out={results}']) == 2
  assert 'is a file of the run directory' in capsys.readouterr().err
  with open(results, 'rb') as f:
    assert f.read() == kept
  notes = tmp_path / 'notes.csv'
  notes.write_text('my,own\n1,2\n')
  assert predict.main([f'--images={scans}', f'--out={notes}']) == 2
  assert 'is not a file hc_jax.predict wrote' in capsys.readouterr().err
  assert notes.read_text() == 'my,own\n1,2\n'
  code, _ = stub_cli(f'--images={scans}')  # Writes p.csv ...
  earlier = tmp_path / 'p.csv'
  assert code in (0, 1) and earlier.read_text().startswith('filename,')
  code = predict.main([f'--workdir={tmp_path / "workdir"}',
                       f'--images={scans}', f'--out={earlier}'])
  assert code in (0, 1)  # ... which a rerun may replace.


def test_predict_from_a_run_in_training_says_so(run, tmp_path, capsys):
  """A run another process is training into (its lock held) predicts from
  its best checkpoint so far, with a warning naming the holder."""
  from hc_jax.training import lock  # pylint: disable=import-outside-toplevel
  copy = _copy_run(run, tmp_path)
  scans = tmp_path / 'scans'
  scans.mkdir()
  Image.fromarray(_scan(800, 540)).save(scans / 'a.png')
  flags = [f'--workdir={copy}', f'--images={scans}',
           f'--out={tmp_path / "p.csv"}']
  with lock.WorkdirLock(str(copy)):
    code = predict.main(flags)
    err = capsys.readouterr().err
    assert f'is being trained by pid {os.getpid()} on host' in err, err
    rows = _read_rows(tmp_path / 'p.csv')
  assert predict.main(flags) == code  # The same predictions, without it.
  assert 'is being trained' not in capsys.readouterr().err
  assert _read_rows(tmp_path / 'p.csv') == rows
