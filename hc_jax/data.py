"""The data of one training run: HC18 (or phantoms), its folds, its batches.

`load(config, workdir)` builds the `hc18` TFDS data set when needed, draws the
subject-grouped folds, and returns a `RunData` whose methods give NumPy batches
for the training loop: a fresh, reproducible pass per epoch (so a resumed run
sees the very batches an uninterrupted one would), and padded, masked
evaluation passes over the validation and test parts.
"""

import dataclasses
import json
import os
from typing import Callable, Iterator

import numpy as np

from hc_jax import folds as folds_lib
from hc_jax import hc18

FOLDS_FILE = 'folds.json'


@dataclasses.dataclass
class RunData:
  """Batches and facts of one fold of one run.

  Attributes:
    folds: the fold assignment (saved in the workdir).
    split: {'train', 'val', 'test'} -> filenames of this fold.
    normaliser_px: targets are HC in px of the original image over this.
    train_epoch: epoch -> iterator of {'image', 'target'} batches.
    eval_batches: part ('val' or 'test') -> iterator of padded, masked
      batches with 'image', 'target', 'mask', 'hc_px', 'pixel_size_mm',
      'filename'.
  """
  folds: folds_lib.FoldAssignment
  split: dict[str, list[str]]
  normaliser_px: float
  train_epoch: Callable[[int], Iterator[dict[str, np.ndarray]]]
  eval_batches: Callable[[str], Iterator[dict[str, np.ndarray]]]


def hc18_source_dir(config, workdir: str) -> str | None:
  """The HC18 directory a config asks for (None means download).

  Raises:
    ValueError: when the directory is missing or holds no HC18 CSV.
  """
  if config.data.source == 'synthetic':
    from hc_jax import synthetic  # pylint: disable=import-outside-toplevel
    root = os.path.join(workdir, 'data', 'hc18_synthetic')
    if not os.path.isfile(os.path.join(root, hc18.SPLITS['test'][1])):
      synthetic.write_hc18(root, num_train=config.data.num_synthetic,
                           num_test=max(4, config.data.num_synthetic // 10),
                           seed=config.seed)
    return root
  if config.data.source != 'hc18':
    raise ValueError(f"data.source must be 'hc18' or 'synthetic', got "
                     f'{config.data.source!r}')
  if config.data.hc18_dir == 'download':
    return None
  root = config.data.hc18_dir or hc18.default_dir()
  if not root:
    raise ValueError('HC18 not found: set --config.data.hc18_dir=DIR (the '
                     "Zenodo layout), or 'download', or $HC18_DIR")
  csv_path = os.path.join(root, hc18.SPLITS['train'][1])
  if not os.path.isfile(csv_path):
    raise ValueError(f'data.hc18_dir={root!r} holds no '
                     f'{hc18.SPLITS["train"][1]}')
  return root


def _tfds_dir(config, workdir: str) -> str | None:
  if config.data.source == 'synthetic':
    return os.path.join(workdir, 'data', 'tfds')
  return config.data.tfds_data_dir or None


def fold_assignment(config, filenames, hc_mm, workdir: str
                    ) -> folds_lib.FoldAssignment:
  """Draws the folds, or reloads them from the workdir of a resumed run."""
  assignment = folds_lib.assign_folds(
      filenames, hc_mm, num_folds=config.num_folds,
      val_fraction=config.val_fraction, seed=config.fold_seed)
  path = os.path.join(workdir, FOLDS_FILE)
  if os.path.exists(path):
    saved = folds_lib.FoldAssignment.from_json(path)
    if saved != assignment:
      raise ValueError(f'{path} holds a different fold assignment than this '
                       'config draws; use a new workdir')
  else:
    assignment.to_json(path)
  return assignment


def load(config, workdir: str) -> RunData:
  """Builds the data of one fold for `train.train_and_evaluate`.

  Args:
    config: the run's config (data, folds, image size, batch sizes, seed).
    workdir: the run's directory (fold assignment saved there).

  Returns:
    The fold's `RunData`.
  """
  # pylint: disable=import-outside-toplevel
  from hc_jax import hc18_tfds
  from hc_jax import input_pipeline
  root = hc18_source_dir(config, workdir)
  builder = hc18_tfds.build(root, _tfds_dir(config, workdir))
  examples = builder.as_dataset(split='train')
  # The small metadata columns, without decoding images.
  meta = examples.map(lambda e: {'filename': e['filename'],
                                 'hc_mm': e['hc_mm'], 'hc_px': e['hc_px']})
  meta = list(meta.as_numpy_iterator())
  filenames = [m['filename'].decode() for m in meta]
  hc_px = {f: float(m['hc_px']) for f, m in zip(filenames, meta)}
  assignment = fold_assignment(config, filenames,
                               [float(m['hc_mm']) for m in meta], workdir)
  split = assignment.split(config.fold)
  normaliser_px = float(config.hc_normaliser_px) or max(
      hc_px[f] for f in split['train'])

  def prepared(part):
    subset = input_pipeline.filter_filenames(examples, split[part])
    return input_pipeline.prepare(subset, config.image_size,
                                  config.resize_mode).cache()

  parts = {part: prepared(part) for part in ('train', 'val', 'test')}

  def train_epoch(epoch):
    dataset = input_pipeline.train_dataset(
        parts['train'], batch_size=config.batch_size,
        normaliser_px=normaliser_px,
        seed=int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0]),
        augment=config.augment, num_epochs=1)
    return input_pipeline.as_numpy(dataset)

  # Evaluation batches do not change between epochs: built once, kept as
  # NumPy (the validation part is scored every epoch; rebuilding its tf.data
  # pipeline cost more than the forward passes).
  eval_cache = {}

  def eval_batches(part):
    if part not in eval_cache:
      dataset = input_pipeline.eval_dataset(
          parts[part], batch_size=config.eval_batch_size,
          normaliser_px=normaliser_px)
      eval_cache[part] = list(input_pipeline.as_numpy(dataset))
    return iter(eval_cache[part])

  return RunData(folds=assignment, split=split, normaliser_px=normaliser_px,
                 train_epoch=train_epoch, eval_batches=eval_batches)


def save_json(path: str, value) -> None:
  """Writes JSON atomically (a crash never leaves half a file)."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
