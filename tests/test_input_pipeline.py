"""Tests for hc_jax.input_pipeline and hc_jax.numpy_data on tiny in-memory data."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from hc_jax import input_pipeline
from hc_jax import numpy_data
from hc_jax import preprocess

SIZE = 64
NORMALISER_PX = 1000.0
NUM_EXAMPLES = 10
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ramanujan(semi_axis_a, semi_axis_b):
  h = ((semi_axis_a - semi_axis_b) / (semi_axis_a + semi_axis_b))**2
  return math.pi * (semi_axis_a + semi_axis_b) * (
      1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def make_example(index, rng):
  """One HC18-format example: a noisy scan with an elliptical skull ring."""
  height, width = (540, 800) if index % 2 == 0 else (544, 796)
  center_x, center_y = width / 2 + rng.uniform(-20, 20), height / 2
  semi_axis_a = rng.uniform(120.0, 240.0)
  semi_axis_b = semi_axis_a * rng.uniform(0.7, 0.95)
  angle_rad = rng.uniform(0.0, math.pi)
  image = rng.randint(0, 40, [height, width]).astype(np.uint8)
  t = np.linspace(0.0, 2 * np.pi, 4000, endpoint=False)
  along_a, along_b = semi_axis_a * np.cos(t), semi_axis_b * np.sin(t)
  x = center_x + along_a * math.cos(angle_rad) - along_b * math.sin(angle_rad)
  y = center_y + along_a * math.sin(angle_rad) + along_b * math.cos(angle_rad)
  inside = (x >= 0) & (x < width - 1) & (y >= 0) & (y < height - 1)
  image[np.round(y[inside]).astype(int), np.round(x[inside]).astype(int)] = 255
  pixel_size_mm = np.float32(rng.uniform(0.1, 0.3))
  hc_px = np.float32(ramanujan(semi_axis_a, semi_axis_b))
  subject_id = 1 + index // 2
  frame = 1 + index % 2
  return {
      'image': image[..., np.newaxis],
      'filename': f'{subject_id:03d}_{frame if frame > 1 else ""}HC.png',
      'subject_id': np.int32(subject_id),
      'frame': np.int32(frame),
      'pixel_size_mm': pixel_size_mm,
      'hc_mm': np.float32(hc_px * pixel_size_mm),
      'hc_px': hc_px,
      'ellipse': {
          'center_x': np.float32(center_x),
          'center_y': np.float32(center_y),
          'semi_axis_a': np.float32(semi_axis_a),
          'semi_axis_b': np.float32(semi_axis_b),
          'angle_rad': np.float32(angle_rad),
      },
  }


SIGNATURE = {
    'image': tf.TensorSpec([None, None, 1], tf.uint8),
    'filename': tf.TensorSpec([], tf.string),
    'subject_id': tf.TensorSpec([], tf.int32),
    'frame': tf.TensorSpec([], tf.int32),
    'pixel_size_mm': tf.TensorSpec([], tf.float32),
    'hc_mm': tf.TensorSpec([], tf.float32),
    'hc_px': tf.TensorSpec([], tf.float32),
    'ellipse': {name: tf.TensorSpec([], tf.float32) for name in (
        'center_x', 'center_y', 'semi_axis_a', 'semi_axis_b', 'angle_rad')},
}


@pytest.fixture(scope='module')
def examples():
  rng = np.random.RandomState(0)
  return [make_example(index, rng) for index in range(NUM_EXAMPLES)]


def as_dataset(examples):
  return tf.data.Dataset.from_generator(lambda: iter(examples),
                                        output_signature=SIGNATURE)


@pytest.fixture(scope='module')
def prepared(examples):
  return input_pipeline.prepare(as_dataset(examples), SIZE, 'letterbox')


@pytest.mark.parametrize('mode', preprocess.RESIZE_MODES)
def test_prepare_gives_small_uint8_examples(examples, mode):
  prepared = input_pipeline.prepare(as_dataset(examples), SIZE, mode)
  assert prepared.element_spec['image'].shape == (SIZE, SIZE, 1)
  outputs = list(input_pipeline.as_numpy(prepared))
  assert len(outputs) == NUM_EXAMPLES
  for example, output in zip(examples, outputs):
    assert set(output) == set(input_pipeline.PREPARED_KEYS)
    assert output['image'].dtype == np.uint8
    assert output['image'].shape == (SIZE, SIZE, 1)
    assert output['hc_px'] == example['hc_px']
    assert output['pixel_size_mm'] == example['pixel_size_mm']
    assert output['filename'].decode() == example['filename']
    assert output['subject_id'] == example['subject_id']


def test_prepare_rejects_unknown_mode(examples):
  with pytest.raises(ValueError, match='stretch'):
    input_pipeline.prepare(as_dataset(examples), SIZE, 'squash')


def test_train_batches_have_static_shapes_and_drop_remainder(prepared):
  dataset = input_pipeline.train_dataset(
      prepared, batch_size=4, normaliser_px=NORMALISER_PX, seed=0,
      augment={'flip': True}, num_epochs=1)
  assert dataset.element_spec['image'].shape == (4, SIZE, SIZE, 1)
  assert dataset.element_spec['target'].shape == (4,)
  batches = list(input_pipeline.as_numpy(dataset))
  assert len(batches) == NUM_EXAMPLES // 4  # 10 examples: 2 full batches.
  for batch in batches:
    assert set(batch) == {'image', 'target'}
    assert batch['image'].dtype == np.float32
    assert batch['target'].dtype == np.float32
    assert np.abs(batch['image'].mean(axis=(1, 2, 3))).max() < 1e-4


def test_train_targets_are_hc_over_normaliser(prepared, examples):
  dataset = input_pipeline.train_dataset(
      prepared, batch_size=NUM_EXAMPLES, normaliser_px=NORMALISER_PX, seed=0,
      augment=preprocess.AugmentConfig(max_translate_px=3.0,
                                       max_rotate_deg=10.0),
      num_epochs=1)
  (batch,) = list(input_pipeline.as_numpy(dataset))
  expected = sorted(example['hc_px'] / NORMALISER_PX for example in examples)
  np.testing.assert_allclose(sorted(batch['target']), expected, rtol=1e-6)


def test_train_scale_augmentation_scales_the_target(examples):
  same_head = [dict(example, hc_px=np.float32(500.0)) for example in examples]
  prepared = input_pipeline.prepare(as_dataset(same_head), SIZE, 'stretch')
  dataset = input_pipeline.train_dataset(
      prepared, batch_size=5, normaliser_px=NORMALISER_PX, seed=3,
      augment={'flip': True, 'scale_range': [0.8, 1.2]}, num_epochs=2)
  targets = np.concatenate(
      [batch['target'] for batch in input_pipeline.as_numpy(dataset)])
  scales = targets / (500.0 / NORMALISER_PX)
  assert len(scales) == 2 * NUM_EXAMPLES
  assert ((scales >= 0.8 - 1e-6) & (scales <= 1.2 + 1e-6)).all()
  assert len(np.unique(scales)) == len(scales)


def test_train_pipeline_is_reproducible_for_a_seed(prepared):

  def first_batches(seed):
    dataset = input_pipeline.train_dataset(
        prepared, batch_size=3, normaliser_px=NORMALISER_PX, seed=seed,
        augment={'flip': True, 'scale_range': (0.9, 1.1)}, shuffle_buffer=4)
    return list(input_pipeline.as_numpy(dataset.take(5)))  # Spans epochs.

  first, again, other = first_batches(0), first_batches(0), first_batches(1)
  for batch, batch_again in zip(first, again):
    np.testing.assert_array_equal(batch['image'], batch_again['image'])
    np.testing.assert_array_equal(batch['target'], batch_again['target'])
  assert not all(
      np.array_equal(batch['target'], batch_other['target'])
      for batch, batch_other in zip(first, other))


def test_train_reshuffles_every_epoch(prepared):
  dataset = input_pipeline.train_dataset(
      prepared, batch_size=NUM_EXAMPLES, normaliser_px=NORMALISER_PX, seed=0,
      num_epochs=3)
  orders = [batch['target'] for batch in input_pipeline.as_numpy(dataset)]
  assert len(orders) == 3
  assert not (np.array_equal(orders[0], orders[1]) and
              np.array_equal(orders[1], orders[2]))
  # Without augmentation each epoch holds each example once.
  np.testing.assert_array_equal(np.sort(orders[0]), np.sort(orders[2]))


def test_train_rejects_unknown_augment_setting(prepared):
  with pytest.raises(ValueError, match="unknown augmentation settings"):
    input_pipeline.train_dataset(
        prepared, batch_size=2, normaliser_px=NORMALISER_PX, seed=0,
        augment={'flip': True, 'max_shear_deg': 3.0})


@pytest.mark.parametrize('batch_size,num_padding', [(4, 2), (5, 0), (3, 2)])
def test_eval_scores_every_example_once(prepared, examples, batch_size,
                                        num_padding):
  dataset = input_pipeline.eval_dataset(prepared, batch_size=batch_size,
                                        normaliser_px=NORMALISER_PX)
  assert dataset.element_spec['image'].shape == (batch_size, SIZE, SIZE, 1)
  batches = list(input_pipeline.as_numpy(dataset))
  assert len(batches) == -(-NUM_EXAMPLES // batch_size)
  merged = {key: np.concatenate([batch[key] for batch in batches])
            for key in batches[0]}
  assert set(merged) == {'image', 'target', 'mask', 'hc_px', 'pixel_size_mm',
                         'filename'}
  for batch in batches:
    assert batch['image'].shape == (batch_size, SIZE, SIZE, 1)
    assert batch['image'].dtype == np.float32
    assert batch['mask'].dtype == np.float32
  real = merged['mask'] == 1.0
  assert (merged['mask'] == 0.0).sum() == num_padding
  assert real.sum() == NUM_EXAMPLES
  assert (merged['filename'][~real] == b'').all()
  assert (merged['image'][~real] == 0.0).all()
  assert sorted(merged['filename'][real]) == sorted(
      example['filename'].encode() for example in examples)
  masked_sum = np.sum(merged['target'] * merged['mask'])
  assert masked_sum == pytest.approx(
      sum(example['hc_px'] for example in examples) / NORMALISER_PX, rel=1e-6)


def test_eval_target_round_trips_to_mm(prepared, examples):
  dataset = input_pipeline.eval_dataset(prepared, batch_size=4,
                                        normaliser_px=NORMALISER_PX)
  hc_mm = {example['filename'].encode(): example['hc_mm']
           for example in examples}
  seen = 0
  for batch in input_pipeline.as_numpy(dataset):
    predicted_mm = preprocess.hc_mm_from_target(
        batch['target'], NORMALISER_PX, batch['pixel_size_mm'])
    for name, value, mask in zip(batch['filename'], predicted_mm,
                                 batch['mask']):
      if mask:
        assert value == pytest.approx(hc_mm[name], rel=1e-5)
        seen += 1
  assert seen == NUM_EXAMPLES


def test_filter_filenames_keeps_exactly_the_listed_names(examples):
  wanted = ['001_HC.png', b'003_2HC.png', '005_HC.png', '999_HC.png']
  kept = input_pipeline.filter_filenames(as_dataset(examples), wanted)
  names = [example['filename'] for example in input_pipeline.as_numpy(kept)]
  assert names == [b'001_HC.png', b'003_2HC.png', b'005_HC.png']
  nothing = input_pipeline.filter_filenames(as_dataset(examples), [])
  assert list(input_pipeline.as_numpy(nothing)) == []


def test_filtered_dataset_feeds_train_and_eval(examples):
  # Filtering makes the cardinality unknown; both pipelines must cope.
  wanted = [example['filename'] for example in examples[:7]]
  prepared = input_pipeline.prepare(
      input_pipeline.filter_filenames(as_dataset(examples), wanted), SIZE,
      'stretch')
  train = input_pipeline.train_dataset(
      prepared, batch_size=7, normaliser_px=NORMALISER_PX, seed=0,
      num_epochs=1)
  (batch,) = list(input_pipeline.as_numpy(train))
  assert batch['target'].shape == (7,)
  evaluation = input_pipeline.eval_dataset(prepared, batch_size=4,
                                           normaliser_px=NORMALISER_PX)
  masks = [batch['mask'] for batch in input_pipeline.as_numpy(evaluation)]
  np.testing.assert_array_equal(np.concatenate(masks), [1] * 7 + [0])


def test_export_numpy_round_trip(prepared, examples, tmp_path):
  path = tmp_path / 'prepared.npz'
  assert input_pipeline.export_numpy(prepared, path) == NUM_EXAMPLES
  loaded = numpy_data.load_numpy(path)
  assert set(loaded) == set(numpy_data.FIELDS)
  assert loaded['images'].dtype == np.uint8
  assert loaded['images'].shape == (NUM_EXAMPLES, SIZE, SIZE, 1)
  for index, example in enumerate(input_pipeline.as_numpy(prepared)):
    np.testing.assert_array_equal(loaded['images'][index], example['image'])
    assert loaded['hc_px'][index] == example['hc_px']
    assert loaded['pixel_size_mm'][index] == example['pixel_size_mm']
    assert loaded['filename'][index] == example['filename'].decode()
    assert loaded['subject_id'][index] == example['subject_id']
  assert loaded['hc_px'].dtype == np.float32
  assert loaded['subject_id'].dtype == np.int32


def test_export_numpy_of_empty_dataset(prepared, tmp_path):
  path = tmp_path / 'empty.npz'
  input_pipeline.export_numpy(prepared.take(0), path, compressed=False)
  assert numpy_data.load_numpy(path)['images'].shape == (0, SIZE, SIZE, 1)


def test_save_numpy_rejects_inconsistent_fields(tmp_path):
  arrays = {
      'images': np.zeros([2, 4, 4, 1], np.uint8),
      'hc_px': np.zeros([3], np.float32),
      'pixel_size_mm': np.zeros([2], np.float32),
      'filename': np.array(['a', 'b']),
      'subject_id': np.zeros([2], np.int32),
  }
  with pytest.raises(ValueError, match='length'):
    numpy_data.save_numpy(tmp_path / 'bad.npz', arrays)
  del arrays['hc_px']
  with pytest.raises(ValueError, match='missing'):
    numpy_data.save_numpy(tmp_path / 'bad.npz', arrays)


def test_numpy_data_works_without_tensorflow(prepared, tmp_path):
  path = tmp_path / 'prepared.npz'
  input_pipeline.export_numpy(prepared, path)
  script = (
      "import sys\n"
      "sys.modules['tensorflow'] = None  # Any import of TF now fails.\n"
      "from hc_jax import numpy_data\n"
      f"arrays = numpy_data.load_numpy({str(path)!r})\n"
      "print(arrays['images'].shape)\n")
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == str((NUM_EXAMPLES, SIZE, SIZE, 1))


def test_pipeline_hides_gpus_from_tensorflow(prepared):
  input_pipeline.train_dataset(prepared, batch_size=2,
                               normaliser_px=NORMALISER_PX, seed=0)
  assert tf.config.get_visible_devices('GPU') == []
