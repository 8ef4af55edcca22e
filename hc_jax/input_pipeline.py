"""tf.data pipelines that turn HC18 examples into training and evaluation batches.

The input is any `tf.data.Dataset` of HC18 examples (as the `hc18` TFDS
builder yields them: 'image' uint8 [H, W, 1] at the original size, 'filename',
'subject_id', 'pixel_size_mm', 'hc_px', ...); this module does not depend on
TFDS. The steps:

  examples = builder.as_dataset(split='train')
  examples = input_pipeline.filter_filenames(examples, split['train'])
  prepared = input_pipeline.prepare(examples, image_size=224,
                                    resize_mode='stretch')
  train_ds = input_pipeline.train_dataset(prepared, batch_size=32,
                                          normaliser_px=1000.0, seed=0,
                                          augment={'flip': True})
  eval_ds = input_pipeline.eval_dataset(prepared_val, batch_size=32,
                                        normaliser_px=1000.0)

`prepare` decodes and resizes once, to uint8, which the train and eval
pipelines cache in memory. `export_numpy` writes the same prepared examples to
an .npz for the TensorFlow-free path (`hc_jax.numpy_data.load_numpy`).

TensorFlow only feeds data here, so building a pipeline hides the GPUs from it.
"""

import os
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from hc_jax import numpy_data
from hc_jax import preprocess

AUTOTUNE = tf.data.AUTOTUNE

PREPARED_KEYS = ('image', 'hc_px', 'pixel_size_mm', 'filename', 'subject_id')


def _hide_gpus_from_tf():
  """Keeps TensorFlow off the accelerators, which belong to JAX."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):
    # Devices were already initialised; TF then keeps what it has.
    pass


def _augment_config(augment) -> preprocess.AugmentConfig:
  """Accepts an AugmentConfig, a dict, a ConfigDict, or None (no augmentation)."""
  if isinstance(augment, preprocess.AugmentConfig):
    return augment
  return preprocess.AugmentConfig.from_dict(augment)


def filter_filenames(dataset: tf.data.Dataset,
                     filenames: Sequence[Union[str, bytes]]) -> tf.data.Dataset:
  """Keeps the examples whose 'filename' is in `filenames`.

  Args:
    dataset: examples with a scalar tf.string 'filename'.
    filenames: names to keep, e.g. a fold from `hc_jax.folds`.

  Returns:
    The filtered dataset (its cardinality becomes unknown).
  """
  _hide_gpus_from_tf()
  names = [n.decode('utf-8') if isinstance(n, bytes) else str(n)
           for n in filenames]
  names = list(dict.fromkeys(names))  # The table rejects duplicate keys.
  if not names:
    return dataset.filter(lambda example: tf.constant(False))
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(
          tf.constant(names, tf.string), tf.ones([len(names)], tf.int32)),
      default_value=0)
  return dataset.filter(lambda example: table.lookup(example['filename']) > 0)


def prepare(dataset: tf.data.Dataset, image_size: int,
            resize_mode: str) -> tf.data.Dataset:
  """Resizes each example once to the small uint8 form that gets cached.

  Args:
    dataset: HC18 examples.
    image_size: side of the square model input, in pixels.
    resize_mode: one of `preprocess.RESIZE_MODES`.

  Returns:
    Dataset of {'image': uint8 [S, S, 1], 'hc_px', 'pixel_size_mm',
    'filename', 'subject_id'}.

  Raises:
    ValueError: for an unknown `resize_mode`.
  """
  _hide_gpus_from_tf()
  preprocess.resize(tf.zeros([2, 2, 1], tf.uint8), 2, resize_mode)  # Fail now.

  def prepare_example(example):
    image = preprocess.resize(example['image'], image_size, resize_mode)
    return {
        'image': preprocess.to_uint8(image),
        'hc_px': tf.cast(example['hc_px'], tf.float32),
        'pixel_size_mm': tf.cast(example['pixel_size_mm'], tf.float32),
        'filename': example['filename'],
        'subject_id': tf.cast(example['subject_id'], tf.int32),
    }

  return dataset.map(prepare_example, num_parallel_calls=AUTOTUNE,
                     deterministic=True)


def _num_examples(dataset: tf.data.Dataset) -> int:
  """Counts a finite dataset, iterating it only when TF does not know."""
  cardinality = int(dataset.cardinality())
  if cardinality == tf.data.INFINITE_CARDINALITY:
    raise ValueError('Expected a finite dataset of prepared examples.')
  if cardinality == tf.data.UNKNOWN_CARDINALITY:
    cardinality = int(dataset.reduce(np.int64(0), lambda count, _: count + 1))
  return cardinality


def train_dataset(prepared: tf.data.Dataset,
                  *,
                  batch_size: int,
                  normaliser_px: float,
                  seed: int,
                  augment: Union[preprocess.AugmentConfig, Mapping[str, Any],
                                 None] = None,
                  shuffle_buffer: Optional[int] = None,
                  num_epochs: Optional[int] = None) -> tf.data.Dataset:
  """Shuffled, augmented training batches.

  cache -> shuffle -> repeat -> enumerate -> map(draw augmentation)
  -> batch(drop_remainder) -> map(warp, zscore, target) -> prefetch. Each
  example's augmentation draws from
  a stateless seed made of `seed` and its position in the stream, so a pipeline
  built twice with the same seed yields the same batches.

  Args:
    prepared: output of `prepare`.
    batch_size: examples per batch; the last incomplete batch is dropped.
    normaliser_px: target = hc_px * hc_scale / normaliser_px.
    seed: seeds the shuffle and the augmentation.
    augment: `preprocess.AugmentConfig`, or a dict of its fields (flip,
      max_translate_px, max_rotate_deg, scale_range); None for none.
    shuffle_buffer: shuffle buffer size; None shuffles the whole dataset.
    num_epochs: passes over the data; None repeats forever.

  Returns:
    Dataset of {'image': float32 [B, S, S, 1], 'target': float32 [B]}.
  """
  _hide_gpus_from_tf()
  config = _augment_config(augment)
  dataset = prepared.cache()
  if shuffle_buffer is None:
    # Counting after cache() fills the cache, so the data is read once.
    shuffle_buffer = max(_num_examples(dataset), 1)
  dataset = dataset.shuffle(shuffle_buffer, seed=seed,
                            reshuffle_each_iteration=True)
  dataset = dataset.repeat(num_epochs)
  global_seed = tf.constant(seed, tf.int64)

  def draw_augmentation(index, example):
    params = preprocess.augment_params(tf.stack([global_seed, index]), config)
    return {'image': example['image'],
            'hc_px': example['hc_px'] * params['hc_scale'], **params}

  def train_features(batch):
    images = preprocess.apply_augment(batch['image'], batch, config)
    return {
        'image': preprocess.zscore(images),
        'target': preprocess.hc_target(batch['hc_px'], normaliser_px),
    }

  # Parameters are drawn per example; the warp runs once per batch, which is
  # several times faster than warping image by image.
  dataset = dataset.enumerate().map(
      draw_augmentation, num_parallel_calls=AUTOTUNE, deterministic=True)
  dataset = dataset.batch(batch_size, drop_remainder=True)
  dataset = dataset.map(train_features, num_parallel_calls=AUTOTUNE,
                        deterministic=True)
  return dataset.prefetch(AUTOTUNE)


def _pad_batch(batch, batch_size):
  """Pads every field of a batch to `batch_size` rows of zeros ('' strings)."""
  num_padding = batch_size - tf.shape(batch['mask'])[0]

  def pad(value):
    padding = tf.zeros(
        tf.concat([[num_padding], tf.shape(value)[1:]], axis=0), value.dtype)
    padded = tf.concat([value, padding], axis=0)
    return tf.ensure_shape(padded, [batch_size] + value.shape[1:].as_list())

  return {name: pad(value) for name, value in batch.items()}


def eval_dataset(prepared: tf.data.Dataset, *, batch_size: int,
                 normaliser_px: float) -> tf.data.Dataset:
  """Evaluation batches that score every example exactly once.

  cache -> map(zscore, target) -> batch -> pad the last batch -> prefetch. The
  last batch is padded with zero examples whose 'mask' is 0.0 (1.0 for real
  ones) and whose 'filename' is b'', so every batch has `batch_size` rows and
  masked metrics cover exactly the examples of `prepared`.

  Args:
    prepared: output of `prepare`.
    batch_size: rows per batch.
    normaliser_px: target = hc_px / normaliser_px.

  Returns:
    Dataset of {'image': float32 [B, S, S, 1], 'target': float32 [B],
    'mask': float32 [B], 'hc_px': float32 [B], 'pixel_size_mm': float32 [B],
    'filename': string [B]}.
  """
  _hide_gpus_from_tf()

  def eval_features(example):
    return {
        'image': preprocess.zscore(example['image']),
        'target': preprocess.hc_target(example['hc_px'], normaliser_px),
        'mask': tf.constant(1.0, tf.float32),
        'hc_px': example['hc_px'],
        'pixel_size_mm': example['pixel_size_mm'],
        'filename': example['filename'],
    }

  dataset = prepared.cache().map(eval_features, num_parallel_calls=AUTOTUNE,
                                 deterministic=True)
  # Padding per batch, rather than counting first, works for datasets whose
  # length TF does not know (any filtered one).
  dataset = dataset.batch(batch_size).map(
      lambda batch: _pad_batch(batch, batch_size))
  return dataset.prefetch(AUTOTUNE)


def as_numpy(dataset: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """Iterates a dataset as dicts of NumPy arrays (strings as bytes)."""
  yield from dataset.as_numpy_iterator()


def export_numpy(prepared: tf.data.Dataset, path: Union[str, os.PathLike],
                 compressed: bool = True) -> int:
  """Writes prepared examples to an .npz that `numpy_data.load_numpy` reads.

  Args:
    prepared: output of `prepare` (finite).
    path: output .npz file.
    compressed: zip-deflate the arrays.

  Returns:
    The number of examples written.
  """
  _hide_gpus_from_tf()
  columns = {key: [] for key in PREPARED_KEYS}
  for example in prepared.as_numpy_iterator():
    for key in PREPARED_KEYS:
      columns[key].append(example[key])
  image_shape = prepared.element_spec['image'].shape.as_list()
  images = (np.stack(columns['image']) if columns['image'] else
            np.zeros([0] + image_shape, np.uint8))
  numpy_data.save_numpy(path, {
      'images': images,
      'hc_px': np.asarray(columns['hc_px'], np.float32),
      'pixel_size_mm': np.asarray(columns['pixel_size_mm'], np.float32),
      'filename': np.asarray(
          [name.decode('utf-8') for name in columns['filename']], np.str_),
      'subject_id': np.asarray(columns['subject_id'], np.int32),
  }, compressed=compressed)
  return len(images)
