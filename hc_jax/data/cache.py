"""HC18 prepared once: resized uint8 images plus per-image metadata, cached.

Every run trains from the same prepared form, whatever the machine:

  images         uint8   [N, H, W, 1]  resized to the model input (H x W)
  filename       str     [N]           e.g. '010_2HC.png'
  subject_id     int32   [N]
  pixel_size_mm  float32 [N]           of the original image
  hc_mm, hc_px   float32 [N]           reference HC (px of the original image)
  ellipse        float32 [N, 5]        reference ellipse in original pixels:
                                       centre x, centre y, semi-axes a >= b,
                                       angle (rad, from +x towards +y)
  original_hw    int32   [N, 2]        original height and width
  resize         float32 [N, 4]        sx, sy, ox, oy: an original pixel
                                       (x, y) lies at (sx x + ox, sy y + oy)
                                       of the resized image

The images are decoded by the `hc18` TFDS builder (`hc_jax.data.hc18_tfds`, which
checks every file) and resized in tf.data (`hc_jax.data.resize.resize`), once.
The result is cached as an .npz keyed by a digest of the source's content
(`digests.content_digest`: the bytes of the CSVs and of every image file), so
another copy of HC18, or one with a file changed in place, is prepared (and
checked) anew instead of silently reusing an older build. Each file is hashed
once; `digests.HASHES_FILE` in the cache directory remembers its hash by
path, size and modification and change times, so unchanged files are not
read again. Runs record both that digest ('content_digest') and the cheaper
`digests.source_digest` (names and sizes), which older runs and shipped
models carry. Each cached
.npz records a digest of its arrays, checked whenever it is read: a damaged or
rewritten one is prepared again. Reading a cached or exported .npz needs NumPy only, so a machine
without TensorFlow trains from `--config.data.prepared=FILE.npz`, written by

  python -m hc_jax.prepare --config=configs/resnet_mse.py --out=export/

Processes preparing into one cache directory at once (two runs started
together on a fresh cache) take turns: the build holds `BUILD_LOCK` there (an
flock, released when the process ends however it ends), and the second
process, once it has the lock, reads what the first prepared. The process
holding the lock removes what killed builds left (TFDS's `incomplete.*`
folders and `prepared_*` temporary files, `hc_jax.leftovers`).
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from typing import Any

import numpy as np

from hc_jax import leftovers
from hc_jax import log
from hc_jax.data import digests
from hc_jax.data import hc18

FORMAT_VERSION = 1
ARRAY_FIELDS = {
    'images': np.uint8, 'filename': np.str_, 'subject_id': np.int32,
    'pixel_size_mm': np.float32, 'hc_mm': np.float32, 'hc_px': np.float32,
    'ellipse': np.float32, 'original_hw': np.int32, 'resize': np.float32,
}
RESIZE_MODES = ('stretch', 'letterbox')
DOWNLOAD_DIGEST = 'zenodo-1327317'
# In a cache's hc18-<digest>/ folder: held (flock) while it is prepared.
BUILD_LOCK = '.prepare.lock'
# What TFDS names a build it has not finished, in tfds/<name>/.
_TFDS_INCOMPLETE = 'incomplete.'


class PreparedError(ValueError):
  """A prepared .npz that is missing, malformed or made for other settings."""


class CacheError(ValueError):
  """The cache directory refuses or loses what is prepared into it
  (read-only, permission denied, full, removed while in use)."""


def input_shape(config) -> tuple[int, int]:
  """(height, width) of the model input: image_size x (image_width or square)."""
  height = int(config.image_size)
  width = int(config.get('image_width', 0) or height)
  return height, width


def resize_geometry(original_hw, out_hw, mode: str) -> np.ndarray:
  """Where original pixels land in the resized image (`resize.resize`).

  tf.image.resize maps pixel centres as x_out + 0.5 = (x + 0.5) * scale.

  Args:
    original_hw: int [N, 2] original heights and widths.
    out_hw: (height, width) of the model input.
    mode: 'stretch' or 'letterbox'.

  Returns:
    float32 [N, 4] (sx, sy, ox, oy) with x_out = sx x + ox, y_out = sy y + oy.
  """
  original_hw = np.asarray(original_hw, np.float64).reshape(-1, 2)
  out_h, out_w = out_hw
  if mode == 'stretch':
    sy, sx = out_h / original_hw[:, 0], out_w / original_hw[:, 1]
    offset_y = offset_x = np.zeros(len(original_hw))
  elif mode == 'letterbox':
    scale = np.minimum(out_h / original_hw[:, 0], out_w / original_hw[:, 1])
    new_h = np.clip(np.round(original_hw[:, 0] * scale), 1, out_h)
    new_w = np.clip(np.round(original_hw[:, 1] * scale), 1, out_w)
    sy, sx = new_h / original_hw[:, 0], new_w / original_hw[:, 1]
    offset_y, offset_x = (out_h - new_h) // 2, (out_w - new_w) // 2
  else:
    raise ValueError(f'unknown resize_mode {mode!r}; choose one of '
                     f'{", ".join(RESIZE_MODES)}')
  return np.stack([sx, sy, 0.5 * sx - 0.5 + offset_x,
                   0.5 * sy - 0.5 + offset_y], axis=1).astype(np.float32)


def _checked(arrays: dict[str, Any], path: str) -> dict[str, np.ndarray]:
  missing = sorted(set(ARRAY_FIELDS) - set(arrays))
  if missing:
    raise PreparedError(f'{path}: not a prepared HC18 file (missing '
                        f'{", ".join(missing)})')
  out = {name: np.asarray(arrays[name]).astype(dtype, copy=False)
         for name, dtype in ARRAY_FIELDS.items()}
  lengths = {len(array) for array in out.values()}
  if len(lengths) != 1 or out['images'].ndim != 4:
    raise PreparedError(f'{path}: fields differ in length or images are not '
                        f'[N, H, W, 1] ({out["images"].shape})')
  return out


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
  """A digest of prepared arrays: every field's name, dtype, shape and bytes."""
  digest = hashlib.sha256()
  for name in sorted(ARRAY_FIELDS):
    array = np.ascontiguousarray(arrays[name])
    digest.update(f'{name}:{array.dtype.str}:{array.shape}\n'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()[:32]


def save(path: str, arrays: dict[str, np.ndarray], info: dict[str, Any]
         ) -> None:
  """Writes prepared arrays and their `info` atomically to an .npz.

  `info` gets 'arrays_digest' (`arrays_digest`), which `load` checks. The
  temporary files that killed writers of `path` left beside it are removed
  first (`leftovers.remove_stale`).
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  arrays = _checked(arrays, path)
  info = {**info, 'arrays_digest': arrays_digest(arrays)}
  leftovers.remove_stale(folder, os.path.basename(path))
  tmp = leftovers.tmp_name(path, '.npz')
  try:
    np.savez(tmp, info=np.asarray(json.dumps(info, sort_keys=True)),
             **arrays)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def load(path: str, require_digest: bool = False
         ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads a prepared .npz: (arrays, info), checked against the digest of
  its arrays that `save` recorded.

  Args:
    path: the .npz.
    require_digest: refuse a file without a recorded digest (a cached file;
      an export written by an older hc_jax has none and is read unchecked).

  Raises:
    PreparedError: for a missing, unreadable, malformed or damaged file.
  """
  if not os.path.isfile(path):
    raise PreparedError(f'{path}: no such prepared file')
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {name: f[name] for name in f.files}
    info = json.loads(str(arrays.pop('info', '{}')))
    if not isinstance(info, dict):
      raise ValueError('its info is not a JSON object')
  except Exception as e:  # pylint: disable=broad-except  # Any damage.
    text = ' '.join(str(e).split())
    raise PreparedError(f'{path}: cannot read ({type(e).__name__}'
                        f'{": " + text if text else ""})') from None
  if info.get('format_version') != FORMAT_VERSION:
    raise PreparedError(f'{path}: made by another version of hc_jax '
                        f'(format {info.get("format_version")}); prepare it '
                        'again')
  arrays = _checked(arrays, path)
  recorded = info.get('arrays_digest')
  if recorded is None and require_digest:
    raise PreparedError(f'{path}: records no digest of its arrays')
  if recorded is not None and recorded != arrays_digest(arrays):
    raise PreparedError(f'{path}: its arrays differ from what was written '
                        '(digest mismatch)')
  return arrays, info


def _from_tfds(root: str | None, tfds_dir: str, out_hw, mode: str
               ) -> dict[str, np.ndarray]:
  """Decodes HC18 with its TFDS builder and resizes it in tf.data.

  A TFDS build left in `tfds_dir` by an earlier run that cannot be read, or
  reads other than the examples it recorded (damaged, truncated or partly
  deleted files), is reported in one warning line, removed and built again.
  """
  from hc_jax.data import hc18_tfds  # pylint: disable=import-outside-toplevel
  built = os.path.join(tfds_dir, hc18_tfds.Hc18.name,
                       str(hc18_tfds.Hc18.VERSION))
  existed = os.path.isdir(built)
  try:
    return _read_tfds(hc18_tfds.build(root, tfds_dir), out_hw, mode)
  except hc18.HC18Error:  # The source is broken, not the build.
    raise
  except Exception as e:  # pylint: disable=broad-except  # Any damage.
    problem = log.storage_problem(e)
    if not existed or (problem and problem[0] != errno.ENOENT):
      raise  # Nothing to build again, or a disk that refuses writes.
    log.warn(f'the TFDS build {built} cannot be read ({log.error_line(e)}); '
             'building it again')
  shutil.rmtree(built)
  return _read_tfds(hc18_tfds.build(root, tfds_dir), out_hw, mode)


def _read_tfds(builder, out_hw, mode: str) -> dict[str, np.ndarray]:
  """The train split of a TFDS build, resized, as prepared arrays.

  Raises:
    RuntimeError: it reads other than the examples the build recorded.
  """
  # pylint: disable=import-outside-toplevel
  import tensorflow as tf
  from hc_jax.data import hc18_tfds
  from hc_jax.data import resize as resize_lib
  dataset = builder.as_dataset(split='train', shuffle_files=False)

  def resized(example):
    shape = tf.shape(example['image'])[:2]
    image = resize_lib.resize(example['image'], out_hw, mode)
    return {**example, 'image': resize_lib.to_uint8(image),
            'original_hw': tf.cast(shape, tf.int32)}

  columns = {name: [] for name in ARRAY_FIELDS if name != 'resize'}
  for example in dataset.map(resized, num_parallel_calls=tf.data.AUTOTUNE,
                             deterministic=True).as_numpy_iterator():
    example['filename'] = example['filename'].decode()
    example['ellipse'] = [example['ellipse'][key]
                          for key in hc18_tfds.ELLIPSE_KEYS]
    example['images'] = example['image']
    for name in columns:
      columns[name].append(example[name])
  recorded = builder.info.splits['train'].num_examples
  if len(set(columns['filename'])) != len(columns['filename']) or len(
      columns['filename']) != recorded:
    raise RuntimeError(f'{len(columns["filename"])} examples read '
                       f'({len(set(columns["filename"]))} distinct), '
                       f'{recorded} recorded')
  order = np.argsort(columns['filename'])  # Independent of TFDS' order.
  arrays = {name: np.asarray(values)[order] for name, values in columns.items()}
  arrays['resize'] = resize_geometry(arrays['original_hw'], out_hw, mode)
  return arrays


def default_cache_dir() -> str:
  return os.path.join(os.path.expanduser('~'), '.cache', 'hc_jax')


def _announce(root: str | None, out_hw, mode: str, directory: str) -> None:
  """The status line of a preparation starting (with the CSV's scan count)."""
  num = ''
  if root is not None:
    csv_path = os.path.join(root, hc18.SPLITS['train'][1])
    with open(csv_path, 'rb') as f:
      num = f' ({max(sum(1 for _ in f) - 1, 0)} scans)'
  log.status(f'preparing HC18 from {root or "Zenodo"}{num} at '
             f'{out_hw[0]}x{out_hw[1]} ({mode}) into {directory}: checks '
             'every file, about 90 s for 900 scans, once')


@contextlib.contextmanager
def _build_lock(directory: str):
  """Holds `BUILD_LOCK` in `directory` (waiting for another process that
  holds it); without flock (some network file systems), holds nothing."""
  os.makedirs(directory, exist_ok=True)
  fd = os.open(os.path.join(directory, BUILD_LOCK), os.O_CREAT | os.O_RDWR,
               0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      log.status(f'waiting for another process preparing {directory}...')
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
      pass  # No flock here: as before, the last complete build stays.
    yield
  finally:
    os.close(fd)  # Releases the flock.


def _remove_leftovers(directory: str, tfds_dir: str) -> None:
  """Removes what killed preparations left in `directory` (call it holding
  `_build_lock`): temporary prepared files of processes gone, and
  unfinished TFDS builds, which only a lock holder writes."""
  removed = leftovers.remove_stale(directory, 'prepared_')
  with contextlib.suppress(OSError):
    for name in os.listdir(tfds_dir):
      builds = os.path.join(tfds_dir, name)
      for build in os.listdir(builds) if os.path.isdir(builds) else ():
        if build.startswith(_TFDS_INCOMPLETE):
          shutil.rmtree(os.path.join(builds, build), ignore_errors=True)
          removed.append(os.path.join(builds, build))
  if removed:
    log.status(f'removed {len(removed)} unfinished file(s) of killed '
               f'preparations in {directory}')


def prepare(root: str | None, out_hw, mode: str, cache_dir: str = '',
            cache_flag: str = '--config.data.cache_dir'
            ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The prepared training split of an HC18 directory, from cache if made.

  Args:
    root: an HC18 directory in the Zenodo layout; None downloads it.
    out_hw: (height, width) of the model input.
    mode: 'stretch' or 'letterbox'.
    cache_dir: where prepared files and TFDS builds are kept ('' for
      ~/.cache/hc_jax).
    cache_flag: the flag that sets `cache_dir`, for messages.

  Returns:
    (arrays, info): see the module docstring; info holds 'source',
    'source_digest', 'content_digest', 'image_hw', 'resize_mode',
    'num_images' and 'arrays_digest'.

  Raises:
    hc18.HC18Error: listing every bad file of a broken copy.
    CacheError: the cache directory is read-only, full or was removed while
      HC18 was prepared into it (one line naming it and what to do).
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f'unknown resize_mode {mode!r}; choose one of '
                     f'{", ".join(RESIZE_MODES)}')
  cache_dir = cache_dir or default_cache_dir()
  if root is None:
    digest = content = DOWNLOAD_DIGEST
  else:
    digest = digests.source_digest(root)
    content = _content_digest(root, cache_dir, out_hw, mode)
  directory = os.path.join(cache_dir, f'hc18-{content}')

  def build():
    tfds_dir = os.path.join(directory, 'tfds')
    _remove_leftovers(directory, tfds_dir)
    _announce(root, out_hw, mode, directory)
    arrays = _from_tfds(root, tfds_dir, out_hw, mode)
    return arrays, _info(arrays, out_hw, mode, source=root or 'download',
                         source_digest=digest, content_digest=content)

  return _cached(directory, _prepared_path(directory, out_hw, mode), build,
                 f'cannot prepare HC18 in the cache {cache_dir} '
                 f'({cache_flag})')


def _info(arrays, out_hw, mode, **source) -> dict:
  """A prepared set's info: the format, what it came from (`source`), its
  input size, resize mode and number of images."""
  return {'format_version': FORMAT_VERSION, **source,
          'image_hw': list(out_hw), 'resize_mode': mode,
          'num_images': int(len(arrays['images']))}


def _cached(directory: str, path: str, build, refusal: str
            ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The prepared arrays at `path`, or `build()`'s, saved there.

  A damaged file is prepared again (with a warning); the build runs under
  `_build_lock` in `directory`, so a process that waited reads what the
  first one wrote. A file system that refuses the cache ends in a
  CacheError: `refusal` and the reason.
  """
  if os.path.isfile(path):
    try:
      return load(path, require_digest=True)
    except PreparedError as e:
      log.warn(f'{e}; preparing it again')
  try:
    with _build_lock(directory):
      if os.path.isfile(path):  # Prepared by another process meanwhile.
        with contextlib.suppress(PreparedError):
          return load(path, require_digest=True)
      started = time.time()
      arrays, info = build()
      save(path, arrays, info)
  except Exception as e:  # pylint: disable=broad-except
    text = None if isinstance(e, ValueError) else log.storage_error_text(
        e, directory)
    if text is None:
      raise
    raise CacheError(f'{refusal}: {text}') from None
  log.status(
      f'prepared {len(arrays["images"])} scans in {time.time() - started:.0f}'
      f' s: {path}')
  return arrays, info


def _prepared_path(directory: str, out_hw, mode: str) -> str:
  return os.path.join(directory,
                      f'prepared_{out_hw[0]}x{out_hw[1]}_{mode}.npz')


def _content_digest(root: str, cache_dir: str, out_hw, mode: str) -> str:
  """`digests.content_digest` of `root`, the remembered file hashes used;
  when they lead to no prepared file, taken again from the bytes alone:
  a wrong remembered hash (a damaged `digests.HASHES_FILE`) must not make
  a fresh preparation under another digest, and then a refused resume."""
  hashes = os.path.join(cache_dir, digests.HASHES_FILE)
  content = digests.content_digest(root, hashes)
  if os.path.isfile(_prepared_path(os.path.join(cache_dir, f'hc18-{content}'),
                                   out_hw, mode)):
    return content
  checked = digests.content_digest(root, hashes, recheck=True)
  if checked != content:
    log.warn(f'{hashes} remembered hashes that the files do not have; '
             'hashed them again')
  return checked


def _from_records(records, out_hw, mode: str) -> dict[str, np.ndarray]:
  """Prepared arrays of checked records (a folder data set), resized in
  TensorFlow exactly as the HC18 builder's scans are."""
  # pylint: disable=import-outside-toplevel
  import tensorflow as tf
  from hc_jax.data import folder
  from hc_jax.data import resize as resize_lib
  images, original_hw = [], []
  for record in records:
    pixels, _ = folder.read_image(record.image_path)
    original_hw.append(pixels.shape)
    resized = resize_lib.resize(tf.convert_to_tensor(pixels[..., None]),
                                out_hw, mode)
    images.append(resize_lib.to_uint8(resized).numpy())
  original_hw = np.asarray(original_hw, np.int32).reshape(-1, 2)
  return {
      'images': np.stack(images).astype(np.uint8),
      'filename': np.asarray([r.filename for r in records], np.str_),
      'subject_id': np.asarray([r.subject_id for r in records], np.int32),
      'pixel_size_mm': np.asarray([r.pixel_size_mm for r in records],
                                  np.float32),
      'hc_mm': np.asarray([r.hc_mm for r in records], np.float32),
      'hc_px': np.asarray([r.hc_px for r in records], np.float32),
      'ellipse': folder.ellipse_array(records),
      'original_hw': original_hw,
      'resize': resize_geometry(original_hw, out_hw, mode),
  }


def prepare_folder(directory: str, labels: str, out_hw, mode: str,
                   cache_dir: str = '',
                   cache_flag: str = '--config.data.cache_dir'
                   ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The prepared arrays of a folder of scans with a CSV of HC values
  (`hc_jax.data.folder`), from cache if made.

  The cache is keyed by a digest of the bytes of the CSV and of every image
  file under the folder (`folder.sources`), as HC18's is; before preparing,
  every row is checked (`folder.scan`: one error listing every problem).

  Returns:
    (arrays, info) as `prepare`.

  Raises:
    folder.FolderError: listing every bad row or file.
    CacheError: as `prepare`.
  """
  from hc_jax.data import folder  # pylint: disable=import-outside-toplevel
  if mode not in RESIZE_MODES:
    raise ValueError(f'unknown resize_mode {mode!r}; choose one of '
                     f'{", ".join(RESIZE_MODES)}')
  cache_dir = cache_dir or default_cache_dir()
  # The digest reads no image, so a prepared set is used without decoding it.
  content = digests.files_digest(folder.sources(directory, labels),
                                 os.path.join(cache_dir, digests.HASHES_FILE))
  cache = os.path.join(cache_dir, f'folder-{content}')

  def build():
    records, notes = folder.scan(directory, labels)
    for note in notes:
      log.status(f'note: {note}')
    _remove_leftovers(cache, os.path.join(cache, 'tfds'))
    log.status(f'preparing {len(records)} scans from {directory} at '
               f'{out_hw[0]}x{out_hw[1]} ({mode}) into {cache}, once')
    arrays = _from_records(records, out_hw, mode)
    return arrays, _info(
        arrays, out_hw, mode, source=os.path.abspath(directory),
        labels=os.path.abspath(folder.labels_path(directory, labels)),
        source_digest=content, content_digest=content)

  return _cached(cache, _prepared_path(cache, out_hw, mode), build,
                 f'cannot prepare the scans in the cache {cache_dir} '
                 f'({cache_flag})')
