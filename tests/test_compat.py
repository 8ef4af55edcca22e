"""A run written by an earlier hc_jax (tests/fixtures/run_ed83780, made by the
flat-layout code of commit ed83780 with tests/fixtures/make_run_ed83780.py)
still predicts as it did and resumes with today's code."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from configs import hcnet_mask
from hc_jax import predict
from hc_jax.data import hc18
from hc_jax.data import synthetic
from hc_jax.training import train

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'run_ed83780')


@pytest.fixture(scope='module')
def phantoms(tmp_path_factory):
  """The phantom HC18 copy the fixture's run trained on, written again."""
  root = tmp_path_factory.mktemp('old_run_data')
  synthetic.write_hc18(str(root / 'hc18'), num_train=16, num_test=1, seed=3)
  return root


def _copy(tmp_path):
  run = tmp_path / 'run'
  shutil.copytree(FIXTURE, run)
  return run


def test_an_earlier_run_predicts_as_it_did(phantoms, tmp_path):
  run = _copy(tmp_path)
  with open(run / 'predictions_test.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  images = [hc18.read_grayscale(str(phantoms / 'hc18' / 'training_set' /
                                    r['filename']))[0] for r in rows]
  sizes = [float(r['pixel_size_mm']) for r in rows]
  out = predict.load(str(run))(images, sizes)
  np.testing.assert_allclose(out['hc_mm'],
                             [float(r['hc_mm_pred']) for r in rows],
                             atol=0.01)


def test_an_earlier_run_resumes_for_more_epochs(phantoms, tmp_path):
  run = _copy(tmp_path)
  with open(run / 'config.json') as f:
    saved = json.load(f)
  config = hcnet_mask.get_config()
  config.data.hc18_dir = str(phantoms / 'hc18')
  config.data.cache_dir = str(tmp_path / 'cache')
  config.image_size, config.image_width = 32, 48
  config.model_options.widths = (4, 4, 8, 8, 8)
  config.num_epochs = 3  # One more than it was trained for.
  config.warmup_epochs = 1
  config.lr_schedule = 'constant'
  config.batch_size = config.eval_batch_size = 8
  try:
    results = train.train_and_evaluate(config, str(run))
  except ValueError as e:
    if 'was trained on other data' in str(e):
      pytest.skip('this Pillow writes the phantoms with other PNG bytes than '
                  f'the one that made the fixture ({saved["content_digest"]})')
    raise
  assert results['num_epochs'] == 3
  with open(os.path.join(FIXTURE, 'metrics.jsonl')) as f:
    before = [json.loads(line) for line in f]
  with open(run / 'metrics.jsonl') as f:
    after = [json.loads(line) for line in f]
  trained = [r for r in before if 'test_mae_mm' not in r]
  assert after[:len(trained)] == trained  # Resumed, not started over.
  assert [r.get('epoch') for r in after if 'test_mae_mm' not in r] == [1, 2, 3]
