"""Trained models shipped with the package: predict without HC18 or training.

  python -m hc_jax.predict --samples --out=hc.csv    # the default model
  predictor = loading.load()                         # the same, as a library
  predictor = loading.load(model='hcnet_mask')     # another shipped model

A shipped model is one NumPy archive, `hc_jax/shipped/<name>.npz`, holding
every member of a fold ensemble. It is read with
`numpy.load(allow_pickle=False)`: plain arrays and one JSON string, nothing
that runs code when it is opened. Its entries:

  meta                         0-d unicode array: a JSON object (below)
  <member>/params/<path>       a member's parameters, `path` the '/'-joined
                               Flax module path (e.g. fold0/params/Conv_0/kernel)
  <member>/batch_stats/<path>  its BatchNorm statistics, where the model has any

`meta` holds: `format` (`FORMAT`), `name`, `members` (e.g. fold0..fold4, in
order), `configs` and `results` (each member's config.json and results.json
as trained: the model, its input size and resize mode, `normaliser_px`, the
training HC range, the HC18 `source_digest`, its test fold's MAE, and
`quality`: its quality signal on its validation part and the threshold
chosen there, which loading pools into the model's `uncertain` threshold,
`hc_jax.nets.kinds.stored_threshold`),
`storage_dtype` (the dtype of the stored floats; they are cast back to the
model's own dtype on loading), `arrays_sha256` (`arrays_digest` of every
other entry: checked on loading, so a damaged or changed archive is refused
in one line; an archive exported before it existed loads with a warning), `cv` (the pooled cross-validation figures of
the members' test folds, where their predictions_test.csv was there to pool)
and `provenance` (the data set, its licence and the command that trained the
runs).

`python -m hc_jax.shipped --workdir=runs/final/hcnet_mask
--out=hc_jax/shipped/hcnet_mask.npz` writes one from finished runs (it never
overwrites a file); `loading.load` reads it, as it reads a run.
"""

import hashlib
import json
import os

import numpy as np

from hc_jax import log
from hc_jax import workdir as workdir_lib


# hc_jax's own directory, where shipped/ and samples/ are.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
FORMAT = 'hc_jax.shipped/1'
SHIPPED_DIR = os.path.join(_PACKAGE_DIR, 'shipped')
DEFAULT_MODEL = 'hcnet_mask_refine'
SAMPLES_DIR = os.path.join(_PACKAGE_DIR, 'samples')
# The shipped sample scans (HC18 test-set images, CC BY 4.0; see
# samples/ATTRIBUTION.md) and the predictions each shipped model gave them
# when it was exported from its runs.
SAMPLE_IMAGES_DIR = os.path.join(SAMPLES_DIR, 'test_set')
EXPECTED_CSV = os.path.join(SAMPLES_DIR, 'expected_{name}.csv')
ARCHIVE_SUFFIX = '.npz'
# The `meta` entry holding the digest of the others.
DIGEST_KEY = 'arrays_sha256'


def names() -> list[str]:
  """The names of the shipped models, sorted."""
  try:
    return sorted(name[:-len(ARCHIVE_SUFFIX)] for name in
                  os.listdir(SHIPPED_DIR) if name.endswith(ARCHIVE_SUFFIX))
  except OSError:
    return []


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
  """SHA-256 of an archive's arrays (all entries but `meta`): every name,
  dtype, shape and the bytes, in name order."""
  digest = hashlib.sha256()
  for name in sorted(arrays):
    if name == 'meta':
      continue
    array = np.ascontiguousarray(arrays[name])
    digest.update(f'{name}:{array.dtype.str}:{array.shape}\n'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def how_to_restore(path: str) -> str:
  """What to do about a damaged or changed archive at `path`."""
  if os.path.dirname(os.path.abspath(path)) == SHIPPED_DIR:
    return ('reinstall hc_jax (in a checkout: git checkout -- '
            f'hc_jax/shipped/{os.path.basename(path)}; otherwise pip install '
            '--force-reinstall from where it came)')
  return 'export it again (python -m hc_jax.shipped) or restore it from a copy'


def split_member(path: str) -> tuple[str, str | None]:
  """('<archive>', '<member>') of a member's label '<archive>:<member>'
  (`Archive.runs`), or (path, None)."""
  head, sep, member = path.rpartition(':')
  if sep and head.endswith(ARCHIVE_SUFFIX) and member and os.sep not in member:
    return head, member
  return path, None


def is_archive(path: str | None) -> bool:
  """Whether `path` names a shipped-model archive file (rather than a run),
  or one member of one ('<archive>:<member>')."""
  if path:
    path = split_member(path)[0]
  return bool(path) and path.endswith(ARCHIVE_SUFFIX) and not os.path.isdir(
      path)


def path_of(name: str) -> str:
  """The archive of a shipped model.

  Raises:
    PredictError: no model of that name is shipped.
  """
  path = os.path.join(SHIPPED_DIR, name + ARCHIVE_SUFFIX)
  if os.sep in name or '/' in name or not os.path.isfile(path):
    shipped = ', '.join(names()) or 'none'
    raise workdir_lib.PredictError(
        f'no shipped model {name!r} (shipped: {shipped})')
  return path


class Archive:
  """A shipped model read back: what `loading.load` needs of its runs.

  Attributes:
    path: the archive file.
    meta: its `meta` object.
    runs: a label per member, '<archive>:<member>'.
    configs: each member's config (as its config.json).
    results: each member's results (as its results.json).
  """

  def __init__(self, path: str):
    self.path = path
    try:
      with np.load(path, allow_pickle=False) as archive:
        self._arrays = {key: archive[key] for key in archive.files}
    except Exception as e:  # pylint: disable=broad-except  # Any damage:
      # zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError...
      raise workdir_lib.PredictError(
          f'{path}: the shipped model is damaged and cannot be read '
          f'({log.error_line(e, 120)}); {how_to_restore(path)}') from None
    try:
      self.meta = json.loads(str(self._arrays.pop('meta')))
      if self.meta.get('format') != FORMAT:
        raise ValueError(f'format {self.meta.get("format")!r}, expected '
                         f'{FORMAT!r}')
      members = list(self.meta['members'])
      self.configs = [dict(c) for c in self.meta['configs']]
      self.results = [dict(r) for r in self.meta['results']]
      if not members or not len(members) == len(self.configs) == len(
          self.results):
        raise ValueError('members, configs and results do not match')
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise workdir_lib.PredictError(f'{path}: not a shipped model '
                         f'({log.error_line(e)})') from None
    self._check_digest()
    self.members = members
    self.runs = [f'{path}:{member}' for member in members]
    for config in self.configs:
      for key, value in workdir_lib.CONFIG_DEFAULTS.items():
        config.setdefault(key, value)

  def _check_digest(self) -> None:
    """Raises PredictError when the arrays differ from what was exported;
    warns when the archive records no digest (exported by an older hc_jax).
    """
    recorded = self.meta.get(DIGEST_KEY)
    if recorded is None:
      log.warn(f'{self.path} records no digest of its weights (exported by '
               'an older hc_jax), so they cannot be checked; '
               f'`python -m hc_jax.shipped --add-digest={self.path}` adds one')
      return
    if recorded != arrays_digest(self._arrays):
      raise workdir_lib.PredictError(
          f'{self.path}: the shipped model\'s weights differ from what was '
          f'exported (digest mismatch: damaged or changed); '
          f'{how_to_restore(self.path)}')

  def only(self, member: str) -> 'Archive':
    """This archive restricted to one member (e.g. to score a fold model on
    its own test fold).

    Raises:
      PredictError: the archive has no such member.
    """
    if member not in self.members:
      raise workdir_lib.PredictError(
          f'{self.path} has no member {member!r} (members: '
          f'{", ".join(self.members)})')
    i = self.members.index(member)
    self.members, self.runs = [member], [self.runs[i]]
    self.configs, self.results = [self.configs[i]], [self.results[i]]
    return self

  def variables(self, index: int, abstract_variables: dict) -> dict:
    """Member `index`'s {'params', 'batch_stats'}, in the model's dtypes.

    Args:
      index: the member's position in `members`.
      abstract_variables: the model's variables as `jax.ShapeDtypeStruct`s.

    Raises:
      PredictError: when the archive does not hold this model's variables.
    """
    # pylint: disable=import-outside-toplevel
    from flax import traverse_util
    target = {name: abstract_variables[name] for name in ('params',
                                                          'batch_stats')
              if abstract_variables.get(name)}
    prefix = self.members[index] + '/'
    flat = {}
    for path, leaf in traverse_util.flatten_dict(target, sep='/').items():
      value = self._arrays.get(prefix + path)
      if value is None or value.shape != tuple(leaf.shape):
        raise workdir_lib.PredictError(
            f'{self.path} does not hold this model: {prefix + path} is '
            f'{"missing" if value is None else value.shape}, the model needs '
            f'{tuple(leaf.shape)}')
      flat[path] = np.asarray(value, leaf.dtype)
    return traverse_util.unflatten_dict(flat, sep='/')


def read(name_or_path: str | None = None) -> Archive:
  """A shipped model by name (None: `DEFAULT_MODEL`) or archive path, or one
  member of it ('<archive>:<member>', as `Archive.runs` names them).

  Raises:
    PredictError: an unknown name or member, or a file that is not a
      shipped model.
  """
  if name_or_path is None:
    name_or_path = DEFAULT_MODEL
  path, member = split_member(name_or_path)
  if not is_archive(path):
    path = path_of(path)
  if not os.path.isfile(path):
    raise workdir_lib.PredictError(f'shipped model {path} does not exist')
  archive = Archive(path)
  return archive.only(member) if member else archive
