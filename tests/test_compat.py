"""A run written by an earlier hc_jax (tests/fixtures/run_ed83780, made by the
flat-layout code of commit ed83780 with tests/fixtures/make_run_ed83780.py)
still predicts as it did and resumes with today's code.

The phantom HC18 copy it trained on is committed byte for byte
(tests/fixtures/run_ed83780_hc18): a resumed run checks the digest of its
data, which a phantom written again by another Pillow would not match.
"""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from configs import hcnet_mask
from hc_jax import predict
from hc_jax.data import digests
from hc_jax.data import hc18
from hc_jax.training import train

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'run_ed83780')
# The phantom HC18 copy (16 training scans, 1 test scan) the run trained on.
FIXTURE_HC18 = FIXTURE + '_hc18'


@pytest.fixture(scope='module')
def phantoms(tmp_path_factory):
  """A copy of the phantom HC18 directory the fixture's run trained on."""
  root = tmp_path_factory.mktemp('old_run_data')
  shutil.copytree(FIXTURE_HC18, root / 'hc18')
  return root


def test_the_committed_phantoms_are_the_runs_data():
  with open(os.path.join(FIXTURE, 'config.json')) as f:
    saved = json.load(f)
  assert digests.content_digest(FIXTURE_HC18) == saved['content_digest']


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
  config = hcnet_mask.get_config()
  config.data.hc18_dir = str(phantoms / 'hc18')
  config.data.cache_dir = str(tmp_path / 'cache')
  config.image_size, config.image_width = 32, 48
  config.model_options.widths = (4, 4, 8, 8, 8)
  config.num_epochs = 3  # One more than it was trained for.
  config.warmup_epochs = 1
  config.lr_schedule = 'constant'
  config.batch_size = config.eval_batch_size = 8
  results = train.train_and_evaluate(config, str(run))
  assert results['num_epochs'] == 3
  with open(os.path.join(FIXTURE, 'metrics.jsonl')) as f:
    before = [json.loads(line) for line in f]
  with open(run / 'metrics.jsonl') as f:
    after = [json.loads(line) for line in f]
  trained = [r for r in before if 'test_mae_mm' not in r]
  assert after[:len(trained)] == trained  # Resumed, not started over.
  assert [r.get('epoch') for r in after if 'test_mae_mm' not in r] == [1, 2, 3]
