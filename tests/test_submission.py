"""Tests for `python -m hc_jax.predict --submission`: the HC18 challenge CSV.

A tiny ellipse model (`hcnet_ellipse`, 32x32, one epoch) is trained on the
phantom HC18 copy; its predictions for the phantom test set are written as a
submission and checked against the prediction CSV. The refusals (no pixel
size, a label-only model, clashing names, an image without a prediction)
are exit codes and one-line messages.
"""

import csv
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from hc_jax import predict
from hc_jax import workdir as workdir_lib
from hc_jax.data import ellipse as ellipse_lib
from hc_jax.data import hc18
from hc_jax.evaluation import inference
from hc_jax.evaluation import scan_files
from hc_jax.training import train

HEADER = ['filename', 'center_x_mm', 'center_y_mm', 'semi_axes_a_mm',
          'semi_axes_b_mm', 'angle_rad']


@pytest.fixture(scope='module')
def ellipse_run(phantom_hc18, tmp_path_factory):
  """A finished tiny run of the ellipse model."""
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.data.hc18_dir, config.data.cache_dir = phantom_hc18
  config.model = 'hcnet_ellipse'
  config.image_size = 32
  config.num_epochs = 1
  config.batch_size = 8
  config.eval_batch_size = 8
  workdir = str(tmp_path_factory.mktemp('ellipse_run') / 'run')
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture
def scans(phantom_hc18, tmp_path):
  """(images dir, pixel-size CSV, names): the phantom test set one folder
  down, so that the prediction rows are `test_set/NNN_HC.png`."""
  root = tmp_path / 'scans'
  shutil.copytree(os.path.join(phantom_hc18[0], 'test_set'),
                  root / 'test_set')
  sizes = tmp_path / 'sizes.csv'
  shutil.copy(os.path.join(phantom_hc18[0], 'test_set_pixel_size.csv'), sizes)
  return root, sizes, sorted(os.listdir(root / 'test_set'))


def _read(path):
  with open(path, newline='') as f:
    return list(csv.reader(f))


def _main(*flags):
  return predict.main([str(flag) for flag in flags])


def test_submission_format_and_round_trip(ellipse_run, scans, tmp_path,
                                          capsys):
  root, sizes, names = scans
  out, submission = tmp_path / 'p.csv', tmp_path / 'submission.csv'
  code = _main(f'--workdir={ellipse_run}', f'--images={root}',
               f'--pixel-sizes={sizes}', f'--out={out}',
               f'--submission={submission}')
  assert code in (0, 1), capsys.readouterr().err
  table = _read(submission)
  assert table[0] == HEADER
  assert [row[0] for row in table[1:]] == names  # Base names, every image.
  assert all(len(row) == 6 for row in table)
  values = np.array([[float(cell) for cell in row[1:]] for row in table[1:]])
  assert np.isfinite(values).all()
  assert (values[:, 2] >= values[:, 3]).all() and (values[:, 3] > 0).all()
  assert ((values[:, 4] >= 0) & (values[:, 4] < np.pi)).all()
  # The written ellipse is the prediction CSV's, and its perimeter its HC.
  with open(out, newline='') as f:
    rows = {os.path.basename(r['filename']): r for r in csv.DictReader(f)}
  for row, value in zip(table[1:], values):
    predicted = rows[row[0]]
    perimeter_mm = ellipse_lib.ramanujan_perimeter(value[2], value[3])
    assert perimeter_mm == pytest.approx(float(predicted['hc_mm']), abs=0.05)
    pixel_size = float(predicted['pixel_size_mm'])
    in_mm = [float(predicted[key]) * pixel_size for key in (
        'center_x_px', 'center_y_px', 'semi_axis_a_px', 'semi_axis_b_px')]
    np.testing.assert_allclose(value[:4], in_mm, atol=2e-3)
    assert value[4] == pytest.approx(float(predicted['angle_rad']), abs=1e-5)
  assert f'and {submission}' in capsys.readouterr().out


def test_submission_needs_every_pixel_size(ellipse_run, scans, tmp_path,
                                           capsys):
  root, sizes, names = scans
  out, submission = tmp_path / 'p.csv', tmp_path / 'submission.csv'
  flags = (f'--workdir={ellipse_run}', f'--images={root}', f'--out={out}',
           f'--submission={submission}')
  assert _main(*flags) == 2  # No CSV beside the images, none given.
  errors = [l for l in capsys.readouterr().err.splitlines()
            if l.startswith('error')]
  assert errors == [f'error: --submission needs the pixel size of every '
                    f'image; none for test_set/{names[0]} and 5 more (give '
                    '--pixel-sizes=CSV)']
  # One image missing from the CSV.
  lines = sizes.read_text().splitlines()
  partial = tmp_path / 'partial.csv'
  partial.write_text('\n'.join(l for l in lines if names[0] not in l) + '\n')
  assert _main(*flags, f'--pixel-sizes={partial}') == 2
  assert f'none for test_set/{names[0]}' in capsys.readouterr().err
  assert not out.exists() and not submission.exists()


def test_submission_needs_an_ellipse_model(scans, tmp_path, monkeypatch,
                                           capsys):
  """A label-only model (a stub Predictor that predicts HC only)."""
  root, sizes, _ = scans
  label_model = inference.Predictor(
      runs=['run'], image_size=32, resize_mode='stretch',
      normalisers_px=[1000.0], _variables=[None],
      _forward=lambda variables, batch: {'value': np.full(len(batch), 0.5)},
      _prepare=lambda image: None)
  monkeypatch.setattr(predict, 'load', lambda workdir: label_model)
  out, submission = tmp_path / 'p.csv', tmp_path / 'submission.csv'
  code = _main(f'--workdir={tmp_path}', f'--images={root}',
               f'--pixel-sizes={sizes}', f'--out={out}',
               f'--submission={submission}')
  assert code == 2
  err = capsys.readouterr().err.splitlines()
  assert ' scan file(s): loading ' in err[0], err
  assert err[-1].startswith('error: --submission needs a model that '
                            'predicts the ellipse'), err
  assert not out.exists() and not submission.exists()


def test_submission_needs_distinct_base_names(ellipse_run, scans, tmp_path,
                                              capsys):
  root, sizes, names = scans
  (root / 'again').mkdir()
  shutil.copy(root / 'test_set' / names[0], root / 'again' / names[0])
  submission = tmp_path / 'submission.csv'
  assert _main(f'--workdir={ellipse_run}', f'--images={root}',
               f'--pixel-sizes={sizes}', f'--out={tmp_path / "p.csv"}',
               f'--submission={submission}') == 2
  assert 'needs distinct file names' in capsys.readouterr().err
  assert not submission.exists()


def test_no_submission_when_an_image_is_not_predicted(ellipse_run, scans,
                                                      tmp_path, capsys):
  root, sizes, _ = scans
  Image.fromarray(np.full([540, 800], 90, np.uint8)).save(
      root / 'test_set' / 'blank.png')
  with open(sizes, 'a') as f:
    f.write('blank.png,0.1\n')
  out, submission = tmp_path / 'p.csv', tmp_path / 'submission.csv'
  code = _main(f'--workdir={ellipse_run}', f'--images={root}',
               f'--pixel-sizes={sizes}', f'--out={out}',
               f'--submission={submission}')
  assert code == 1
  assert out.exists() and not submission.exists()
  assert (f'error: --submission {submission} not written: test_set/blank.png '
          'has no ellipse') in capsys.readouterr().err


def test_ellipse_run_reproduces_its_test_predictions(ellipse_run,
                                                     phantom_hc18):
  """Each scan's own size gives its resize: the trainer's HC again."""
  with open(os.path.join(ellipse_run, workdir_lib.PREDICTIONS_FILE),
            newline='') as f:
    rows = list(csv.DictReader(f))
  images = [hc18.read_grayscale(os.path.join(
      phantom_hc18[0], 'training_set', r['filename']))[0] for r in rows]
  predictor = predict.load(ellipse_run)
  assert predictor.predicts_ellipse
  out = predictor(images, [float(r['pixel_size_mm']) for r in rows])
  np.testing.assert_allclose(out['hc_mm'],
                             [float(r['hc_mm_pred']) for r in rows],
                             atol=1e-3)
  assert out['ellipse_px'].shape == (len(rows), 5)


# The committed HC18 challenge submissions (docs/results.md says how they
# were made): the ellipse of each of the 335 test scans of the copy the
# results were measured on, by the dense models and by hcnet_ellipse.
SUBMISSIONS = [os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'submissions', f'hc18_test_{name}.csv')
               for name in ('hcnet_mask_refine', 'hcnet_mask', 'hcnet_ellipse')]
SUBMISSION_HEADER = ['filename', 'center_x_mm', 'center_y_mm',
                     'semi_axes_a_mm', 'semi_axes_b_mm', 'angle_rad']


@pytest.mark.parametrize('submission', SUBMISSIONS,
                         ids=[os.path.basename(p) for p in SUBMISSIONS])
def test_committed_submission_is_in_the_challenge_format(submission):
  with open(submission, newline='') as f:
    rows = list(csv.reader(f))
  assert rows[0] == SUBMISSION_HEADER
  body = rows[1:]
  assert len(body) == 335
  names = [row[0] for row in body]
  assert len(set(names)) == len(names)
  assert all(name.endswith('_HC.png') and '/' not in name for name in names)
  values = np.array([[float(v) for v in row[1:]] for row in body])
  assert np.isfinite(values).all()
  centre, a, b, angle = values[:, :2], values[:, 2], values[:, 3], values[:, 4]
  assert (centre > 0).all() and (b > 0).all() and (a >= b).all()
  assert ((angle >= 0) & (angle < np.pi)).all()
  # In mm, not px: HC18's heads measure 44-346 mm (training set), so a
  # perimeter outside 20-500 mm means a unit or axis mix-up. (The model's
  # errors can leave 44-346 mm; docs/results.md lists the scans it did.)
  hc_mm = ellipse_lib.ramanujan_perimeter(a, b)
  assert ((hc_mm > 20) & (hc_mm < 500)).all(), (hc_mm.min(), hc_mm.max())


REAL_HC18 = hc18.default_dir()


@pytest.mark.skipif(REAL_HC18 is None, reason='HC18 copy not found')
@pytest.mark.parametrize('submission', SUBMISSIONS,
                         ids=[os.path.basename(p) for p in SUBMISSIONS])
def test_committed_submission_covers_the_test_set_inside_each_scan(submission):
  with open(submission, newline='') as f:
    rows = {row['filename']: row for row in csv.DictReader(f)}
  test_dir = os.path.join(REAL_HC18, 'test_set')
  names = sorted(n for n in os.listdir(test_dir) if n.endswith('HC.png'))
  assert sorted(rows) == names
  pixel_sizes = scan_files.read_pixel_sizes(
      os.path.join(REAL_HC18, 'test_set_pixel_size.csv'))
  for name in names:
    with Image.open(os.path.join(test_dir, name)) as image:
      width, height = image.size
    size = pixel_sizes[name]
    x = float(rows[name]['center_x_mm']) / size
    y = float(rows[name]['center_y_mm']) / size
    assert 0 <= x < width and 0 <= y < height, (name, x, y, width, height)
