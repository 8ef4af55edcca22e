"""Tests of the TensorFlow-free GPU path, on the CPU at a tiny size.

device_augment against the TF ops it mirrors; the export and its folds
against `hc_jax.data`; `benchmarks/gpu_grid.py` end to end with TensorFlow
and ml_collections blocked; a member of a fold-vmapped run against the same
member trained alone; `benchmarks/gpu_train_step.py` at a tiny size.
"""

import csv
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from hc_jax import data as data_lib
from hc_jax import device_augment
from hc_jax import fold_data
from hc_jax import folds as folds_lib
from hc_jax import models
from hc_jax import numpy_data
from hc_jax import preprocess
from hc_jax import train_folds

IMAGE_SIZE = 32
# 60 phantom images: folds of 41 to 44 training images, so with a batch of 6
# one fold takes 6 steps an epoch and the others 7.
BATCH_SIZE = 6
# Adam's first steps are sign-like: float noise in near-zero gradients (a
# vmapped and a plain program differ by ~1e-6) flips lr-sized updates, so two
# runs at lr 1e-3 drift apart by about 1 mm in a few steps. At 1e-5 the
# parameters barely move but BatchNorm's running statistics record every
# batch, so a wrong batch, augmentation or extra step still shows by mm.
LEARNING_RATE = 1e-5
# Runs a script with TensorFlow, TFDS and ml_collections unimportable, as on
# the GPU machine.
BLOCKED_RUN = ("import sys, runpy; [sys.modules.__setitem__(m, None) for m in "
               "('tensorflow', 'tensorflow_datasets', 'ml_collections')]; "
               "script = sys.argv.pop(1); sys.argv[0] = script; "
               "runpy.run_path(script, run_name='__main__')")


def _run_blocked(script, *flags, timeout=300):
  result = subprocess.run(
      [sys.executable, '-c', BLOCKED_RUN, os.path.join(REPO, script), *flags],
      cwd=REPO, capture_output=True, text=True, timeout=timeout,
      env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


# One jitted augmentation for the tests; a batch of 64 throughout.
_augment = jax.jit(device_augment.augment_batch, static_argnums=2)


def _batch_of(image, size=64):
  return jnp.asarray(np.repeat(image[None], size, axis=0))


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


# ----------------------------------------------------------------------------
# device_augment
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('angle_rad,translate_xy,scale,flip', [
    (0.3, (2.5, -1.7), 1.1, False),
    (-0.17, (0.0, 0.0), 1.0, True),
    (0.0, (3.3, 4.1), 0.9, True),
    (0.17, (-5.0, 5.0), 1.0, False),
    (0.0, (0.0, 0.0), 1.0, False),
])
@pytest.mark.parametrize('height,width', [(40, 56), (32, 32)])
def test_warp_matches_tf_affine_warp(angle_rad, translate_xy, scale, flip,
                                     height, width):
  image = np.random.default_rng(0).integers(
      0, 256, (height, width, 1)).astype(np.uint8)
  flipped = image[:, ::-1] if flip else image
  expected = preprocess.affine_warp(flipped, angle_rad, translate_xy,
                                    scale).numpy()
  warped = jax.jit(device_augment.affine_warp)(image, angle_rad,
                                               jnp.asarray(translate_xy),
                                               scale, flip)
  assert warped.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(warped), expected, atol=0.01)


@pytest.mark.parametrize('value', [None, 0, 255])
def test_zscore_matches_tf(value):
  image = (np.random.default_rng(1).integers(0, 256, (32, 32, 1))
           if value is None else np.full((32, 32, 1), value)).astype(np.uint8)
  np.testing.assert_allclose(np.asarray(device_augment.zscore(image)),
                             preprocess.zscore(image).numpy(), atol=1e-5)


@pytest.fixture(scope='module')
def blob():
  """A uint8 [32, 32, 1] image with one off-centre bright blob."""
  rows, cols = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
  image = 250 * np.exp(-((cols - 10.0)**2 + (rows - 14.0)**2) / 8.0)
  return image.astype(np.uint8)[..., None]


def _centroid(image):
  weights = np.clip(np.asarray(image)[..., 0] - np.min(image), 0, None)
  rows, cols = np.mgrid[:weights.shape[0], :weights.shape[1]]
  return np.array([np.sum(weights * cols), np.sum(weights * rows)]) / np.sum(
      weights)


def test_augment_batch_is_reproducible_zscored_and_scales_hc(blob):
  config = device_augment.AugmentConfig(scale_range=(0.9, 1.1))
  images = _batch_of(blob)
  first, scale = _augment(jax.random.key(0), images, config)
  again, _ = _augment(jax.random.key(0), images, config)
  other, _ = _augment(jax.random.key(1), images, config)
  assert first.shape == (64, IMAGE_SIZE, IMAGE_SIZE, 1) and scale.shape == (64,)
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
  assert not np.allclose(first, other)
  assert np.all((scale >= 0.9) & (scale <= 1.1)) and np.ptp(scale) > 0.02
  np.testing.assert_allclose(first.mean(axis=(1, 2, 3)), 0, atol=1e-5)
  np.testing.assert_allclose(first.std(axis=(1, 2, 3)), 1, atol=1e-4)
  _, unscaled = _augment(jax.random.key(0), images,
                         device_augment.AugmentConfig())
  np.testing.assert_array_equal(np.asarray(unscaled), 1.0)


def test_flip_is_exact_half_the_time(blob):
  config = device_augment.AugmentConfig(max_translate_px=0.0,
                                        max_rotate_deg=0.0)
  out = np.concatenate([_augment(jax.random.key(k), _batch_of(blob), config)[0]
                        for k in range(3)])
  plain = np.asarray(device_augment.zscore(blob))
  mirrored = np.asarray(device_augment.zscore(blob[:, ::-1]))
  is_plain = np.all(np.abs(np.asarray(out) - plain) < 1e-5, axis=(1, 2, 3))
  is_mirrored = np.all(np.abs(np.asarray(out) - mirrored) < 1e-5,
                       axis=(1, 2, 3))
  assert np.all(is_plain ^ is_mirrored)
  assert 64 <= is_mirrored.sum() <= 128  # Of 192: p < 1e-4 outside.


def test_translation_stays_within_range(blob):
  config = device_augment.AugmentConfig(flip=False, max_translate_px=5.0,
                                        max_rotate_deg=0.0)
  out, _ = _augment(jax.random.key(4), _batch_of(blob), config)
  shifts = np.stack([_centroid(image) for image in np.asarray(out)])
  shifts -= _centroid(blob)
  assert np.all(np.abs(shifts) <= 5.2)
  assert np.all(shifts.max(axis=0) > 3) and np.all(shifts.min(axis=0) < -3)


def test_no_augment_only_zscores(blob):
  out, scale = _augment(jax.random.key(0), _batch_of(blob),
                        device_augment.NO_AUGMENT)
  np.testing.assert_allclose(np.asarray(out[0]),
                             preprocess.zscore(blob).numpy(), atol=1e-5)
  assert float(scale[0]) == 1.0


@pytest.mark.parametrize('fields', [{'max_rotate_deg': -1.0},
                                    {'scale_range': (1.2, 0.8)},
                                    {'rotate': 10.0}])
def test_augment_config_rejects_bad_settings(fields):
  with pytest.raises(ValueError):
    device_augment.AugmentConfig.from_dict(fields)


# ----------------------------------------------------------------------------
# The export and its folds.
# ----------------------------------------------------------------------------


def _load_script(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO, 'benchmarks', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def phantom_export(phantom_hc18, tmp_path_factory):
  """The phantom HC18 train split exported at 32x32: (npz, folds json)."""
  hc18_dir, tfds_dir = phantom_hc18
  out = str(tmp_path_factory.mktemp('export') / f'phantom_{IMAGE_SIZE}.npz')
  export_for_gpu = _load_script('export_for_gpu')
  record = export_for_gpu.export(hc18_dir, out, IMAGE_SIZE,
                                 tfds_data_dir=tfds_dir)
  assert record['num_images'] == 60
  return out, export_for_gpu.sidecar_paths(out)['folds']


def test_export_holds_the_prepared_images_and_the_folds_of_data_py(
    phantom_export, tiny_config, tmp_path):
  npz_path, folds_path = phantom_export
  arrays = numpy_data.load_numpy(npz_path)
  assert arrays['images'].shape == (60, IMAGE_SIZE, IMAGE_SIZE, 1)
  assert arrays['images'].dtype == np.uint8 and arrays['images'].max() > 100
  # hc_jax.data draws the folds of a training run; the export's must match.
  data_lib.load(tiny_config, str(tmp_path))
  assert fold_data.load(npz_path, folds_path).assignment == (
      folds_lib.FoldAssignment.from_json(
          str(tmp_path / data_lib.FOLDS_FILE)))


def test_export_refuses_a_directory_without_hc18(tmp_path):
  # TFDS would otherwise try to download HC18.
  with pytest.raises(ValueError, match='holds no training_set_pixel_size'):
    _load_script('export_for_gpu').export(
        str(tmp_path), str(tmp_path / 'x.npz'), IMAGE_SIZE)


def test_load_rejects_an_export_without_the_assigned_images(phantom_export,
                                                            tmp_path):
  npz_path, folds_path = phantom_export
  arrays = numpy_data.load_numpy(npz_path)
  numpy_data.save_numpy(tmp_path / 'part.npz',
                        {name: value[:50] for name, value in arrays.items()})
  with pytest.raises(ValueError, match='10 assigned images are not exported'):
    fold_data.load(str(tmp_path / 'part.npz'), folds_path)


@pytest.mark.parametrize('fields,message', [
    ({'model': 'resnet'}, 'unknown model'),
    ({'losses': ('mse', 'mse')}, 'losses must be distinct'),
    ({'losses': ('l1',)}, 'losses must be'),
    ({'folds': (5,)}, 'folds must be in'),
    ({'dtype': 'float16'}, 'dtype'),
    ({'image_size': 64}, 'image_size=64'),
    ({'batch_size': 64}, 'batch_size=64 but the smallest fold has 41'),
])
def test_bad_settings_fail_before_training(phantom_export, tmp_path, fields,
                                           message):
  data = fold_data.load(*phantom_export)
  config = train_folds.FoldsConfig(**fields)
  with pytest.raises(ValueError, match=message):
    train_folds.train_and_evaluate(config, data, str(tmp_path))
  assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------
# The grid script and the fold-vmapped trainer.
# ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def grid_run(phantom_export, tmp_path_factory):
  """gpu_grid.py on the phantom export, 2 losses x 5 folds, 2 epochs."""
  npz_path, _ = phantom_export
  out = tmp_path_factory.mktemp('grid')
  stdout = _run_blocked(
      'benchmarks/gpu_grid.py', f'--data={npz_path}', f'--out={out}',
      '--models=cnn_263k', '--losses=mse,huber', '--epochs=2',
      f'--batch_size={BATCH_SIZE}', f'--learning_rate={LEARNING_RATE}',
      '--time_budget_s=400', '--min_model_s=0', f'--runs_dir={out}/runs',
      '--allow_cpu')  # --members_per_call=auto, the default.
  return out, stdout


def test_grid_leaves_every_fold_and_the_summary(grid_run, phantom_export):
  out, stdout = grid_run
  assignment = fold_data.load(*phantom_export).assignment
  assert 'REDUCED' in stdout and '| cnn_263k | huber |' in stdout
  assert 'DIVERGED' not in stdout
  # 'auto' timed both ways of mapping the members, then trained on.
  chosen = re.search(r'members_per_call=auto: 0: [0-9.]+ ms per step, '
                     r'1: [0-9.]+ ms per step -> ([01])', stdout)
  assert chosen, stdout[-2000:]
  for loss in ('mse', 'huber'):
    for fold in range(5):
      workdir = out / 'runs' / f'cnn_263k_{loss}' / f'fold{fold}'
      results = json.loads((workdir / 'results.json').read_text())
      rows = _read_csv(workdir / 'predictions_test.csv')
      assert sorted(r['filename'] for r in rows) == assignment.split(
          fold)['test']
      assert results['test_num_images'] == len(rows)
      assert results['members_per_call'] == int(chosen.group(1))
      assert results['diverged_epoch'] is None
      assert results['test_mae_mm'] == pytest.approx(
          np.mean([abs(float(r['error_mm'])) for r in rows]), abs=1e-2)
      # Selection on validation only: the selected epoch is the best one.
      lines = [json.loads(line) for line in
               (workdir / 'metrics.jsonl').read_text().splitlines()]
      val = {line['epoch']: line['val_mae_mm'] for line in lines
             if 'val_mae_mm' in line}
      assert sorted(val) == [1, 2] and results['num_epochs'] == 2
      assert results['selected_epoch'] == min(val, key=val.get)
      assert results['val_mae_mm'] == pytest.approx(min(val.values()))
      assert np.isfinite(lines[0]['train_loss'])
  summary = json.loads((out / 'summary.json').read_text())
  assert [(r['loss'], r['test_num_images']) for r in summary['rows']] == [
      ('mse', 60), ('huber', 60)]
  assert all(r['reduced'] for r in summary['rows'])
  assert len(_read_csv(out / 'predictions.csv')) == 120
  with tarfile.open(out / 'runs.tar.gz') as tar:
    assert 'runs/cnn_263k_huber/fold4/predictions_test.csv' in tar.getnames()
  assert (out / 'summary.md').read_text().count('| cnn_263k |') == 2


def test_a_member_trains_alike_whatever_the_others(grid_run, phantom_export,
                                                   tmp_path):
  out, _ = grid_run
  data = fold_data.load(*phantom_export)
  members = fold_data.Members(data, ('huber',), None, batch_size=BATCH_SIZE)
  # The fold with the fewest steps sat steps out beside the others.
  fold = int(np.argmin(members.steps))
  assert members.steps[fold] < members.steps.max()
  # Here beside one other fold and one member after the other (lax.map), in
  # the grid among 10 members in one vmap.
  results = train_folds.train_and_evaluate(
      train_folds.FoldsConfig(model='cnn_263k', losses=('huber',),
                              folds=(fold, (fold + 1) % 5), num_epochs=2,
                              batch_size=BATCH_SIZE,
                              learning_rate=LEARNING_RATE,
                              members_per_call=1), data, str(tmp_path))
  alone = _read_csv(tmp_path / 'cnn_263k_huber' / f'fold{fold}' /
                    'predictions_test.csv')
  together = _read_csv(out / 'runs' / 'cnn_263k_huber' / f'fold{fold}' /
                       'predictions_test.csv')
  grid_results = json.loads((out / 'runs' / 'cnn_263k_huber' / f'fold{fold}' /
                             'results.json').read_text())
  assert results[0]['selected_epoch'] == grid_results['selected_epoch']
  assert [r['filename'] for r in alone] == [r['filename'] for r in together]
  np.testing.assert_allclose([float(r['hc_mm_pred']) for r in alone],
                             [float(r['hc_mm_pred']) for r in together],
                             atol=0.02)


def test_a_diverging_member_is_frozen_and_the_others_go_on(
    phantom_export, tmp_path, monkeypatch):
  data = fold_data.load(*phantom_export)

  def boom(predictions, targets, mask=None):  # NaN from the first step.
    del targets, mask
    return jnp.mean(predictions) * jnp.nan

  monkeypatch.setitem(train_folds.losses_lib.LOSSES, 'boom', boom)
  # One member after another: each member's lax.switch then runs its own
  # loss only (vmapped, the switch computes every branch, and the NaN branch
  # would poison the others' gradients through 0 * NaN, which no real loss
  # of hc_jax does).
  config = train_folds.FoldsConfig(
      model='cnn_263k', losses=('mse', 'boom'), folds=(0, 1), num_epochs=2,
      batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE, members_per_call=1)
  results = train_folds.train_and_evaluate(config, data, str(tmp_path))
  by_loss = {(r['loss'], r['fold']): r for r in results}
  for fold in (0, 1):
    good, bad = by_loss['mse', fold], by_loss['boom', fold]
    assert good['diverged_epoch'] is None and good['selected_epoch'] >= 1
    assert np.isfinite(good['test_mae_mm'])
    # Frozen in epoch 1 before any validation: scored with the initial
    # weights (epoch 0), and says so.
    assert bad['diverged_epoch'] == 1 and bad['selected_epoch'] == 0
    assert np.isfinite(bad['test_mae_mm'])
    lines = [json.loads(line) for line in (
        tmp_path / 'cnn_263k_boom' / f'fold{fold}' /
        'metrics.jsonl').read_text().splitlines()]
    assert lines[1]['train_loss'] is None  # Epoch 2: no step taken.
  # Every member diverging is an error.
  with pytest.raises(FloatingPointError, match='every member diverged'):
    train_folds.train_and_evaluate(
        dataclasses.replace(config, losses=('boom',)), data,
        str(tmp_path / 'all'))


@pytest.mark.slow  # About a minute on 2 CPU cores: three ResNet compilations.
def test_the_gpu_graph_trains_resnet_in_bfloat16_with_plain_layers(
    phantom_export, tmp_path, monkeypatch):
  # What a GPU runs, on the CPU: train.create_model picks the plain Flax
  # layers off the CPU; a ResNet50 with one block per stage, bfloat16,
  # vmapped and mapped members ('auto'), two losses.
  class SmallResNet(models.ResNet50):
    stage_sizes: tuple[int, ...] = (1, 1, 1, 1)

  monkeypatch.setitem(models.MODELS, 'resnet50', SmallResNet)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  built = []
  create_model = train_folds.train.create_model
  monkeypatch.setattr(train_folds.train, 'create_model',
                      lambda config: built.append(create_model(config)) or
                      built[-1])
  data = fold_data.load(*phantom_export)
  results = train_folds.train_and_evaluate(
      train_folds.FoldsConfig(
          model='resnet50', losses=('mse', 'huber'), folds=(0,),
          dtype='bfloat16', num_epochs=1, batch_size=BATCH_SIZE,
          learning_rate=LEARNING_RATE, members_per_call='auto'),
      data, str(tmp_path))
  assert [m.fast_layers for m in built] == [False]
  assert built[0].dtype == jnp.bfloat16
  assert [(r['loss'], r['dtype'], r['members_per_call'] in (0, 1))
          for r in results] == [('mse', 'bfloat16', True),
                                ('huber', 'bfloat16', True)]
  for r in results:
    assert np.isfinite(r['test_mae_mm']) and r['diverged_epoch'] is None
    assert r['test_num_images'] == len(data.assignment.split(0)['test'])


def test_the_gpu_scripts_refuse_a_machine_without_an_accelerator(
    phantom_export, tmp_path):
  if jax.default_backend() != 'cpu':
    pytest.skip('this machine has an accelerator')
  npz_path, _ = phantom_export
  with pytest.raises(SystemExit, match='found no GPU or TPU'):
    _load_script('gpu_grid').main([f'--data={npz_path}',
                                   f'--out={tmp_path}'])
  with pytest.raises(SystemExit, match='found no GPU or TPU'):
    _load_script('gpu_train_step').main([f'--out={tmp_path}'])
  assert not os.listdir(tmp_path)


@pytest.mark.slow  # About 25 s on 2 CPU cores: four compilations.
def test_gpu_train_step_reports_rates_at_a_tiny_size(tmp_path):
  stdout = _run_blocked(
      'benchmarks/gpu_train_step.py', '--model=cnn_263k',
      f'--image_size={IMAGE_SIZE}', '--dtypes=float32,bfloat16',
      '--batch_sizes=4', '--members=2', '--member_batch_size=4',
      '--seconds=0', '--num_images=40', '--epochs=10', f'--out={tmp_path}',
      '--allow_cpu')
  assert 'bfloat16 skipped' in stdout  # cnn_263k has no compute dtype.
  report = json.loads((tmp_path / 'gpu_train_step.json').read_text())
  assert [row['what'] for row in report['rows']] == [
      'input only: gather+augment+zscore, 8/call', 'one model, batch 4',
      '2 models vmapped x batch 4 (+input)',
      '2 models in turn x batch 4 (+input)']
  assert all(row['images_per_second'] > 0 for row in report['rows'])
  assert report['rows'][1]['run_seconds'] == pytest.approx(
      10 * 5 * 40 * 0.8 * 0.9 / report['rows'][1]['images_per_second'])


def test_gpu_train_step_skips_what_the_budget_leaves_out(tmp_path, capsys):
  gpu_train_step = _load_script('gpu_train_step')
  gpu_train_step.main([
      '--model=cnn_263k', f'--image_size={IMAGE_SIZE}', '--batch_sizes=4',
      '--members=2', '--member_batch_size=4', '--seconds=0',
      '--num_images=40', '--time_budget_s=0', f'--out={tmp_path}',
      '--allow_cpu'])
  report = json.loads((tmp_path / 'gpu_train_step.json').read_text())
  assert [row['what'] for row in report['rows']] == [
      'input only: gather+augment+zscore, 8/call']
  assert capsys.readouterr().out.count('skipped, past --time_budget_s') == 3


def test_members_start_where_hc_jax_train_starts(phantom_export,
                                                  tiny_config):
  data = fold_data.load(*phantom_export)
  config = train_folds.FoldsConfig(image_size=IMAGE_SIZE)
  trainer = train_folds.FoldsTrainer(
      config, data, fold_data.Members(data, ('mse',), None, batch_size=8))
  init_key, _ = jax.random.split(jax.random.key(tiny_config.seed))
  state = train_folds.train.create_train_state(
      tiny_config, train_folds.train.create_model(tiny_config), init_key,
      train_folds.train.create_optimizer(tiny_config, 5))
  for stacked, single in zip(jax.tree.leaves(trainer.state.params),
                             jax.tree.leaves(state.params)):
    assert stacked.shape == (5, *single.shape)
    for member in stacked:
      np.testing.assert_array_equal(member, single)


@pytest.mark.parametrize('model,dtype,expected', [
    ('resnet50', 'bfloat16', 'bfloat16'), ('resnet50', 'float32', 'float32'),
    ('vgg16', 'bfloat16', 'float32')])
def test_compute_dtype(model, dtype, expected):
  config = train_folds.FoldsConfig(model=model, dtype=dtype)
  assert train_folds.compute_dtype(config) == expected
  module = train_folds.train.create_model(config)
  assert getattr(module, 'dtype', jnp.float32) == jnp.dtype(expected)
