"""The data of a fold-vmapped run: an export, its folds, and the members.

`hc_jax.train_folds` trains M members (a loss × a test fold) at once. This
module holds what it needs on the host, without TensorFlow: the exported
images and labels (`hc_jax.numpy_data`) with their fold assignment, and per
member its train/val/test positions in the export, target normaliser,
workdir and each epoch's batches.

  data = fold_data.load('export/hc18_224.npz', 'export/hc18_224.folds.json')
  members = fold_data.Members(data, ('huber', 'mse'), folds=(0, 1, 2, 3, 4),
                              batch_size=8)
  index, active = members.epoch_batches(seed=0, epoch=1)
"""

import dataclasses
from typing import Optional, Sequence

import numpy as np

from hc_jax import folds as folds_lib
from hc_jax import numpy_data


@dataclasses.dataclass
class FoldData:
  """The images of an export and its fold assignment, on the host.

  Attributes:
    arrays: the `numpy_data` fields ('images', 'hc_px', 'pixel_size_mm',
      'filename', 'subject_id').
    assignment: the folds; it holds exactly the exported images.
  """
  arrays: dict[str, np.ndarray]
  assignment: folds_lib.FoldAssignment

  @property
  def image_size(self) -> int:
    return int(self.arrays['images'].shape[1])

  def indices(self, fold: int) -> dict[str, np.ndarray]:
    """Positions in the export of a fold's 'train', 'val' and 'test' images."""
    position = {name: i for i, name in enumerate(self.arrays['filename'])}
    return {part: np.asarray([position[name] for name in names], np.int32)
            for part, names in self.assignment.split(fold).items()}


def load(npz_path: str, folds_path: str) -> FoldData:
  """Reads an export and its fold assignment (see benchmarks/export_for_gpu).

  Args:
    npz_path: the .npz written by `input_pipeline.export_numpy`.
    folds_path: the fold assignment JSON (`FoldAssignment.to_json`).

  Returns:
    The `FoldData`.

  Raises:
    ValueError: when either file is malformed or they hold different images.
  """
  arrays = numpy_data.load_numpy(npz_path)
  assignment = folds_lib.FoldAssignment.from_json(folds_path)
  exported, assigned = set(arrays['filename']), set(assignment.filenames)
  if exported != assigned:
    raise ValueError(
        f'{folds_path} and {npz_path} differ: {len(assigned - exported)} '
        f'assigned images are not exported (e.g. '
        f'{sorted(assigned - exported)[:3]}), {len(exported - assigned)} '
        'exported images are not assigned')
  return FoldData(arrays, assignment)


def padded_index(index_lists: Sequence[np.ndarray],
                 multiple: int) -> tuple[np.ndarray, np.ndarray]:
  """Stacks ragged position lists, padded with 0, and marks the real ones.

  Args:
    index_lists: one int array per member.
    multiple: the padded length is a positive multiple of this.

  Returns:
    `(index, mask)`: int32 and bool `[M, L]`.
  """
  length = max(len(indices) for indices in index_lists)
  length = max(multiple, -(-length // multiple) * multiple)
  index = np.zeros((len(index_lists), length), np.int32)
  mask = np.zeros((len(index_lists), length), bool)
  for m, indices in enumerate(index_lists):
    index[m, :len(indices)] = indices
    mask[m, :len(indices)] = True
  return index, mask


class Members:
  """The (loss, fold) members of a run: splits, normalisers, batches.

  Attributes:
    pairs: `(loss, fold)` per member, losses outermost.
    split: per member, {'train', 'val', 'test'} -> export positions.
    normaliser_px: float32 [M]; the target is HC in px over this.
    steps: int [M], training steps per epoch (`len(train) // batch_size`).
  """

  def __init__(self, data: FoldData, losses: Sequence[str],
               folds: Optional[Sequence[int]], batch_size: int,
               hc_normaliser_px: float = 0.0):
    """Lays out the members.

    Args:
      data: the export and its folds.
      losses: loss names; each is trained on every fold.
      folds: test folds (None: all).
      batch_size: training images per member and step.
      hc_normaliser_px: 0 takes each fold's largest training HC (px), as
        `hc_jax.data` does; else this constant.

    Raises:
      ValueError: when a fold cannot fill a batch or has no validation part.
    """
    folds = tuple(range(data.assignment.num_folds)) if folds is None else (
        tuple(folds))
    self.batch_size = batch_size
    self.pairs = [(loss, fold) for loss in losses for fold in folds]
    split = {fold: data.indices(fold) for fold in folds}
    self.split = [split[fold] for _, fold in self.pairs]
    hc_px = data.arrays['hc_px']
    self.normaliser_px = np.asarray(
        [hc_normaliser_px or float(hc_px[s['train']].max())
         for s in self.split], np.float32)
    self.steps = np.asarray([len(s['train']) // batch_size
                             for s in self.split])
    if self.steps.min() < 1:
      raise ValueError(
          f'batch_size={batch_size} but the smallest fold has '
          f'{min(len(s["train"]) for s in self.split)} training images')
    no_val = [fold for fold in folds if not len(split[fold]['val'])]
    if no_val:
      raise ValueError(f'folds {no_val} have no validation images to select '
                       'the epoch by (val_fraction 0?)')

  def __len__(self):
    return len(self.pairs)

  @property
  def folds(self) -> np.ndarray:
    return np.asarray([fold for _, fold in self.pairs], np.int32)

  def epoch_batches(self, seed: int, epoch: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's batches of every member.

    Each member takes `steps[m]` batches of a permutation of its training
    images drawn from (seed, fold, epoch), dropping the remainder, as
    `hc_jax.train` does; members of one fold share the order.

    Args:
      seed: the run's seed.
      epoch: the epoch, from 1.

    Returns:
      `(index, active)`: int32 `[max steps, M, batch_size]` export positions
      (0 where inactive) and bool `[max steps, M]`, whether a member takes
      that step.
    """
    num_steps = int(self.steps.max())
    index = np.zeros((num_steps, len(self), self.batch_size), np.int32)
    active = np.zeros((num_steps, len(self)), bool)
    for m, ((_, fold), split) in enumerate(zip(self.pairs, self.split)):
      rng = np.random.default_rng([seed, fold, epoch])
      count = self.steps[m] * self.batch_size
      order = rng.permutation(split['train'])[:count]
      index[:self.steps[m], m] = order.reshape(self.steps[m], -1)
      active[:self.steps[m], m] = True
    return index, active
