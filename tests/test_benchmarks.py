"""Smoke tests of benchmarks/: the Keras twins and the scripts, at tiny sizes.

They check that the Keras models mirror hc_jax.models and that the scripts
run and print what they promise; they measure nothing.
"""

import collections
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hc_jax.data import cache as cache_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, 'benchmarks')
sys.path.insert(0, BENCHMARKS)

import keras_models  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position


def _flax_kernel_shapes(name, image_size, **options):
  """Multiset of the Flax model's parameter shapes."""
  model = keras_models.flax_model(name, **options)
  height, width = keras_models.as_hw(image_size)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, height, width, 1)), train=False))
  return collections.Counter(
      tuple(leaf.shape) for leaf in jax.tree.leaves(variables['params']))


def _keras_shapes(model, skip_conv_bias):
  """Multiset of the Keras model's trainable weight shapes."""
  import keras  # pylint: disable=import-outside-toplevel
  skipped = set()
  if skip_conv_bias:
    skipped = {id(layer.bias) for layer in model.layers
               if isinstance(layer, keras.layers.Conv2D) and layer.use_bias}
  return collections.Counter(tuple(w.shape) for w in model.trainable_weights
                             if id(w) not in skipped)


@pytest.mark.parametrize('name, image_size', [
    ('cnn_263k', 32), ('cnn_1m', 32), ('cnn_263k', 128), ('vgg16', 32),
    ('resnet50', 32)])
def test_keras_twin_matches_flax_model(name, image_size):
  keras_count, extra, flax_count = keras_models.compare_params(name, image_size)
  assert keras_count - extra == flax_count
  assert (extra > 0) == (name == 'resnet50')  # Only ResNet50 has conv biases.
  model = keras_models.create_model(name, image_size)
  assert _keras_shapes(model, name == 'resnet50') == _flax_kernel_shapes(
      name, image_size)
  assert tuple(model.output.shape) == (None, 1)


def test_keras_twin_unknown_model():
  with pytest.raises(ValueError, match='known models'):
    keras_models.create_model('resnet18', 32)


# hcnet's settings in configs/hcnet_label.py when these tests were written.
HCNET_OPTIONS = {'widths': (16, 32, 64, 128, 128), 'head': 'flatten',
                 'dilated': False}


@pytest.mark.parametrize('name, image_size, count', [
    ('hcnet', (128, 128), 376_305), ('hcnet', (128, 192), 441_841),
    ('hcnet_ellipse', (128, 128), 376_630),
    ('hcnet_ellipse', (128, 192), 442_166)])
def test_hcnet_twins_pinned_counts(name, image_size, count):
  assert keras_models.compare_params(name, image_size, **HCNET_OPTIONS) == (
      count, 0, count)


@pytest.mark.parametrize('name, outputs', [('hcnet', 1), ('hcnet_ellipse', 6)])
@pytest.mark.parametrize('image_size', [None, (32, 48)])
def test_hcnet_twins_match_their_config(name, outputs, image_size):
  # None: the config's input (configs/hcnet_label.py, hcnet_ellipse.py).
  config = keras_models.load_config(name)
  assert config.model == name
  assert keras_models.SIZES[name] == cache_lib.input_shape(config)
  size = keras_models.SIZES[name] if image_size is None else image_size
  keras_count, extra, flax_count = keras_models.compare_params(name,
                                                               image_size)
  assert keras_count == flax_count and extra == 0
  model = keras_models.create_model(name, image_size)
  assert _keras_shapes(model, False) == _flax_kernel_shapes(
      name, size, **keras_models.model_options(name))
  assert tuple(model.input.shape) == (None, *size, 1)
  assert tuple(model.output.shape) == (None, outputs)


@pytest.mark.parametrize('name, options', [
    ('hcnet', {}),
    pytest.param('hcnet', {'bounded': False}, marks=pytest.mark.slow),
    pytest.param('hcnet', {'head': 'gap', 'dilated': True},
                 marks=pytest.mark.slow),
    pytest.param('hcnet_ellipse', {}, marks=pytest.mark.slow)])
def test_hcnet_twin_computes_the_flax_function(name, options):
  # The Flax weights copied into the twin give the same outputs: the same
  # layers in the same order, and for hcnet the same bounded output.
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 32, 48, 1)).astype(np.float32)
  flax_model = keras_models.flax_model(name, layers='plain', **options)
  variables = flax_model.init(jax.random.key(0), images, train=False)
  params = jax.tree.map(
      lambda x: x + rng.normal(0, 0.2, x.shape).astype(np.float32),
      variables['params'])['backbone']
  stats = jax.tree.map(
      lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32),
      variables['batch_stats'])['backbone']
  model = keras_models.create_model(name, (32, 48), **options)
  copied = 0
  for layer in model.layers:
    if layer.name.endswith('_bn'):
      layer.set_weights([params[layer.name]['scale'],
                         params[layer.name]['bias'],
                         stats[layer.name]['mean'] - 1,
                         stats[layer.name]['var']])
    elif layer.name in params:
      layer.set_weights([params[layer.name][key] for key in ('kernel', 'bias')
                         if key in params[layer.name]])
    else:
      continue
    copied += 1
  assert copied == len(params)
  expected = flax_model.apply(
      {'params': {'backbone': params},
       'batch_stats': {'backbone': {
           k: {'mean': v['mean'] - 1, 'var': v['var']}
           for k, v in stats.items()}}}, images, train=False)
  outputs = np.asarray(model(images, training=False))
  np.testing.assert_allclose(outputs, np.reshape(expected, outputs.shape),
                             rtol=1e-4, atol=1e-5)
  if name == 'hcnet' and options.get('bounded', True):
    assert np.all((outputs >= 0.05) & (outputs <= 1.25))


def test_hcnet_twin_rejects_an_unknown_option():
  with pytest.raises(ValueError, match='bad options for hcnet_ellipse'):
    keras_models.create_model('hcnet_ellipse', (32, 32), bounded=True)
  with pytest.raises(ValueError, match='cnn_1m takes no options'):
    keras_models.create_model('cnn_1m', 32, dilated=True)


def _run(script, *flags, env=None, returncode=0):
  # Compile time dominates these runs; the figures they print are not checked.
  env = {**(env or os.environ), 'TF_CPP_MIN_LOG_LEVEL': '2',
         'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'}
  result = subprocess.run(
      [sys.executable, os.path.join(BENCHMARKS, script), *flags], env=env,
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == returncode, result.stderr[-3000:]
  return result.stdout if returncode == 0 else result.stderr


def _run_here(capsys, monkeypatch, script, *flags):
  """The script's `main` run in this process (its imports are this
  process's already: seconds less than a fresh interpreter); its stdout."""
  path = os.path.join(BENCHMARKS, script)
  spec = importlib.util.spec_from_file_location(
      f'benchmark_{script[:-3]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  monkeypatch.setattr(sys, 'argv', [path, *flags])
  capsys.readouterr()
  status = module.main()
  assert status in (None, 0), status
  return capsys.readouterr().out


NUMBER = r'[0-9]+\.[0-9]+'


def test_train_step_compares_frameworks():
  out = _run('train_step.py', '--models=cnn_263k', '--batch_sizes=2',
             '--image_size=32', '--seconds=0', '--min_steps=1', '--rounds=1',
             '--variants=hc_jax,keras')
  for variant in ('hc_jax', 'keras'):
    assert re.search(rf'round 1 {variant} +cnn_263k 32x32 batch 2: +{NUMBER} '
                     r'img/s', out), out
  assert re.search(rf'hc_jax/Keras \(best of each\) {NUMBER}', out), out


@pytest.mark.slow  # Two worker processes: 15-30 s on 2 CPU cores.
def test_train_step_compares_frameworks_on_hcnet():
  out = _run('train_step.py', '--models=hcnet', '--batch_sizes=2',
             '--image_size=32x48', '--seconds=0', '--min_steps=1',
             '--rounds=1', '--variants=hc_jax,keras')
  for variant in ('hc_jax', 'keras'):
    assert re.search(rf'round 1 {variant} +hcnet 32x48 batch 2: +{NUMBER} '
                     r'img/s', out), out
  assert re.search(rf'hcnet 32x48 batch 2: hc_jax {NUMBER}.*; keras '
                   rf'{NUMBER}.*; hc_jax/Keras \(best of each\) {NUMBER}',
                   out), out


@pytest.fixture
def fast_compile():
  # Compile time dominates the in-process steps below.
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


@pytest.mark.slow  # About 4 s each; the default run times hcnet's CLI path.
@pytest.mark.parametrize('framework', ['hc_jax', 'keras'])
def test_train_step_worker_times_hcnet_ellipse(framework, fast_compile):
  # In this process: the real hc_jax step (ellipse loss) on a valid batch,
  # and Keras' MSE on the six outputs, each with a finite loss.
  result = train_step.run_worker(framework, 'hcnet_ellipse', 2, (32, 48),
                                 seconds=0, min_steps=1)
  assert result['steps'] == 1 and result['img_per_s'] > 0
  assert np.isfinite(result['loss'])


def test_train_step_worker_refuses_a_nan_loss(monkeypatch, fast_compile):
  # A batch without a resize geometry makes the ellipse loss NaN.
  batch = train_step.hc_jax_batch
  monkeypatch.setattr(train_step, 'hc_jax_batch', lambda *args: {
      **batch(*args), 'resize': np.zeros((2, 4), np.float32)})
  with pytest.raises(FloatingPointError, match='hc_jax hcnet_ellipse: the '
                     'loss is nan'):
    train_step.run_worker('hc_jax', 'hcnet_ellipse', 2, (32, 48), seconds=0,
                          min_steps=1)


@pytest.mark.parametrize('text, size', [('128', (128, 128)),
                                        ('128x192', (128, 192))])
def test_train_step_parses_image_size(text, size):
  assert train_step.parse_size(text) == size


def test_train_step_rejects_a_bad_image_size():
  result = subprocess.run(
      [sys.executable, os.path.join(BENCHMARKS, 'train_step.py'),
       '--image_size=128x'], capture_output=True, text=True, check=False)
  assert result.returncode == 2
  assert ("--image_size: takes a side S or HxW, e.g. 128 or 128x192; got "
          "'128x'") in result.stderr, result.stderr


def test_train_step_breakdown(capsys, monkeypatch):
  out = _run_here(capsys, monkeypatch, 'train_step.py', '--breakdown',
                  '--models=cnn_1m', '--batch_sizes=2', '--image_size=32',
                  '--seconds=0', '--min_steps=1')
  for stage in ('forward', 'forward\\+gradient', 'full step'):
    assert re.search(rf'cnn_1m 32x32 batch 2 {stage}: {NUMBER} ms', out), out


def test_train_step_rejects_unknown_variant():
  result = subprocess.run(
      [sys.executable, os.path.join(BENCHMARKS, 'train_step.py'),
       '--variants=hc_jax,pytorch'], capture_output=True, text=True,
      check=False)
  assert result.returncode != 0
  assert "unknown variant 'pytorch'" in result.stderr


def test_predict_runs_on_phantom_scans(phantom_hc18, capsys, monkeypatch):
  hc18_dir, _ = phantom_hc18
  out = _run_here(capsys, monkeypatch, 'predict.py', f'--hc18_dir={hc18_dir}',
                  '--models=cnn_263k', '--num_images=3', '--batch_size=2',
                  '--num_batches=1')
  assert re.search(
      rf'cnn_263k 128x128: batch 1 latency p50 {NUMBER} ms, p95 {NUMBER} ms '
      rf'.*; batch 2: {NUMBER} img/s', out), out


def test_profile_step_lists_operations():
  out = _run('profile_step.py', '--model=cnn_263k', '--batch_size=2',
             '--image_size=32', '--steps=2', '--top=5')
  assert re.search(rf'cnn_263k 32x32 batch 2: {NUMBER} ms per step', out), out
  assert len(re.findall(rf'^ *{NUMBER} ms +{NUMBER} % ', out, re.M)) == 5, out


def test_keras_models_script_reports_matches(capsys, monkeypatch):
  out = _run_here(capsys, monkeypatch, 'keras_models.py', '--models=cnn_263k')
  assert 'cnn_263k 128x128: Keras 263,633 trainable, hc_jax 263,633: match' \
      in out, out


def test_conv_im2col_compares_both_ways():
  out = _run('conv_im2col.py', '--shapes=2x8x4x8', '--rounds=1', '--calls=1')
  assert re.search(rf'2x8x8x4 -> 8: xla {NUMBER} ms, im2col {NUMBER} ms, '
                   rf'xla / im2col {NUMBER}', out), out


def test_conv_im2col_rejects_a_bad_shape():
  result = subprocess.run(
      [sys.executable, os.path.join(BENCHMARKS, 'conv_im2col.py'),
       '--shapes=8x64x16'], capture_output=True, text=True, check=False)
  assert result.returncode == 2 and 'NxHxCxC_OUT' in result.stderr


def _tiny_export(path, num_images=12, size=32):
  """A prepared .npz of random scans, as `python -m hc_jax.prepare` writes."""
  rng = np.random.default_rng(0)
  a = rng.uniform(100, 200, num_images)
  arrays = {
      'images': rng.integers(0, 256, (num_images, size, size, 1), np.uint8),
      'filename': [f'{i:03d}_HC.png' for i in range(num_images)],
      'subject_id': np.arange(num_images), 'pixel_size_mm': np.full(
          num_images, 0.15), 'hc_mm': a * 0.75, 'hc_px': a * 5.0,
      'ellipse': np.stack([np.full(num_images, 400.0), np.full(
          num_images, 270.0), a, 0.8 * a, np.zeros(num_images)], 1),
      'original_hw': np.tile([[540, 800]], (num_images, 1)),
      'resize': cache_lib.resize_geometry([[540, 800]] * num_images,
                                          (size, size), 'stretch')}
  cache_lib.save(str(path), arrays, {'format_version': cache_lib.FORMAT_VERSION,
                                     'image_hw': [size, size],
                                     'resize_mode': 'stretch'})
  return str(path)


@pytest.mark.slow  # About 10 s; tests/test_gpu_path.py runs the GPU path.
def test_gpu_train_step_without_tensorflow(tmp_path):
  from test_gpu_path import tf_free_env  # pylint: disable=import-outside-toplevel
  data = _tiny_export(tmp_path / 'export.npz')
  out = _run('gpu_train_step.py', '--allow_cpu', f'--data={data}',
             '--model=cnn_263k', '--image_size=32', '--dtypes=float32',
             '--batch_size=2', '--members=3', '--how=vmap,map', '--seconds=0',
             f'--out={tmp_path}', env=tf_free_env(tmp_path))
  assert re.search(rf'one model +float32 +{NUMBER} img/s +baseline', out), out
  for how in ('vmap', 'map'):
    assert re.search(rf'3 members {how} +float32 +{NUMBER} img/s +{NUMBER}x '
                     r'one model .* 3 run\(s\) of 250 epochs', out), out
  assert re.search(rf'augment only +float32 +{NUMBER} img/s +{NUMBER}x', out)
  with open(tmp_path / 'gpu_train_step.json') as f:
    rows = json.load(f)['rows']
  assert [(r['what'], r['members']) for r in rows] == [
      ('one model', 1), ('3 members vmap', 3), ('3 members map', 3),
      ('augment only', 3)]
  assert rows[0]['ratio_to_one_model'] == 1.0
  for row in rows[1:]:
    assert row['ratio_to_one_model'] == pytest.approx(
        row['images_per_second'] / rows[0]['images_per_second'])


@pytest.mark.skipif(jax.default_backend() != 'cpu',
                    reason='checks the refusal on a machine without a GPU')
def test_gpu_train_step_stops_without_an_accelerator():
  err = _run('gpu_train_step.py', '--model=cnn_263k', returncode=2)
  assert err.strip().splitlines() == [
      err.strip().splitlines()[-1]] and 'error: JAX found no GPU' in err, err


@pytest.mark.parametrize('flag, message', [
    ('--how=pmap', "--how takes vmap, map; got ['pmap']"),
    ('--dtypes=float16', '--dtypes takes float32, bfloat16'),
    ('--model=resnet18', "unknown model 'resnet18'"),
    ('--data=/nonexistent.npz', '/nonexistent.npz: no such prepared file')])
def test_gpu_train_step_rejects_bad_settings(flag, message):
  err = _run('gpu_train_step.py', '--allow_cpu', flag, returncode=2)
  assert err.startswith('error: ') and message in err, err


def test_gpu_train_step_rejects_an_export_of_another_size(tmp_path):
  data = _tiny_export(tmp_path / 'export.npz')
  err = _run('gpu_train_step.py', '--allow_cpu', f'--data={data}',
             '--image_size=64', returncode=2)
  assert 'holds 32x32 images, not --image_size=64' in err, err


def test_input_pipeline_compares_backends(phantom_hc18, capsys, monkeypatch):
  hc18_dir, cache_dir = phantom_hc18
  out = _run_here(capsys, monkeypatch, 'input_pipeline.py',
                  f'--hc18_dir={hc18_dir}', f'--cache_dir={cache_dir}',
                  '--image_size=32', '--members=2', '--epochs=1',
                  '--backends=tf,numpy')
  assert re.search(r'60 scans at 32x32 ready .* 2 member\(s\), batch 8, '
                   r'[0-9]+ steps per epoch', out), out
  rate = r'[0-9,]+\.[0-9]'
  numpy_line = re.search(rf'^numpy: {rate} batches/s \([0-9,]+ img/s', out,
                         re.M)
  tf_line = re.search(rf'^tf: {rate} batches/s .*, [0-9.e+-]+x numpy$', out,
                      re.M)
  assert numpy_line and tf_line and numpy_line.start() < tf_line.start(), out


def test_input_pipeline_rejects_a_bad_backend():
  err = _run('input_pipeline.py', '--backends=numpy,jax', returncode=2)
  assert "error: --backends takes numpy, tf; got 'numpy,jax'" in err, err


@pytest.mark.slow  # Two compilations of the demo's mask network: ~20 s.
def test_one_member_step_compares_both_ways(capsys, monkeypatch):
  out = _run_here(capsys, monkeypatch, 'one_member_step.py', '--config=demo',
                  '--seconds=0', '--rounds=1')
  for way in ('unbatched', 'vmap'):
    assert re.search(rf'round 1 {way}: {NUMBER} ms/step', out), out
  assert re.search(rf'vmap: {NUMBER} ms/step, {NUMBER}x unbatched', out), out
  assert 'largest loss difference over the first 5 steps' in out, out


@pytest.mark.slow  # Three models compiled at 128x128: ~20 s.
def test_hcnet_step_times_each_model(capsys, monkeypatch):
  out = _run_here(capsys, monkeypatch, 'hcnet_step.py', '--seconds=0',
                  '--rounds=1')
  for name in ('cnn_1m', 'hcnet', 'hcnet_ellipse'):
    assert re.search(rf'round 1 {name}: {NUMBER} ms/step', out), out
  assert re.search(rf'hcnet_ellipse 128x128: {NUMBER} ms/step, {NUMBER}x '
                   'cnn_1m', out), out
