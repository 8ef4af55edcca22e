"""What does not look like an ultrasound scan is refused (hc_jax.evaluation.scan_likeness).

Noise, salt-and-pepper, gradients, checkerboards, stripes and photographs get
status 'refused' and a plain reason, each in its own CSV row; HC18 scans, the
shipped samples and the phantoms the tests and demos use are predicted.
"""

import csv
import glob
import os

import numpy as np
from PIL import Image
import pytest

from hc_jax import archive as archive_lib
from hc_jax import predict
from hc_jax.data import hc18
from hc_jax.data import phantom
from hc_jax.evaluation import inference
from hc_jax.evaluation import loading
from hc_jax.evaluation import scan_likeness

NOT_A_SCAN = 'not an ultrasound scan'


def _phantom(width=800, height=540, seed=0):
  return phantom.render_scan(np.random.default_rng(seed), height, width,
                             0.45 * width, 0.5 * height, 0.35 * height,
                             0.3 * height, 1.0)


def _non_scans():
  """{file name: image} of inputs that are not ultrasound scans."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:540, 0:800]
  salt = np.full((540, 800), 128, np.uint8)
  draw = rng.random(salt.shape)
  salt[draw < 0.05], salt[draw > 0.95] = 0, 255
  fan = _phantom(seed=1)  # Noise filling only a phantom's fan.
  fan = np.where(fan > scan_likeness.DARK_LEVEL,
                 rng.integers(11, 256, fan.shape), fan).astype(np.uint8)
  return {
      'noise.png': rng.integers(0, 256, (540, 800), dtype=np.uint8),
      'gaussian_noise.png': np.clip(rng.normal(128, 40, (300, 400)), 0,
                                    255).astype(np.uint8),
      'noise_in_a_fan.png': fan,
      'salt_and_pepper.png': salt,
      'gradient.png': (x * 255 // 799).astype(np.uint8),
      'checkerboard.png': (255 * ((x // 16 + y // 16) % 2)).astype(np.uint8),
      'stripes.png': np.where(y % 12 < 3, 0, 255).astype(np.uint8),
  }


class _Prepared:
  def numpy(self):
    return np.full([32, 32, 1], 100, np.float32)


def _stub():
  """A Predictor on 32x32 inputs whose HC is 1000 px for every scan."""
  return inference.Predictor(
      runs=['run0'], image_size=32, resize_mode='stretch',
      normalisers_px=[10.0], _variables=[1.0],
      _forward=lambda scale, batch: {'value': batch[:, 0, 0, 0] * scale},
      _prepare=lambda image: _Prepared())


def test_non_scans_are_refused_with_a_reason_and_keep_their_row(
    monkeypatch, tmp_path, capsys):
  scans = tmp_path / 'scans'
  scans.mkdir()
  non_scans = _non_scans()
  for name, image in non_scans.items():
    Image.fromarray(image).save(scans / name)
  Image.fromarray(_phantom()).save(scans / 'phantom.png')
  monkeypatch.setattr(predict, 'load', lambda workdir: _stub())
  out = tmp_path / 'hc.csv'
  code = predict.main([f'--workdir={tmp_path}', f'--images={scans}',
                       f'--out={out}'])
  with open(out, newline='') as f:
    rows = {row['filename']: row for row in csv.DictReader(f)}
  assert code == predict.EXIT_FLAGGED
  assert sorted(rows) == sorted([*non_scans, 'phantom.png'])
  assert rows['phantom.png']['status'] == 'ok', rows['phantom.png']
  for name in non_scans:
    row = rows[name]
    assert row['status'] == 'refused', row
    assert NOT_A_SCAN in row['message'] and row['hc_px'] == '', row
  assert 'uncorrelated' in rows['noise.png']['message']
  assert 'uncorrelated' in rows['noise_in_a_fan.png']['message']
  assert 'grey levels' in rows['checkerboard.png']['message']
  assert 'no dark background' in rows['gradient.png']['message']
  assert 'refused: noise.png: neighbouring pixels are uncorrelated' in (
      capsys.readouterr().out)


def test_each_statistic_on_a_scan_and_on_what_it_catches():
  scan = scan_likeness.statistics(_phantom())
  assert scan['grey_levels'] >= scan_likeness.MIN_GREY_LEVELS
  assert scan['neighbour_correlation'] > 0.8
  assert scan['dark_corners'] == 1.0
  non_scans = {name: scan_likeness.statistics(image)
               for name, image in _non_scans().items()}
  assert abs(non_scans['noise.png']['neighbour_correlation']) < 0.05
  assert abs(non_scans['noise_in_a_fan.png']['neighbour_correlation']) < 0.05
  assert non_scans['stripes.png']['grey_levels'] == 2
  assert non_scans['gradient.png']['dark_corners'] < 0.4
  # Too few tissue pixels, or tissue of one grey: no correlation, refused.
  dot = np.zeros((540, 800), np.uint8)
  dot[:5, :5] = np.arange(25).reshape(5, 5) * 10
  assert np.isnan(scan_likeness.neighbour_correlation(dot))


def test_phantoms_of_the_tests_and_demos_are_scan_like(phantom_hc18):
  paths = sorted(glob.glob(os.path.join(phantom_hc18[0], '*', '*HC.png')))
  assert len(paths) == 66
  for path in paths:
    image, _ = hc18.read_grayscale(path)
    assert scan_likeness.refusal(image) is None, (path, scan_likeness
                                                  .statistics(image))
  for width, height in ((48, 32), (96, 64), (256, 256)):
    assert scan_likeness.refusal(_phantom(width, height)) is None


def test_the_shipped_model_refuses_noise_and_predicts_its_samples():
  """Today's shipped ensemble, on its five samples and on noise."""
  predictor = loading.load()
  with open(archive_lib.EXPECTED_CSV.format(name=archive_lib.DEFAULT_MODEL),
            newline='') as f:
    expected = list(csv.DictReader(f))
  images = [hc18.read_grayscale(os.path.join(
      archive_lib.SAMPLE_IMAGES_DIR, row['filename']))[0] for row in expected]
  noise = _non_scans()['noise.png']
  out = predictor(images + [noise],
                  [float(row['pixel_size_mm']) for row in expected] + [0.1])
  assert list(out['status'][:-1]) == [row['status'] for row in expected]
  assert set(out['status'][:-1]) == {'ok'}
  assert out['status'][-1] == 'refused' and np.isnan(out['hc_mm'][-1])
  assert NOT_A_SCAN in out['message'][-1]


def test_real_hc18_scans_are_scan_like():
  root = hc18.default_dir()
  if not root:
    pytest.skip('HC18 not found (set HC18_DIR or put it at ../shared/hc18)')
  paths = []
  for split in ('training_set', 'test_set'):
    names = sorted(p for p in glob.glob(os.path.join(root, split, '*HC.png')))
    paths += names[::max(1, len(names) // 6)][:6]
  assert len(paths) == 12
  for path in paths:
    image, _ = hc18.read_grayscale(path)
    assert scan_likeness.refusal(image) is None, (path, scan_likeness
                                                  .statistics(image))


def _cropped_to_the_sector(image):
  """The largest centred box of a scan whose corners are tissue, not the
  dark background: a scan exported cropped to its sector."""
  height, width = image.shape
  crops = []
  for share in np.linspace(0.9, 0.2, 36):
    rows, cols = int(height * share / 2), int(width * share / 2)
    crops.append(image[height // 2 - rows:height // 2 + rows,
                       width // 2 - cols:width // 2 + cols])
    if scan_likeness.dark_corners(crops[-1]) < 0.2:
      return crops[-1]
  return min(crops, key=scan_likeness.dark_corners)  # Dark fluid at a corner.


def test_real_hc18_scans_cropped_to_their_sector_are_scan_like():
  """Without dark corners (the fan cropped away) a real scan is still taken
  for one: its texture is speckle."""
  root = hc18.default_dir()
  if not root:
    pytest.skip('HC18 not found (set HC18_DIR or put it at ../shared/hc18)')
  paths = sorted(glob.glob(os.path.join(root, 'training_set', '*HC.png')))
  paths = paths[::max(1, len(paths) // 40)][:40]
  assert len(paths) == 40
  cropped = 0
  for path in paths:
    crop = _cropped_to_the_sector(hc18.read_grayscale(path)[0])
    statistics = scan_likeness.statistics(crop)
    # A scan with dark fluid at every box's corner is taken by dark_corners.
    cropped += statistics['dark_corners'] < scan_likeness.MIN_DARK_CORNERS
    assert scan_likeness.refusal(crop) is None, (path, statistics)
  assert cropped >= 30  # Most: what dark_corners alone used to refuse.


def test_photographs_and_gradients_without_dark_corners_are_still_refused():
  matplotlib = pytest.importorskip('matplotlib')
  data = os.path.join(os.path.dirname(matplotlib.__file__), 'mpl-data',
                      'sample_data')
  for name in ('grace_hopper.jpg', 'Minduka_Present_Blue_Pack.png'):
    photo = np.asarray(Image.open(os.path.join(data, name)).convert('L'))
    reason = scan_likeness.refusal(photo)
    assert reason and 'no speckle' in reason, (name, reason)
  y, x = np.mgrid[0:540, 0:800]
  for gradient in (x * 255 // 799, 127 + 127 * np.sin(x / 40) * np.cos(
      y / 30), y * 255 // 539):
    gradient = np.asarray(gradient).astype(np.uint8)
    assert NOT_A_SCAN in scan_likeness.refusal(gradient)
    assert np.isnan(scan_likeness.speckle_correlation(gradient))
  # Noise cropped to any frame stays refused, on its correlation.
  noise = _non_scans()['noise.png'][100:300, 200:500]
  assert 'uncorrelated' in scan_likeness.refusal(noise)


def test_no_scan_check_measures_what_the_check_would_refuse(monkeypatch,
                                                           tmp_path):
  scans = tmp_path / 'scans'
  scans.mkdir()
  Image.fromarray(_non_scans()['gradient.png']).save(scans / 'gradient.png')
  Image.fromarray(np.full((64, 64), 90, np.uint8)).save(scans / 'flat.png')
  Image.fromarray(_phantom(20, 20)).save(scans / 'small.png')
  monkeypatch.setattr(predict, 'load', lambda workdir: _stub())
  rows = {}
  for flags in ((), ('--no-scan-check',)):
    out = tmp_path / f'hc{len(flags)}.csv'
    predict.main([f'--workdir={tmp_path}', f'--images={scans}',
                  f'--out={out}', *flags])
    with open(out, newline='') as f:
      rows[flags] = {row['filename']: row for row in csv.DictReader(f)}
  assert rows[()]['gradient.png']['status'] == 'refused'
  measured = rows[('--no-scan-check',)]
  assert measured['gradient.png']['status'] != 'refused'
  assert measured['gradient.png']['hc_px'] != ''
  # What cannot be measured at all is refused either way.
  assert measured['flat.png']['status'] == 'refused'
  assert measured['small.png']['status'] == 'refused'
