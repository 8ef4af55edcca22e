"""The data of a training run: prepared HC18, its folds, and the batches.

One source for every machine: HC18 prepared once into resized uint8 arrays
(`hc_jax.data.cache`), the subject-grouped folds (`hc_jax.data.folds`), and,
per member of a run (a test fold, a loss, a seed), its train/validation/test
positions in those arrays. Training batches are gathered on the host and
augmented on the accelerator inside the jitted step (`hc_jax.data.augment`).

Batches come from a tf.data pipeline where TensorFlow is installed and from a
plain NumPy iterator where it is not (`backend`); both yield the same batches
for the same seed and epoch, since the order is drawn with NumPy from
(seed, fold, epoch) and only the gathering differs. On several hosts each
process reads its own rows of every global batch (`process_slice`).

  run_data = data.load(configs, workdirs)
  for batch in run_data.train_batches(epoch=1):   # image uint8 [M, B, H, W, 1]
    ...
"""

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np

from hc_jax import workdir as workdir_lib
from hc_jax.data import cache as cache_lib
from hc_jax.data import folds as folds_lib
from hc_jax.data import hc18


def hc18_source_dir(config, workdir: str) -> str | None:
  """The HC18 directory a config asks for (None means download); for
  phantom scans, the run's own directory of them (`write_phantoms` writes
  them). Looks only: nothing is written.

  Raises:
    ValueError: when the directory is missing or holds no HC18 CSV.
  """
  if config.data.source == 'synthetic':
    return os.path.join(workdir, workdir_lib.SYNTHETIC_DIR)
  if config.data.source == 'folder':
    directory = config.data.get('folder', '')
    if not directory or not os.path.isdir(directory):
      raise ValueError(
          f'data.folder={directory!r} is not a folder: with '
          "data.source='folder' name your scans' folder "
          '(--config.data.folder=DIR, its CSV --config.data.labels=FILE or '
          'DIR/labels.csv; see hc_jax/data/folder.py)')
    return directory
  if config.data.source != 'hc18':
    raise ValueError(f"data.source must be 'hc18', 'synthetic' or 'folder', "
                     f'got {config.data.source!r}')
  if config.data.hc18_dir == 'download':
    return None
  root = config.data.hc18_dir or hc18.default_dir()
  if not root:
    raise ValueError(
        'HC18 not found: looked for $HC18_DIR and for a copy named hc18 in a '
        'folder "shared" beside the checkout (../shared/hc18); download it '
        'from Zenodo record 1327317 (README, "Getting HC18") and pass '
        '--config.data.hc18_dir=DIR or set HC18_DIR; '
        '--config.data.source=synthetic trains on phantom scans')
  csv_path = os.path.join(root, hc18.SPLITS['train'][1])
  if not os.path.isfile(csv_path):
    raise ValueError(f'data.hc18_dir={root!r} holds no '
                     f'{hc18.SPLITS["train"][1]}')
  return root


def write_phantoms(config, root: str) -> None:
  """Writes the phantom scans of a `data.source='synthetic'` config into
  `root` in the HC18 layout, unless a complete set is already there (its
  test CSV, written last)."""
  from hc_jax.data import phantom_set  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(os.path.join(root, hc18.SPLITS['test'][1])):
    phantom_set.write_hc18(root, num_train=config.data.num_synthetic,
                           num_test=max(4, config.data.num_synthetic // 10),
                           seed=config.seed)


def prepared_arrays(config, workdir: str
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The prepared arrays a config trains on, and their info.

  `config.data.prepared` names an exported .npz (read with NumPy alone);
  otherwise HC18 (or the phantoms, written into the run first by
  `write_phantoms`) is prepared and cached by the digest of its content.

  Raises:
    cache.PreparedError: for an export made for another input size or
      resize mode.
    hc18.HC18Error: for a broken HC18 copy (every bad file listed).
  """
  shape = cache_lib.input_shape(config)
  if config.data.get('prepared'):
    arrays, info = cache_lib.load(config.data.prepared)
    made = (tuple(info.get('image_hw', ())), info.get('resize_mode'))
    if made != (shape, config.resize_mode):
      raise cache_lib.PreparedError(
          f'{config.data.prepared} holds {made[0]} images resized by '
          f'{made[1]!r}, but the config asks for {shape} by '
          f'{config.resize_mode!r}')
    return arrays, info
  root = hc18_source_dir(config, workdir)
  cache_dir = config.data.get('cache_dir', '')
  if config.data.source == 'folder':
    return cache_lib.prepare_folder(root, config.data.get('labels', ''), shape,
                                    config.resize_mode, cache_dir)
  cache_flag = '--config.data.cache_dir'
  if config.data.source == 'synthetic':  # Its own cache, in the workdir.
    write_phantoms(config, root)
    cache_dir = os.path.join(workdir, workdir_lib.DATA_CACHE_DIR)
    cache_flag = 'in the workdir, --workdir'
  return cache_lib.prepare(root, shape, config.resize_mode, cache_dir,
                           cache_flag)


def fold_assignment(config, filenames, hc_mm, workdir: str,
                    subject_ids=None) -> folds_lib.FoldAssignment:
  """Draws the folds, or checks them against a resumed run's folds.json.

  `subject_ids` (a folder data set's) group the images; None reads them
  from HC18's filenames.
  """
  assignment = folds_lib.assign_folds(
      list(filenames), [float(h) for h in hc_mm], num_folds=config.num_folds,
      val_fraction=config.val_fraction, seed=config.fold_seed,
      subject_ids=subject_ids)
  path = os.path.join(workdir, workdir_lib.FOLDS_FILE)
  if os.path.exists(path):
    saved = folds_lib.FoldAssignment.from_json(path)
    if saved != assignment:
      raise ValueError(f'{path} holds a different fold assignment than this '
                       'config draws; use a new workdir')
  return assignment


def process_slice(batch_size: int, process_index: int, process_count: int
                  ) -> slice:
  """The rows of each global batch that one host reads."""
  if batch_size % process_count:
    raise ValueError(f'batch size {batch_size} is not divisible by the '
                     f'{process_count} processes')
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


@dataclasses.dataclass
class RunData:
  """The arrays of a run and, per member, its split and batches.

  Attributes:
    arrays: the prepared arrays (`hc_jax.data.cache`).
    info: what they were prepared from ('source_digest', ...).
    assignment: the fold assignment.
    folds: int [M], each member's test fold.
    seeds: int [M], each member's seed (orders its batches).
    split: per member, {'train', 'val', 'test'} -> positions in `arrays`.
    normaliser_px: float32 [M]; targets are HC in px over this.
    batch_size: global training batch per member.
    steps: int [M], training steps per epoch.
    rows: which rows of each global batch this process reads.
  """
  arrays: dict[str, np.ndarray]
  info: dict[str, Any]
  assignment: folds_lib.FoldAssignment
  folds: np.ndarray
  seeds: np.ndarray
  split: list[dict[str, np.ndarray]]
  normaliser_px: np.ndarray
  batch_size: int
  steps: np.ndarray
  rows: slice = dataclasses.field(default_factory=lambda: slice(None))

  def __len__(self) -> int:
    return len(self.folds)

  def epoch_index(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's global batches of every member.

    Member m takes `steps[m]` batches of a permutation of its training images
    drawn from (seed, fold, epoch), the remainder dropped. So a member's
    batches depend on nothing else in the run, and a resumed run sees the
    very batches an uninterrupted one would.

    Returns:
      `(index, active)`: int32 [max steps, M, batch] positions in `arrays`
      (0 where inactive) and bool [max steps, M], whether a member steps.
    """
    num_steps = int(self.steps.max())
    index = np.zeros((num_steps, len(self), self.batch_size), np.int32)
    active = np.zeros((num_steps, len(self)), bool)
    for m, split in enumerate(self.split):
      rng = np.random.default_rng([int(self.seeds[m]), int(self.folds[m]),
                                   epoch])
      count = self.steps[m] * self.batch_size
      order = rng.permutation(split['train'])[:count]
      index[:self.steps[m], m] = order.reshape(self.steps[m], -1)
      active[:self.steps[m], m] = True
    return index, active

  def _gather(self, index: np.ndarray) -> dict[str, np.ndarray]:
    arrays = self.arrays
    return {'image': arrays['images'][index],
            'ellipse': arrays['ellipse'][index],
            'hc_px': arrays['hc_px'][index], 'resize': arrays['resize'][index]}

  def train_batches(self, epoch: int, backend: str = 'auto', start: int = 0
                    ) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of an epoch's training batches.

    Args:
      epoch: the epoch, from 1.
      backend: 'tf' (a tf.data pipeline that gathers and prefetches in the
        background), 'numpy', or 'auto' (tf where TensorFlow imports).
      start: the first step to yield (a run resumed in the middle of the
        epoch): the batches after it are those of the whole epoch.

    Yields:
      {'image': uint8 [M, b, H, W, 1], 'ellipse': [M, b, 5], 'hc_px': [M, b],
      'resize': [M, b, 4], 'active': bool [M]}, b the local batch rows.
    """
    index, active = self.epoch_index(epoch)
    index, active = index[start:, :, self.rows], active[start:]
    if backend == 'auto':
      backend = 'tf' if _has_tensorflow() else 'numpy'
    if backend == 'numpy':
      for step in range(len(index)):
        yield {**self._gather(index[step]), 'active': active[step]}
      return
    if backend != 'tf':
      raise ValueError(f"backend must be 'tf', 'numpy' or 'auto', not "
                       f'{backend!r}')
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    if not hasattr(self, '_tf_arrays'):  # Copied into TensorFlow once.
      self._tf_arrays = {name: tf.constant(self.arrays[source])
                         for name, source in (
                             ('image', 'images'), ('ellipse', 'ellipse'),
                             ('hc_px', 'hc_px'), ('resize', 'resize'))}
    arrays = self._tf_arrays
    dataset = tf.data.Dataset.from_tensor_slices((index, active)).map(
        lambda i, a: {**{k: tf.gather(v, i) for k, v in arrays.items()},
                      'active': a},
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    yield from dataset.prefetch(2).as_numpy_iterator()

  def eval_index(self, part: str, batch_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Every member's 'val' or 'test' positions, padded to whole batches.

    Returns:
      `(index, mask)`: int32 and bool [M, L], L a multiple of `batch_size`;
      padding repeats position 0 with mask False, so metrics over the mask
      cover every image of the part exactly once.
    """
    lists = [split[part] for split in self.split]
    length = max(max(len(positions) for positions in lists), 1)
    length = -(-length // batch_size) * batch_size
    index = np.zeros((len(lists), length), np.int32)
    mask = np.zeros((len(lists), length), bool)
    for m, positions in enumerate(lists):
      index[m, :len(positions)] = positions
      mask[m, :len(positions)] = True
    return index, mask


def _has_tensorflow() -> bool:
  try:
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def load(configs: Sequence[Any], workdirs: Sequence[str],
         process_index: int = 0, process_count: int = 1) -> RunData:
  """The data of a run of one or more members.

  Args:
    configs: one config per member; they may differ only in fold, loss and
      seed (the trainer checks).
    workdirs: the members' workdirs (a resumed run's folds.json is checked).
    process_index: this host (`jax.process_index()`).
    process_count: the number of hosts.

  Returns:
    The `RunData`.

  Raises:
    ValueError: when a fold cannot fill a batch or has no validation part.
  """
  config = configs[0]
  arrays, info = prepared_arrays(config, workdirs[0])
  assignment = fold_assignment(
      config, arrays['filename'], arrays['hc_mm'], workdirs[0],
      arrays['subject_id'] if config.data.source == 'folder' else None)
  position = {name: i for i, name in enumerate(arrays['filename'])}
  split = []
  for member in configs:
    names = assignment.split(member.fold)
    split.append({part: np.asarray([position[n] for n in names[part]],
                                   np.int32) for part in names})
  normaliser = np.asarray(
      [float(member.hc_normaliser_px) or
       float(arrays['hc_px'][s['train']].max()) for member, s in
       zip(configs, split)], np.float32)
  steps = np.asarray([len(s['train']) // config.batch_size for s in split])
  if steps.min() < 1:
    raise ValueError(
        f'batch_size={config.batch_size} but fold '
        f'{configs[int(np.argmin(steps))].fold} has '
        f'{min(len(s["train"]) for s in split)} training images')
  no_val = sorted({member.fold for member, s in zip(configs, split)
                   if not len(s['val'])})
  if no_val:
    raise ValueError(f'folds {no_val} have no validation images to select '
                     'the epoch by (val_fraction 0?)')
  return RunData(
      arrays=arrays, info=info, assignment=assignment,
      folds=np.asarray([member.fold for member in configs]),
      seeds=np.asarray([member.seed for member in configs]), split=split,
      normaliser_px=normaliser, batch_size=config.batch_size, steps=steps,
      rows=process_slice(config.batch_size, process_index, process_count))


def save_json(path: str, value) -> None:
  """Writes JSON atomically (a crash never leaves half a file)."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
