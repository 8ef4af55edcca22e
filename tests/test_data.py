"""Tests of the one data path: prepared HC18 arrays, folds, members' batches."""

import os
import shutil

import numpy as np
import pytest

from hc_jax.data import cache as cache_lib
from hc_jax.data import digests
from hc_jax.data import hc18
from hc_jax.data import pipeline


@pytest.fixture
def run_data(tiny_config, tmp_path):
  configs = []
  for fold in (0, 2):
    config = tiny_config.copy_and_resolve_references()
    config.fold = fold
    configs.append(config)
  return pipeline.load(configs, [str(tmp_path / 'a'), str(tmp_path / 'b')])


def test_tf_data_and_numpy_give_the_same_batches(run_data):
  for epoch in (1, 2):
    via_tf = list(run_data.train_batches(epoch, backend='tf'))
    via_numpy = list(run_data.train_batches(epoch, backend='numpy'))
    assert len(via_tf) == len(via_numpy) == run_data.steps.max()
    for a, b in zip(via_tf, via_numpy):
      assert sorted(a) == sorted(b)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  first = next(run_data.train_batches(1, 'numpy'))['image']
  second = next(run_data.train_batches(2, 'numpy'))['image']
  assert first.shape[:2] == (2, run_data.batch_size)
  assert not np.array_equal(first, second)  # A new order every epoch.


def test_a_members_batches_do_not_depend_on_the_others(tiny_config, tmp_path,
                                                       run_data):
  config = tiny_config.copy_and_resolve_references()
  config.fold = 2
  alone = pipeline.load([config], [str(tmp_path / 'c')])
  index_alone, _ = alone.epoch_index(3)
  index_both, _ = run_data.epoch_index(3)
  np.testing.assert_array_equal(index_alone[:, 0], index_both[:, 1])


def test_each_member_trains_on_its_training_part_only(run_data):
  for m, split in enumerate(run_data.split):
    index, active = run_data.epoch_index(1)
    used = set(index[active[:, m], m].ravel().tolist())
    assert used <= set(split['train'].tolist())
    assert len(used) == run_data.steps[m] * run_data.batch_size
    assert not set(split['train']) & (set(split['val']) | set(split['test']))


@pytest.fixture(scope='module')
def normaliser_config(tmp_path_factory):
  """Phantoms whose folds hold the largest HC of some fold's training folds
  in that fold's validation part, and the largest of all in some fold's test
  part: a normaliser over training and validation images, or over all, is
  then caught."""
  from configs import default  # pylint: disable=import-outside-toplevel
  from hc_jax.data import phantom_set  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('normaliser')
  phantom_set.write_hc18(str(root / 'hc18'), num_train=40, num_test=2, seed=5)
  config = default.get_config()
  config.data.hc18_dir, config.data.cache_dir = (str(root / 'hc18'),
                                                 str(root / 'tfds'))
  config.image_size = 32
  config.batch_size = 8
  config.eval_batch_size = 8
  return config, root


def test_normaliser_sees_only_training_images(normaliser_config):
  """Each fold's normaliser is its own training maximum: not that of its
  training and validation parts, not the data set's."""
  config, root = normaliser_config
  configs = []
  for fold in range(config.num_folds):
    configs.append(config.copy_and_resolve_references())
    configs[-1].fold = fold
  run_data = pipeline.load(configs, [str(root / f'f{k}') for k in range(5)])
  hc_px = run_data.arrays['hc_px']
  for part in ('val', 'test'):  # The data must be able to catch both.
    assert any(hc_px[s[part]].max() > hc_px[s['train']].max()
               for s in run_data.split), part
  for m, split in enumerate(run_data.split):
    assert run_data.normaliser_px[m] == pytest.approx(
        hc_px[split['train']].max())


def test_eval_index_covers_every_image_once(run_data):
  for part in ('val', 'test'):
    index, mask = run_data.eval_index(part, 8)
    assert index.shape[1] % 8 == 0
    for m, split in enumerate(run_data.split):
      assert sorted(index[m][mask[m]].tolist()) == sorted(split[part].tolist())


def test_process_slices_of_two_hosts_make_the_global_batch(run_data):
  """Simulates two processes: each reads its own rows, together the batch."""
  rows = [pipeline.process_slice(run_data.batch_size, p, 2) for p in range(2)]
  whole = next(run_data.train_batches(1, 'numpy'))
  parts = []
  for row in rows:
    run_data.rows = row
    parts.append(next(run_data.train_batches(1, 'numpy')))
  run_data.rows = slice(None)
  for key in ('image', 'hc_px', 'ellipse', 'resize'):
    np.testing.assert_array_equal(
        np.concatenate([p[key] for p in parts], axis=1), whole[key])
  with pytest.raises(ValueError, match='not divisible'):
    pipeline.process_slice(6, 0, 4)


def test_prepared_arrays_hold_images_and_geometry(run_data, tiny_config):
  arrays = run_data.arrays
  assert arrays['images'].dtype == np.uint8
  assert arrays['images'].shape[1:] == (32, 32, 1)
  np.testing.assert_allclose(
      arrays['hc_mm'], arrays['hc_px'] * arrays['pixel_size_mm'], rtol=1e-3)
  assert np.isfinite(arrays['ellipse']).all()
  np.testing.assert_allclose(
      arrays['resize'],
      cache_lib.resize_geometry(arrays['original_hw'], (32, 32), 'stretch'))
  assert run_data.info['source_digest'] == digests.source_digest(
      tiny_config.data.hc18_dir)


def test_non_square_letterbox_input(tiny_config, tmp_path):
  tiny_config.image_width = 48
  tiny_config.resize_mode = 'letterbox'
  loaded = pipeline.load([tiny_config], [str(tmp_path / 'run')])
  assert loaded.arrays['images'].shape[1:] == (32, 48, 1)
  sx, sy = loaded.arrays['resize'][:, 0], loaded.arrays['resize'][:, 1]
  np.testing.assert_allclose(sx, sy, rtol=0.05)


def test_another_copy_is_prepared_anew_and_a_broken_one_is_refused(
    tiny_config, tmp_path):
  """The cache is keyed by the source: pointing at another copy (here a
  broken one) must check that copy, not reuse the build already cached."""
  copy = tmp_path / 'copy'
  shutil.copytree(tiny_config.data.hc18_dir, copy)
  original = pipeline.load([tiny_config], [str(tmp_path / 'a')])
  victims = sorted(p for p in os.listdir(copy / 'training_set')
                   if p.endswith('HC.png'))[:2]
  with open(copy / 'training_set' / victims[0], 'wb') as f:
    f.write(b'not a png')
  os.remove(copy / 'training_set' / victims[1])
  assert digests.source_digest(str(copy)) != original.info['source_digest']
  tiny_config.data.hc18_dir = str(copy)
  with pytest.raises(hc18.HC18Error) as error:
    pipeline.load([tiny_config], [str(tmp_path / 'b')])
  assert victims[0] in str(error.value) and victims[1] in str(error.value)


def test_prepared_export_is_checked_against_the_config(tiny_config, tmp_path,
                                                       run_data):
  path = str(tmp_path / 'export.npz')
  cache_lib.save(path, run_data.arrays, run_data.info)
  tiny_config.data.prepared = path
  loaded = pipeline.load([tiny_config], [str(tmp_path / 'run')])
  np.testing.assert_array_equal(loaded.arrays['images'],
                                run_data.arrays['images'])
  tiny_config.image_size = 64
  with pytest.raises(cache_lib.PreparedError, match='asks for'):
    pipeline.load([tiny_config], [str(tmp_path / 'run2')])
  with open(path, 'wb') as f:
    f.write(b'garbage')
  with pytest.raises(cache_lib.PreparedError, match='cannot read'):
    cache_lib.load(path)


def test_hc18_not_found_names_hc_jax_flags_not_a_download(monkeypatch):
  """The error says where to get HC18 and which flag takes it; it does not
  advise the TFDS download, which has no checksums registered."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(hc18, 'default_dir', lambda: None)
  config = ml_collections.ConfigDict(
      {'data': {'source': 'hc18', 'hc18_dir': ''}})
  with pytest.raises(ValueError) as raised:
    pipeline.hc18_source_dir(config, '/nonexistent')
  message = str(raised.value)
  assert '\n' not in message and 'download' not in message.replace(
      'download it from Zenodo', '')
  assert '--config.data.hc18_dir=DIR' in message and 'HC18_DIR' in message
  assert '--config.data.source=synthetic' in message
