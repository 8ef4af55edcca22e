"""The dense model: targets, moments, geometry, declared kind, quality, training."""

import csv
import functools
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from conftest import tiny_mask_config
from hc_jax import losses
from hc_jax import models
from hc_jax import workdir as workdir_lib
from hc_jax.data import augment
from hc_jax.data import ellipse as ellipse_lib
from hc_jax.data import hc18
from hc_jax.data import phantom
from hc_jax.data import cache as prepare
from hc_jax.nets import ellipse_head
from hc_jax.nets import hcnet_mask
from hc_jax.nets import mask_head
from hc_jax.training import config_check
from hc_jax.training import step as step_lib
from hc_jax.training import train


def _hc18_dir() -> Path:
  if os.environ.get('HC18_DIR'):
    return Path(os.environ['HC18_DIR'])
  return Path(__file__).resolve().parents[2] / 'shared' / 'hc18'


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _target_hc_px_jit(ellipses_px, resize, rows, cols, stride, margin_cells):
  # Jitted, as in the training step: eagerly, the hundreds of masks take
  # several times longer.
  ellipse_in = ellipse_head.to_input_pixels(ellipses_px, resize)
  target = mask_head.render_ellipses(ellipse_in, rows, cols, stride,
                                     margin_cells)
  _, _, cov = mask_head.raw_moments(target, stride, margin_cells)
  return mask_head.hc_px_from_moments(cov, resize)


def _target_hc_px(ellipses_px, original_hw, input_hw, mode, stride=2,
                  margin_cells=4):
  """HC (original px) of the moments of each rendered target mask."""
  resize = prepare.resize_geometry(np.asarray(original_hw), input_hw, mode)
  rows = -(-input_hw[0] // stride) + 2 * margin_cells
  cols = -(-input_hw[1] // stride) + 2 * margin_cells
  return np.asarray(_target_hc_px_jit(
      jnp.asarray(ellipses_px, jnp.float32), jnp.asarray(resize, jnp.float32),
      rows, cols, stride, margin_cells))


@pytest.mark.parametrize('mode', ['stretch', 'letterbox'])
@pytest.mark.xla_optimized  # Fused, the 200 masks take a fraction of the time.
def test_target_moments_reproduce_the_phantoms_hc(mode):
  rng = np.random.default_rng(0)
  count = 200
  ellipses, sizes = [], []
  for _ in range(count):
    height, width = 540, 800
    a = rng.uniform(60, 230)
    ellipses.append([rng.uniform(300, 500), rng.uniform(230, 310), a,
                     a * rng.uniform(0.65, 1.0), rng.uniform(0, math.pi)])
    sizes.append((height, width))
  ellipses = np.asarray(ellipses)
  pixel_mm = rng.uniform(0.05, 0.3, count)
  hc_true = np.asarray(ellipse_lib.ramanujan_perimeter(ellipses[:, 2],
                                                       ellipses[:, 3]))
  hc = _target_hc_px(ellipses, sizes, (128, 192), mode)
  error_mm = np.abs(hc - hc_true) * pixel_mm
  assert error_mm.max() < 0.1, error_mm.max()
  # Without the cell correction the moments are biased outwards.
  assert mask_head.CELL_VARIANCE < 0


@pytest.mark.xla_optimized  # Fused, the 999 masks take a fraction of the time.
def test_target_moments_reproduce_hc18_csv_on_every_training_image():
  root = _hc18_dir()
  csv_path = root / hc18.SPLITS['train'][1]
  if not csv_path.is_file():
    pytest.skip(f'HC18 not found at {csv_path} (set HC18_DIR)')
  records, problems = hc18.scan_split(str(root), 'train')
  assert not problems, problems[:5]
  ellipses, sizes, hc_px, pixel_mm = [], [], [], []
  for record in records:
    fit = record.ellipse
    ellipses.append([fit.center_x, fit.center_y, fit.semi_axis_a,
                     fit.semi_axis_b, fit.angle_rad])
    with Image.open(record.image_path) as image:
      sizes.append(image.size[::-1])
    hc_px.append(record.hc_px)
    pixel_mm.append(record.pixel_size_mm)
  hc = _target_hc_px(np.asarray(ellipses), sizes, (128, 192), 'stretch')
  error_mm = np.abs(hc - np.asarray(hc_px)) * np.asarray(pixel_mm)
  assert len(records) >= 100
  assert error_mm.max() < 0.1, (records[int(error_mm.argmax())].filename,
                                error_mm.max())


def test_in_graph_hc_equals_an_offline_fit_of_the_same_soft_mask():
  rng = np.random.default_rng(1)
  prob = rng.uniform(0, 1, (3, 20, 30)).astype(np.float32) ** 4
  prob[:, 5:15, 8:22] = 0.9
  resize = np.array([[0.3, 0.25, 1.0, -2.0]] * 3, np.float32)
  _, center, cov = mask_head.raw_moments(jnp.asarray(prob), 2, 3)
  hc = np.asarray(mask_head.hc_px_from_moments(cov, resize))
  # Offline: NumPy moments of the same map on the same cell centres, the
  # ellipse by an eigen-decomposition, mapped to original pixels, Ramanujan.
  x = 2 * (np.arange(30) - 3) + 0.5
  y = 2 * (np.arange(20) - 3) + 0.5
  xx, yy = np.meshgrid(x, y)
  for i in range(3):
    w = prob[i].astype(np.float64)
    mx, my = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    d = np.stack([(xx - mx).ravel(), (yy - my).ravel()])
    sigma = (d * w.ravel()) @ d.T / w.sum() + mask_head.CELL_VARIANCE * 4 * np.eye(2)
    np.testing.assert_allclose(np.asarray(center[i]), [mx, my], rtol=1e-5)
    scale = np.diag(1 / resize[i, :2].astype(np.float64))
    sigma_original = scale @ sigma @ scale
    lam = np.linalg.eigvalsh(sigma_original)
    a, b = 2 * np.sqrt(lam[1]), 2 * np.sqrt(lam[0])
    np.testing.assert_allclose(hc[i], ellipse_lib.ramanujan_perimeter(a, b),
                               rtol=1e-5)
    ell = np.asarray(mask_head.ellipse_from_moments(center[i], cov[i]))
    lam_in = np.linalg.eigvalsh(sigma)
    np.testing.assert_allclose(ell[2:4], 2 * np.sqrt(lam_in[::-1]), rtol=1e-5)


@pytest.mark.parametrize('mode', ['stretch', 'letterbox'])
@pytest.mark.parametrize('input_hw', [(64, 96), (72, 50), (61, 83)])
def test_geometry_is_exact_under_the_resize(mode, input_hw):
  """A rendered ellipse's moments give back the original ellipse and HC for
  any input size (H != W, odd sizes) and both resize modes."""
  original = np.array([[540, 800], [600, 450]])
  ellipses = np.array([[400, 270, 180, 130, 0.6], [220, 300, 150, 140, 2.0]])
  resize = prepare.resize_geometry(original, input_hw, mode).astype(np.float32)
  ellipse_in = ellipse_head.to_input_pixels(jnp.asarray(ellipses, jnp.float32),
                                            resize)
  stride, cells = 1, 4
  rows, cols = input_hw[0] + 2 * cells, input_hw[1] + 2 * cells
  target = mask_head.render_ellipses(ellipse_in, rows, cols, stride, cells)
  _, center, cov = mask_head.raw_moments(target, stride, cells)
  fitted_in = mask_head.ellipse_from_moments(center, cov)
  fitted = np.asarray(ellipse_head.to_original_pixels(fitted_in, resize))
  np.testing.assert_allclose(fitted[:, :2], ellipses[:, :2], atol=1.0)
  hc = np.asarray(mask_head.hc_px_from_moments(cov, resize))
  true = ellipse_lib.ramanujan_perimeter(ellipses[:, 2], ellipses[:, 3])
  np.testing.assert_allclose(hc, true, rtol=5e-3)


@pytest.mark.parametrize('input_hw', [(64, 96), (50, 70), (33, 47)])
def test_the_model_takes_any_input_size(input_hw):
  model = hcnet_mask.HCNetMask(widths=(4, 8, 8, 8), stride=2, margin=4)
  x = jnp.zeros((2, *input_hw, 1))
  variables = models.init_variables(model, x)
  out = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  assert out['logits'].shape == (2, -(-input_hw[0] // 2) + 4,
                                 -(-input_hw[1] // 2) + 4)
  assert out['ellipse_in'].shape == (2, 5) and out['quality'].shape == (2,)
  assert np.all(np.isfinite(np.asarray(out['ellipse_in'])))


def test_the_model_with_attention_runs_and_has_its_parameters():
  model = hcnet_mask.HCNetMask(widths=(4, 8, 8, 8), attention=True)
  x = jnp.zeros((1, 48, 64, 1))
  variables = models.init_variables(model, x)
  assert 'attention' in variables['params']
  plain = hcnet_mask.HCNetMask(widths=(4, 8, 8, 8))
  plain_vars = jax.eval_shape(functools.partial(plain.init, train=False),
                              jax.random.key(0), x)
  assert models.count_params(variables) > models.count_params(plain_vars)


@pytest.mark.parametrize('option, message', [
    (dict(stride=3), 'stride'), (dict(stride=8, widths=(4, 8, 8)), 'stride'),
    (dict(margin=3), 'margin'), (dict(moments='median'), 'moments'),
    (dict(widths=(4,)), 'widths'), (dict(widths=(0, 0, 0)), 'widths')])
def test_bad_settings_are_one_clear_error(option, message):
  with pytest.raises(hcnet_mask.HCNetMaskError, match=message):
    hcnet_mask.HCNetMask(**{'widths': (4, 8, 8, 8), **option})


def test_every_model_declares_its_kind():
  kinds = {name: models.output_kind(name) for name in models.MODELS}
  assert kinds['hcnet'] == 'hc' and kinds['cnn_263k'] == 'hc'
  assert kinds['hcnet_ellipse'] == 'ellipse'
  assert kinds['hcnet_mask'] == 'mask'
  assert set(kinds.values()) <= set(models.OUTPUT_KINDS)
  config = ml_collections.ConfigDict({'model': 'hcnet_mask'})
  assert models.output_kind(config) == 'mask'
  assert models.output_kind(hcnet_mask.HCNetMask()) == 'mask'


def test_the_kind_is_declared_not_inferred_from_the_output_shape(monkeypatch):
  """A label model whose class says 'ellipse' is trained as one: the
  training code reads the declaration, not the output's rank."""
  class Undeclared(models.MODELS['hcnet'].__mro__[1]):  # No output_kind.
    output_kind = None
  monkeypatch.setitem(models.MODELS, 'undeclared', Undeclared)
  with pytest.raises(ValueError, match='declares no output_kind'):
    models.output_kind('undeclared')
  config = ml_collections.ConfigDict({'model': 'hcnet_ellipse',
                                      'ellipse_weight': 1.0})
  loss_of, hc_of = step_lib.output_functions(config)
  raw = jnp.zeros((2, 6))
  resize = jnp.asarray([[0.25, 0.25, 0.0, 0.0]] * 2)
  hc = hc_of(raw, resize, 100.0, (32, 48))
  assert hc.shape == (2,)


def _ellipse_mask(rows=40, cols=60):
  ellipse = jnp.asarray([[60.0, 40.0, 30.0, 20.0, 0.5]])
  return mask_head.render_ellipses(ellipse, rows, cols, 2, 0)


def test_quality_is_monotone_in_a_corrupted_mask():
  clean = _ellipse_mask()
  rng = np.random.default_rng(0)
  blob = np.zeros(clean.shape, np.float32)
  blob[0, 2:8, 48:56] = 1.0  # A stray blob far from the head.
  noise = rng.uniform(0, 1, clean.shape).astype(np.float32)
  qualities = []
  for level in (0.0, 0.1, 0.2, 0.3, 0.4):
    corrupted = jnp.clip(clean + level * blob + 0.3 * level * noise, 0, 1)
    _, center, cov = mask_head.raw_moments(corrupted, 2, 0)
    qualities.append(float(mask_head.quality(corrupted, center, cov, 2, 0)[0]))
  assert qualities[0] > 0.97
  assert all(a > b for a, b in zip(qualities, qualities[1:])), qualities


def test_window_moments_ignore_a_stray_blob():
  clean = _ellipse_mask()
  blob = np.zeros(clean.shape, np.float32)
  blob[0, 1:6, 52:59] = 1.0
  corrupted = jnp.clip(clean + blob, 0, 1)
  _, _, cov_clean = mask_head.moments(clean, 2, 0, 'plain')
  _, _, cov_plain = mask_head.moments(corrupted, 2, 0, 'plain')
  _, _, cov_window = mask_head.moments(corrupted, 2, 0, 'window')
  resize = jnp.asarray([[1.0, 1.0, 0.0, 0.0]])
  hc = [float(mask_head.hc_px_from_moments(c, resize)[0])
        for c in (cov_clean, cov_plain, cov_window)]
  assert abs(hc[2] - hc[0]) < 0.25 * abs(hc[1] - hc[0]), hc


def test_hc_gradient_is_finite_for_a_circle():
  cov = jnp.asarray([[[25.0, 0.0], [0.0, 25.0]]])
  grad = jax.grad(lambda c: mask_head.hc_px_from_moments(
      c, jnp.asarray([[1.0, 1.0, 0.0, 0.0]])).sum())(cov)
  assert np.all(np.isfinite(np.asarray(grad)))


def _phantoms(count, seed=0):
  rng = np.random.default_rng(seed)
  images, ellipses = [], []
  for _ in range(count):
    a = rng.uniform(14, 26)
    ellipse = [rng.uniform(38, 58), rng.uniform(28, 36), a,
               a * rng.uniform(0.7, 0.95), rng.uniform(0, math.pi)]
    scan = phantom.render_scan(rng, 64, 96, *ellipse).astype(np.float32)
    images.append(scan.reshape(32, 2, 48, 2).mean(axis=(1, 3)))
    ellipses.append(ellipse)
  ellipses = np.asarray(ellipses, np.float32)
  return {'image': np.round(np.asarray(images))[..., None].astype(np.uint8),
          'ellipse': ellipses,
          'hc_px': np.asarray(augment.ramanujan_perimeter(ellipses[:, 2],
                                                          ellipses[:, 3])),
          'resize': prepare.resize_geometry(np.array([[64, 96]] * count),
                                            (32, 48), 'stretch')}


def train_on_phantoms(steps, mask_loss, **options):
  """A tiny hcnet_mask (`options` added to its fields) trained `steps` steps
  on eight phantoms with the kind's own loss (`mask_loss` weights).

  Returns:
    `(losses, before, after)`: the loss of every step, and the mean relative
    HC error on the eight before and after training.
  """
  batch = _phantoms(8)
  model = hcnet_mask.HCNetMask(widths=(8, 16, 16, 16), stride=2, margin=4,
                               moments='window', layers='fast', **options)
  variables = models.init_variables(model, jnp.zeros((1, 32, 48, 1)))
  state = step_lib.TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      batch_stats=variables['batch_stats'], tx=optax.adam(3e-3))
  normaliser = float(batch['hc_px'].max())
  member = {'key': jax.random.key(0), 'normaliser_px': jnp.float32(normaliser)}
  config = ml_collections.ConfigDict({
      'model': 'hcnet_mask',
      'model_options': {'stride': 2, 'margin': 4, **options},
      'mask_loss': mask_loss})
  loss_of, hc_of = step_lib.output_functions(config)
  step = jax.jit(functools.partial(
      step_lib.train_step, loss_fn=losses.get_loss('mae'),
      augment=augment.NO_AUGMENT, loss_of=loss_of))

  @jax.jit
  def hc_of_batch(state):
    out, _ = state.apply_fn(
        {'params': state.params, 'batch_stats': state.batch_stats},
        augment.zscore_batch(batch['image']), train=True,
        mutable=['batch_stats'])
    return hc_of(out, batch['resize'], normaliser, (32, 48))

  def hc_error(state):
    predicted = np.asarray(hc_of_batch(state))
    return float(np.mean(np.abs(predicted * normaliser - batch['hc_px']) /
                         batch['hc_px']))

  before, history = hc_error(state), []
  for _ in range(steps):
    state, loss = step(state, batch, member)
    history.append(float(loss))
  return np.asarray(history), before, hc_error(state)


def test_the_mask_model_learns_eight_phantoms():
  history, before, after = train_on_phantoms(
      150, {'bce': 1.0, 'dice': 1.0, 'hc': 1.0, 'ellipse': 0.1})
  assert np.all(np.isfinite(history))
  assert after < 0.1 and after < before / 3, (before, after)


@pytest.fixture(scope='module')
def mask_run(phantom_hc18, tmp_path_factory):
  """A finished tiny hcnet_mask run on the phantoms (32x48, 2 epochs)."""
  config = tiny_mask_config('hcnet_mask', *phantom_hc18)
  workdir = str(tmp_path_factory.mktemp('mask_run') / 'fold0')
  train.train_and_evaluate(config, workdir)
  return workdir


def test_predict_reproduces_a_mask_runs_test_predictions(mask_run, phantom_hc18):
  from hc_jax.evaluation import loading  # pylint: disable=import-outside-toplevel
  with open(os.path.join(mask_run, workdir_lib.PREDICTIONS_FILE), newline='') as f:
    rows = list(csv.DictReader(f))
  images = [hc18.read_grayscale(os.path.join(
      phantom_hc18[0], 'training_set', r['filename']))[0] for r in rows]
  pixel_sizes = [float(r['pixel_size_mm']) for r in rows]
  predictor = loading.load(mask_run)
  assert predictor.kind.name == 'mask' and predictor.predicts_ellipse
  out = predictor(images, pixel_sizes, keep_masks=True)
  np.testing.assert_allclose(out['hc_mm'], [float(r['hc_mm_pred'])
                                            for r in rows], atol=1e-2)
  assert np.all((out['quality'] >= 0) & (out['quality'] <= 1))
  # The reported ellipse is the moments' ellipse: its perimeter is the HC.
  perimeter = ellipse_lib.ramanujan_perimeter(out['ellipse_px'][:, 2],
                                              out['ellipse_px'][:, 3])
  np.testing.assert_allclose(perimeter, out['hc_px'], rtol=1e-4)
  assert len(out['mask_outline']) == len(images)
  # Every quality below the threshold makes the prediction 'uncertain'.
  strict = predictor(images, pixel_sizes, min_quality=1.0)
  was_ok = out['status'] == 'ok'
  assert np.all(strict['status'][was_ok] == 'uncertain')
  assert np.all(strict['status'][~was_ok] == out['status'][~was_ok])


def test_low_quality_is_uncertain():
  from hc_jax.evaluation import inference  # pylint: disable=import-outside-toplevel
  predictor = inference.Predictor(
      runs=['run'], image_size=32, resize_mode='stretch',
      normalisers_px=[1.0], _variables=[None], _forward=None, _prepare=None,
      kind='mask', mask_grid=(2, 2))
  check = functools.partial(predictor._check, 1000.0, 150.0, math.nan,
                            (540, 800), 10.0)
  assert check(0.9, 0.8) == ('ok', '')
  status, message = check(0.7, 0.8)
  assert status == 'uncertain' and 'quality 0.700 < 0.8' in message
  assert check(math.nan, 0.8) == ('ok', '')  # No signal: nothing to flag.


def test_predict_cli_writes_quality_and_mask_overlays(mask_run, phantom_hc18,
                                                      tmp_path):
  from hc_jax import predict  # pylint: disable=import-outside-toplevel
  out, overlays = tmp_path / 'hc.csv', tmp_path / 'overlays'
  code = predict.main([f'--workdir={mask_run}',
                       f'--images={phantom_hc18[0]}/test_set',
                       f'--out={out}', f'--overlays={overlays}', '--tta-flip'])
  assert code in (0, 1)
  with open(out, newline='') as f:
    rows = list(csv.DictReader(f))
  assert rows and 'quality' in rows[0] and 'center_x_px' in rows[0]
  assert all(r['quality'] for r in rows if r['status'] != 'refused')
  assert len(os.listdir(overlays)) == len(rows)
  assert predict.main([f'--workdir={mask_run}',
                       f'--images={phantom_hc18[0]}/test_set',
                       f'--out={out}', '--min-quality=2']) == 2


@pytest.mark.parametrize('field, value, message', [
    ('mask_loss.dice', -1.0, 'mask_loss.dice must be a finite number >= 0'),
    ('mask_loss.bce', float('nan'), 'mask_loss.bce must be a finite'),
    ('model_options.stride', 3, 'stride must be a power of two')])
def test_bad_mask_settings_fail_before_any_work(field, value, message):
  from configs import hcnet_mask as mask_config  # pylint: disable=import-outside-toplevel
  config = mask_config.get_config()
  group, key = field.split('.')
  config[group][key] = value
  with pytest.raises(ValueError, match=message):
    config_check.check_config(config)
  config = mask_config.get_config()
  config.mask_loss.focal = 1.0
  with pytest.raises(ValueError, match='mask_loss has no terms'):
    config_check.check_config(config)
