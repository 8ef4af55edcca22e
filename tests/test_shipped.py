"""The model and sample scans shipped with the package."""

import configparser
import csv
import glob
import json
import math
import os
import re

import numpy as np
import pytest

from conftest import REPO
from hc_jax import archive as archive_lib
from hc_jax import predict
from hc_jax import shipped
from hc_jax import workdir as workdir_lib
from hc_jax.data import hc18
from hc_jax.evaluation import output_files

MAX_BYTES = 20_000_000
# Parameters per member of each shipped model.
PARAMS = {'hcnet_mask': 308_985, 'hcnet_mask_label': 308_985,
          'hcnet_mask_refine': 311_898}
TOLERANCE_MM = 0.05


def _expected(name=archive_lib.DEFAULT_MODEL):
  with open(archive_lib.EXPECTED_CSV.format(name=name), newline='') as f:
    return list(csv.DictReader(f))


def test_archives_are_plain_arrays_and_json_within_the_size_budget():
  assert archive_lib.DEFAULT_MODEL in archive_lib.names()
  total = 0
  for name in archive_lib.names():
    path = archive_lib.path_of(name)
    total += os.path.getsize(path)
    with np.load(path, allow_pickle=False) as archive:  # No pickle needed.
      arrays = {key: archive[key] for key in archive.files}
    meta = json.loads(str(arrays.pop('meta')))
    assert meta['format'] == archive_lib.FORMAT and meta['name'] == name
    assert all(a.dtype != object for a in arrays.values())
    floats = {a.dtype for a in arrays.values()
              if np.issubdtype(a.dtype, np.floating)}
    assert floats == {np.dtype(meta['storage_dtype'])}
    for member, config, result in zip(meta['members'], meta['configs'],
                                      meta['results']):
      assert config['model'] == result['model']
      assert result['normaliser_px'] > 0
      assert result['train_hc_mm_min'] < result['train_hc_mm_max']
      assert result['source_digest'] == config['source_digest']
      params = sum(a.size for key, a in arrays.items()
                   if key.startswith(f'{member}/params/'))
      assert params == PARAMS[name], name
      assert any(key.startswith(f'{member}/batch_stats/') for key in arrays)
    assert 'HC18' in meta['provenance']['data']
  assert total <= MAX_BYTES
  meta = archive_lib.read().meta
  assert meta['members'] == [f'fold{k}' for k in range(5)]
  assert meta['cv']['num_images'] == 900
  assert 0 < meta['cv']['mae_mm'] < 5


def test_package_data_declares_the_shipped_files():
  parser = configparser.ConfigParser()
  parser.read(os.path.join(REPO, 'setup.cfg'))
  patterns = parser['options.package_data']['hc_jax'].split()
  declared = {os.path.normpath(path) for pattern in patterns
              for path in glob.glob(os.path.join(REPO, 'hc_jax', pattern))}
  wanted = glob.glob(os.path.join(archive_lib.SHIPPED_DIR, '*.npz')) + glob.glob(
      os.path.join(archive_lib.SAMPLES_DIR, '**', '*.*'), recursive=True)
  assert wanted and {os.path.normpath(p) for p in wanted} <= declared


def test_samples_have_pixel_sizes_and_attribution():
  names = sorted(os.listdir(archive_lib.SAMPLE_IMAGES_DIR))
  assert len(names) == 5
  with open(os.path.join(archive_lib.SAMPLES_DIR, 'test_set_pixel_size.csv')) as f:
    sizes = {row['filename']: float(row['pixel size(mm)'])
             for row in csv.DictReader(f)}
  assert sorted(sizes) == names
  assert sorted(row['filename'] for row in _expected()) == names
  with open(os.path.join(archive_lib.SAMPLES_DIR, 'ATTRIBUTION.md')) as f:
    text = f.read()
  assert 'CC BY 4.0' in text and '1327317' in text


def test_unknown_or_damaged_archives_are_clear_errors(tmp_path):
  with pytest.raises(workdir_lib.PredictError, match='no shipped model'):
    archive_lib.read('no_such_model')
  bad = tmp_path / 'bad.npz'
  np.savez(bad, meta=np.array(json.dumps({'format': 'other'})))
  with pytest.raises(workdir_lib.PredictError, match='not a shipped model'):
    archive_lib.read(str(bad))
  with pytest.raises(workdir_lib.PredictError, match='exists; not overwritten'):
    shipped.export(str(tmp_path), str(bad))


def test_archive_variables_are_checked_against_the_model(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'tiny.npz'
  meta = {'format': archive_lib.FORMAT, 'name': 'tiny', 'members': ['fold0'],
          'configs': [{}], 'results': [{}], 'storage_dtype': 'float16'}
  np.savez(path, meta=np.array(json.dumps(meta)),
           **{'fold0/params/Dense_0/kernel': np.ones((2, 3), np.float16)})
  archive = archive_lib.read(str(path))
  good = {'params': {'Dense_0': {'kernel': jax.ShapeDtypeStruct(
      (2, 3), np.float32)}}}
  variables = archive.variables(0, good)
  assert variables['params']['Dense_0']['kernel'].dtype == np.float32
  bad = {'params': {'Dense_0': {'kernel': jax.ShapeDtypeStruct(
      (3, 3), np.float32)}}}
  with pytest.raises(workdir_lib.PredictError, match='does not hold this model'):
    archive.variables(0, bad)


@pytest.mark.parametrize('name', archive_lib.names())
def test_shipped_model_reproduces_its_sample_predictions(name):
  # The expected CSV was written by the runs the archive was exported from;
  # the archive (float16 weights) must give the same HC within 0.05 mm.
  from hc_jax.data import hc18  # pylint: disable=import-outside-toplevel
  from hc_jax.evaluation import loading  # pylint: disable=import-outside-toplevel
  expected = _expected(name)
  predictor = loading.load(model=name)
  assert predictor.kind.name.startswith('mask') and len(predictor.runs) == 5
  images = [hc18.read_grayscale(os.path.join(archive_lib.SAMPLE_IMAGES_DIR,
                                             row['filename']))[0]
            for row in expected]
  out = predictor(images, [float(row['pixel_size_mm']) for row in expected])
  for i, row in enumerate(expected):
    assert abs(out['hc_mm'][i] - float(row['hc_mm'])) <= TOLERANCE_MM
    assert abs(out['hc_mm_sd'][i] - float(row['hc_mm_sd'])) <= TOLERANCE_MM
    assert abs(out['quality'][i] - float(row['quality'])) <= 1e-3
    assert out['status'][i] == row['status']


def test_cli_flags_without_a_model_or_images_are_usage_errors(tmp_path,
                                                              capsys):
  out = str(tmp_path / 'hc.csv')
  assert predict.main([f'--out={out}']) == predict.EXIT_USAGE
  assert 'no scans' in capsys.readouterr().err
  assert predict.main(['--samples', '--model=no_such_model',
                       f'--out={out}']) == predict.EXIT_USAGE
  assert 'no shipped model' in capsys.readouterr().err
  assert predict.main(['--samples', '--model=hcnet_mask', f'--workdir={tmp_path}',
                       f'--out={out}']) == predict.EXIT_USAGE
  assert 'not both' in capsys.readouterr().err
  assert not os.path.exists(out)


@pytest.mark.slow
def test_cli_predicts_the_samples_with_the_shipped_model(tmp_path, capsys):
  out, overlays = tmp_path / 'hc.csv', tmp_path / 'overlays'
  assert predict.main(['--samples', f'--out={out}',
                       f'--overlays={overlays}']) == predict.EXIT_OK
  assert '5 of 5 images predicted' in capsys.readouterr().out
  with open(out, newline='') as f:
    rows = list(csv.DictReader(f))
  for row, want in zip(rows, _expected()):
    assert row['filename'] == want['filename']
    assert abs(float(row['hc_mm']) - float(want['hc_mm'])) <= TOLERANCE_MM
  assert len(os.listdir(overlays)) == 5


def test_the_csv_and_overlay_name_the_shipped_model_not_the_submission(
    tmp_path, capsys):
  out, submission = tmp_path / 'hc.csv', tmp_path / 'submission.csv'
  overlays = tmp_path / 'overlays'
  scan = os.path.join(archive_lib.SAMPLE_IMAGES_DIR, _expected()[0]['filename'])
  assert predict.main([f'--images={scan}', f'--out={out}',
                       f'--overlays={overlays}',
                       f'--submission={submission}']) == predict.EXIT_OK
  assert '1 of 1 images predicted' in capsys.readouterr().out
  with open(out, newline='') as f:
    rows = list(csv.DictReader(f))
  assert [row['model'] for row in rows] == [archive_lib.DEFAULT_MODEL]
  assert len(os.listdir(overlays)) == 1
  # HC18's challenge format: its six columns, no model.
  with open(submission, newline='') as f:
    lines = list(csv.reader(f))
  assert tuple(lines[0]) == output_files.SUBMISSION_COLUMNS
  assert [len(line) for line in lines] == [6, 6]


@pytest.mark.slow
@pytest.mark.skipif(not (hc18.default_dir() and os.path.isdir(os.path.join(
    hc18.default_dir(), 'training_set'))), reason='HC18 copy not found')
def test_shipped_model_reproduces_its_cross_validation_figures():
  """Each fold member on its own test fold of the HC18 copy gives the pooled
  figures the archive records (float16 storage moves them < 0.05 mm)."""
  # pylint: disable-next=import-outside-toplevel
  from hc_jax.evaluation import cv as cv_lib
  archive = archive_lib.read()
  scores = cv_lib.score([archive.path])
  cv = archive.meta['cv']
  assert scores.num_images == cv['num_images']
  assert scores.mae_mm == pytest.approx(cv['mae_mm'], abs=TOLERANCE_MM)
  assert scores.bias_mm == pytest.approx(cv['bias_mm'], abs=TOLERANCE_MM)
  for fold, result in zip(range(len(archive.results)), archive.results):
    assert scores.folds[result['fold']]['mae_mm'] == pytest.approx(
        result['test_mae_mm'], abs=TOLERANCE_MM), fold


def test_a_huge_image_gets_a_plain_reason_not_an_inverted_range():
  """8000x8000 px: the image's own HC range (from a tenth of its side) lies
  above every training head, so no HC is plausible; the message says so."""
  from hc_jax.evaluation import loading  # pylint: disable=import-outside-toplevel
  predictor = loading.load()
  status, message = predictor._check(  # pylint: disable=protected-access
      1000.0, math.nan, math.nan, (8000, 8000), 10.0)
  assert status == 'implausible'
  assert message.startswith('no HC is plausible in a 8000x8000 px image')
  low, high = (int(v) for v in re.findall(r'(\d+)-(\d+) px', message)[0])
  assert low < high
  status, _ = predictor._check(  # pylint: disable=protected-access
      1000.0, math.nan, math.nan, (540, 800), 10.0)
  assert status == 'ok'


def test_the_shipped_archives_store_their_quality_threshold():
  """Chosen on each member's validation part and pooled (predict's
  'uncertain' reads it from the archive, not from a constant)."""
  from hc_jax import models  # pylint: disable=import-outside-toplevel
  from hc_jax.evaluation import loading  # pylint: disable=import-outside-toplevel
  from hc_jax.nets import kinds  # pylint: disable=import-outside-toplevel
  for name in archive_lib.names():
    archive = archive_lib.read(name)
    quality = models.kind_of(archive.configs[0]['model']).quality
    records = [result['quality'] for result in archive.results]
    assert all(r['signal'] == quality.name and r['part'] == 'val' and
               r['num_images'] == len(r['values']) > 0 for r in records)
    threshold = kinds.stored_threshold(archive.results, quality)
    assert threshold == pytest.approx(np.quantile(
        [v for r in records for v in r['values']], kinds.FLAGGED_FRACTION))
    assert loading.load(model=name).default_min_quality == threshold


def test_the_shipped_archives_record_the_digest_of_their_arrays():
  for name in archive_lib.names():
    path = archive_lib.path_of(name)
    with np.load(path, allow_pickle=False) as archive:
      arrays = {key: archive[key] for key in archive.files}
    meta = json.loads(str(arrays['meta']))
    assert meta[archive_lib.DIGEST_KEY] == archive_lib.arrays_digest(arrays)
  assert 'reinstall hc_jax' in archive_lib.how_to_restore(
      archive_lib.path_of(archive_lib.DEFAULT_MODEL))


def _copy_of_the_shipped_model(tmp_path):
  copy = tmp_path / f'{archive_lib.DEFAULT_MODEL}.npz'
  with open(archive_lib.path_of(archive_lib.DEFAULT_MODEL), 'rb') as f:
    copy.write_bytes(f.read())
  return copy


@pytest.mark.parametrize('damage', ['flipped', 'truncated', 'weights'])
def test_a_damaged_or_changed_archive_is_refused(tmp_path, damage):
  copy = _copy_of_the_shipped_model(tmp_path)
  data = bytearray(copy.read_bytes())
  if damage == 'flipped':  # A few bytes inside the compressed weights.
    for i in range(len(data) // 2, len(data) // 2 + 4):
      data[i] ^= 0xFF
    copy.write_bytes(bytes(data))
  elif damage == 'truncated':
    copy.write_bytes(bytes(data[:len(data) // 3]))
  else:  # A valid archive whose weights were changed.
    with np.load(copy, allow_pickle=False) as archive:
      arrays = {key: archive[key] for key in archive.files}
    key = sorted(k for k in arrays if '/params/' in k)[0]
    arrays[key] = arrays[key] * np.float16(1.01)
    np.savez_compressed(copy, **arrays)
  with pytest.raises(workdir_lib.PredictError) as error:
    archive_lib.read(str(copy))
  message = str(error.value)
  assert str(copy) in message and 'export it again' in message, message
  assert ('weights differ' if damage == 'weights' else 'damaged') in message


def test_the_command_line_refuses_a_damaged_archive_in_one_line(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  copy = _copy_of_the_shipped_model(tmp_path)
  data = bytearray(copy.read_bytes())
  data[len(data) // 2] ^= 0xFF
  copy.write_bytes(bytes(data))
  result = subprocess.run(
      [sys.executable, '-m', 'hc_jax.predict', f'--workdir={copy}',
       '--samples', f'--out={tmp_path / "hc.csv"}'], cwd=REPO,
      capture_output=True, text=True, check=False)
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr, result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and str(copy) in errors[0], result.stderr
  assert not (tmp_path / 'hc.csv').exists()


def test_an_archive_without_a_digest_loads_with_a_warning(tmp_path, capsys):
  copy = _copy_of_the_shipped_model(tmp_path)
  with np.load(copy, allow_pickle=False) as archive:
    arrays = {key: archive[key] for key in archive.files}
  meta = json.loads(str(arrays['meta']))
  del meta[archive_lib.DIGEST_KEY]  # As exported by an older hc_jax.
  arrays['meta'] = np.array(json.dumps(meta))
  np.savez_compressed(copy, **arrays)
  capsys.readouterr()
  assert archive_lib.read(str(copy)).members == meta['members']
  assert 'records no digest' in capsys.readouterr().err
  assert shipped.main([f'--add-digest={copy}']) == 0
  assert archive_lib.read(str(copy)).members == meta['members']
  assert 'records no digest' not in capsys.readouterr().err
  with np.load(copy, allow_pickle=False) as archive:
    for key in arrays:
      if key != 'meta':
        np.testing.assert_array_equal(archive[key], arrays[key])
  assert shipped.main([f'--add-digest={copy}']) == 2
  assert 'records a digest already' in capsys.readouterr().err
