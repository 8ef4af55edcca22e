"""The quality threshold is chosen per model on its validation part and
stored with it: in the run's results.json, in a shipped archive, and from
there in predict's 'uncertain'."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from conftest import tiny_mask_config
from hc_jax import workdir as workdir_lib
from hc_jax.evaluation import cv_report
from hc_jax.nets import kinds


@pytest.fixture(scope='module')
def label_run(phantom_hc18, tmp_path_factory):
  """A finished label-only run on the phantom HC18 copy."""
  from hc_jax.training import train  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp('quality') / 'run')
  train.train_and_evaluate(
      tiny_mask_config('hcnet_mask_label', *phantom_hc18), workdir)
  return workdir


def _results(workdir):
  with open(os.path.join(workdir, workdir_lib.RESULTS_FILE)) as f:
    return json.load(f)


def test_a_run_stores_the_threshold_chosen_on_its_validation_part(label_run):
  from hc_jax.data import folds  # pylint: disable=import-outside-toplevel
  record = _results(label_run)['quality']
  assignment = folds.FoldAssignment.from_json(
      os.path.join(label_run, workdir_lib.FOLDS_FILE))
  val = assignment.split(_results(label_run)['fold'])['val']
  assert record['signal'] == kinds.FLIP_AGREEMENT.name
  assert record['part'] == 'val'
  assert record['num_images'] == len(record['values']) == len(val) > 0
  assert record['threshold'] == pytest.approx(
      np.quantile(record['values'], kinds.FLAGGED_FRACTION))
  assert all(0 <= v <= 1 for v in record['values'])


def test_the_stored_threshold_travels_with_the_model_into_predict(
    label_run, phantom_hc18, tmp_path):
  """predict's 'uncertain' follows the run's stored threshold, also through
  a shipped archive; --min-quality still overrides it."""
  # pylint: disable=import-outside-toplevel
  from hc_jax import predict
  from hc_jax import shipped
  from hc_jax.evaluation import loading
  # pylint: enable=import-outside-toplevel
  stored = _results(label_run)['quality']['threshold']
  assert stored != kinds.FLIP_AGREEMENT.min_value
  assert loading.load(label_run).default_min_quality == pytest.approx(stored)
  archive = str(tmp_path / 'label.npz')
  shipped.export(label_run, archive)
  assert loading.load(archive).default_min_quality == pytest.approx(stored)

  # A threshold above every quality flags every scan, one below none: the
  # statuses come from what the run stores, not from a constant. (The scans
  # without their pixel sizes: a two-epoch model's HC is judged in px only.)
  scans = tmp_path / 'scans'
  scans.mkdir()
  for name in sorted(os.listdir(f'{phantom_hc18[0]}/test_set'))[:3]:
    if name.endswith('.png'):
      shutil.copy(f'{phantom_hc18[0]}/test_set/{name}', scans / name)
  for threshold, flagged in ((1.01, True), (-0.01, False)):
    run = str(tmp_path / f'run_{threshold}')
    shutil.copytree(label_run, run)
    results = _results(run)
    results['quality']['threshold'] = threshold
    # Every HC plausible, whatever a two-epoch model measures.
    results.update(train_hc_px_min=1.0, train_hc_px_max=1e6,
                   train_hc_mm_min=0.01, train_hc_mm_max=1e5)
    with open(os.path.join(run, workdir_lib.RESULTS_FILE), 'w') as f:
      json.dump(results, f)
    out_csv = tmp_path / f'hc_{threshold}.csv'
    predict.main([f'--workdir={run}', f'--images={scans}',
                  f'--out={out_csv}', '--no-scan-check'])
    with open(out_csv, newline='') as f:
      rows = [r for r in csv.DictReader(f) if r['status'] != 'refused']
    assert rows
    uncertain = [r for r in rows if r['status'] == 'uncertain']
    assert len(uncertain) == (len(rows) if flagged else 0), rows
    for row in uncertain:
      assert f'< {threshold:g}' in row['message']
  out_csv = tmp_path / 'override.csv'
  predict.main([f'--workdir={run}', f'--images={scans}',
                f'--out={out_csv}', '--no-scan-check', '--min-quality=1.0'])
  with open(out_csv, newline='') as f:
    rows = [r for r in csv.DictReader(f) if r['status'] != 'refused']
  assert any(r['status'] == 'uncertain' for r in rows)


def test_an_ensemble_pools_its_members_validation_values():
  quality = kinds.FLIP_AGREEMENT
  a = kinds.quality_record(quality, np.linspace(0.9, 1.0, 11))
  b = kinds.quality_record(quality, np.linspace(0.5, 0.6, 11))
  assert kinds.stored_threshold([{'quality': a}], quality) == pytest.approx(
      0.91)
  assert kinds.stored_threshold(
      [{'quality': a}, {'quality': b}], quality) == pytest.approx(
          np.quantile(a['values'] + b['values'], 0.1))
  # A run that stores none, or another signal's: the kind's default.
  assert kinds.stored_threshold([{'quality': a}, {}], quality) is None
  assert kinds.stored_threshold([{'quality': a}],
                                kinds.OWN_ELLIPSE_IOU) is None
  assert kinds.stored_threshold([{'quality': a}], None) is None
  with pytest.raises(ValueError, match='no finite quality'):
    kinds.choose_threshold([float('nan')])


def test_the_flag_table_applies_each_rows_stored_threshold():
  rows = [{'quality': q, 'error_mm': e, 'min_quality': t} for q, e, t in
          ((0.5, 12.0, 0.6), (0.5, 1.0, 0.4), (0.9, 30.0, 0.95),
           (0.99, 1.0, 0.95))]
  table = cv_report.flag_table(rows, [cv_report.STORED, 0.6])
  assert table[0]['threshold'] == cv_report.STORED
  assert table[0]['flagged'] == 2 and table[0]['caught_10'] == 2
  assert table[1]['flagged'] == 2 and table[1]['caught_10'] == 1
  assert 'stored' in cv_report.format_flag_table(table)


def test_an_older_archive_is_calibrated_on_its_validation_parts(
    label_run, tmp_path, capsys):
  """`python -m hc_jax.shipped --calibrate`: an archive whose runs stored no
  threshold gets the one its runs would have stored."""
  # pylint: disable=import-outside-toplevel
  from hc_jax import shipped
  from hc_jax import archive as archive_lib
  from hc_jax.evaluation import loading
  # pylint: enable=import-outside-toplevel
  archive = str(tmp_path / 'old.npz')
  shipped.export(label_run, archive)
  arrays, meta = shipped._read_archive(archive)  # pylint: disable=protected-access
  stored = meta['results'][0].pop('quality')
  shipped._replace_archive(archive, arrays, meta)  # pylint: disable=protected-access
  assert loading.load(archive).default_min_quality == (
      kinds.FLIP_AGREEMENT.min_value)
  assert shipped.main([f'--calibrate={archive}']) == 0
  assert 'quality threshold' in capsys.readouterr().out
  got = archive_lib.read(archive).results[0]['quality']
  assert got['num_images'] == stored['num_images']
  np.testing.assert_allclose(got['values'], stored['values'], atol=2e-3)
  assert loading.load(archive).default_min_quality == pytest.approx(
      got['threshold'])
  # Once is enough; the arrays' digest is unchanged.
  assert shipped.main([f'--calibrate={archive}']) == 2
  assert 'already' in capsys.readouterr().err
  archive_lib.read(archive)  # The arrays still match their digest.


def test_an_archive_records_the_command_that_trained_it(label_run, tmp_path,
                                                        capsys):
  """The provenance names the model's own config (not another model's), and
  `--record-command` corrects it without touching the arrays."""
  # pylint: disable=import-outside-toplevel
  from hc_jax import archive as archive_lib
  from hc_jax import shipped
  # pylint: enable=import-outside-toplevel
  archive = str(tmp_path / 'hcnet_mask_label.npz')
  shipped.export(label_run, archive)
  meta = archive_lib.read(archive).meta
  assert meta['provenance']['command'] == (
      'python -m hc_jax.grid --configs=configs/hcnet_mask_label.py '
      '--folds=0,1,2,3,4 --root=runs/final')
  command = 'python -m hc_jax.main --config=configs/hcnet_mask_label.py'
  assert shipped.main([f'--record-command={archive}',
                       f'--command={command}']) == 0
  assert 'training command recorded' in capsys.readouterr().out
  after = archive_lib.read(archive)  # Checks the arrays against the digest.
  assert after.meta['provenance']['command'] == command
  assert after.meta['provenance']['data'] == meta['provenance']['data']
  assert after.meta[archive_lib.DIGEST_KEY] == meta[archive_lib.DIGEST_KEY]
  with pytest.raises(SystemExit):  # A usage error: no --command.
    shipped.main([f'--record-command={archive}'])
