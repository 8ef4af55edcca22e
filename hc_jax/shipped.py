"""Trained models shipped with the package: predict without HC18 or training.

  python -m hc_jax.predict --samples --out=hc.csv    # the default model
  predictor = inference.load()                       # the same, as a library
  predictor = inference.load(model='hcnet_mask')

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
training HC range, the HC18 `source_digest`, its test fold's MAE),
`storage_dtype` (the dtype of the stored floats; they are cast back to the
model's own dtype on loading), `cv` (the pooled cross-validation figures of
the members' test folds, where their predictions_test.csv was there to pool)
and `provenance` (the data set, its licence and the command that trained the
runs).

`python -m hc_jax.shipped --workdir=runs/final/hcnet_mask
--out=hc_jax/shipped/hcnet_mask.npz` writes one from finished runs (it never
overwrites a file); `inference.load` reads it, as it reads a run.
"""

import argparse
import csv
import json
import math
import os
import sys
import tempfile

import numpy as np

from hc_jax import runs as runs_lib

FORMAT = 'hc_jax.shipped/1'
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           'shipped')
DEFAULT_MODEL = 'hcnet_mask'
SAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           'samples')
# The shipped sample scans (HC18 test-set images, CC BY 4.0; see
# samples/ATTRIBUTION.md) and the predictions each shipped model gave them
# when it was exported from its runs.
SAMPLE_IMAGES_DIR = os.path.join(SAMPLES_DIR, 'test_set')
EXPECTED_CSV = os.path.join(SAMPLES_DIR, 'expected_{name}.csv')
ARCHIVE_SUFFIX = '.npz'
PROVENANCE = {
    'data': 'HC18 training set (van den Heuvel et al. 2018, Zenodo record '
            '1327317, CC BY 4.0): a copy of 900 annotated images of 725 '
            'subjects',
    'evaluation': '5-fold subject-grouped cross-validation, the epoch with '
                  'the lowest validation MAE of each fold',
    'command': 'python -m hc_jax.grid --configs=configs/hcnet_mask.py '
               '--folds=0,1,2,3,4 --root=runs/final',
}

PredictError = runs_lib.PredictError


def names() -> list[str]:
  """The names of the shipped models, sorted."""
  try:
    return sorted(name[:-len(ARCHIVE_SUFFIX)] for name in
                  os.listdir(SHIPPED_DIR) if name.endswith(ARCHIVE_SUFFIX))
  except OSError:
    return []


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
    raise PredictError(f'no shipped model {name!r} (shipped: {shipped})')
  return path


class Archive:
  """A shipped model read back: what `inference.load` needs of its runs.

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
      raise PredictError(f'{path}: not a shipped model '
                         f'({runs_lib.error_line(e)})') from None
    self.members = members
    self.runs = [f'{path}:{member}' for member in members]
    for config in self.configs:
      for key, value in runs_lib.CONFIG_DEFAULTS.items():
        config.setdefault(key, value)

  def only(self, member: str) -> 'Archive':
    """This archive restricted to one member (e.g. to score a fold model on
    its own test fold).

    Raises:
      PredictError: the archive has no such member.
    """
    if member not in self.members:
      raise PredictError(f'{self.path} has no member {member!r} (members: '
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
        raise PredictError(
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
    raise PredictError(f'shipped model {path} does not exist')
  archive = Archive(path)
  return archive.only(member) if member else archive


def pooled_cv(run_dirs: list[str]) -> dict | None:
  """Pooled test-fold figures of fold runs from their predictions_test.csv.

  Returns:
    {'num_images', 'mae_mm', 'mae_mm_sd', 'mae_px', 'pmae', 'bias_mm'} (SD
    ddof=0, as the results table), or None when a run lacks the file.
  """
  errors_mm, errors_px, pmae, signed = [], [], [], []
  for run in run_dirs:
    path = os.path.join(run, 'predictions_test.csv')
    if not os.path.isfile(path):
      return None
    with open(path, newline='', encoding='utf-8') as f:
      for row in csv.DictReader(f):
        true_mm, pred_mm = float(row['hc_mm_true']), float(row['hc_mm_pred'])
        signed.append(pred_mm - true_mm)
        errors_mm.append(abs(pred_mm - true_mm))
        errors_px.append(abs(float(row['hc_px_pred']) -
                             float(row['hc_px_true'])))
        pmae.append(100 * abs(pred_mm - true_mm) / true_mm)
  if not errors_mm:
    return None
  return {'num_images': len(errors_mm),
          'mae_mm': float(np.mean(errors_mm)),
          'mae_mm_sd': float(np.std(errors_mm)),
          'mae_px': float(np.mean(errors_px)),
          'pmae': float(np.mean(pmae)),
          'bias_mm': float(np.mean(signed))}


def export(workdir: str, out: str, name: str | None = None,
           storage_dtype: str = 'float32') -> dict:
  """Writes the shipped-model archive of finished runs.

  Args:
    workdir: a run, or a directory of fold runs (as `inference.load` takes).
    out: the archive to write; it must not exist yet.
    name: the model's name (default: the archive's base name).
    storage_dtype: 'float32', or 'float16' to halve the file.

  Returns:
    The archive's `meta`.

  Raises:
    PredictError: bad runs, an existing `out`, or an unwritable one.
  """
  # pylint: disable=import-outside-toplevel
  from flax import traverse_util
  from hc_jax import inference
  if storage_dtype not in ('float32', 'float16'):
    raise PredictError(f'storage dtype must be float32 or float16, got '
                       f'{storage_dtype!r}')
  if os.path.exists(out):
    raise PredictError(f'{out} exists; not overwritten')
  run_dirs = runs_lib.run_dirs(workdir)
  predictor = inference.load(workdir)
  members = [os.path.basename(os.path.normpath(run)) for run in run_dirs]
  if len(set(members)) != len(members):
    members = [f'm{i}' for i in range(len(members))]
  arrays = {}
  for member, variables in zip(members, predictor._variables):  # pylint: disable=protected-access
    for path, value in traverse_util.flatten_dict(variables, sep='/').items():
      value = np.asarray(value)
      if np.issubdtype(value.dtype, np.floating):
        value = value.astype(storage_dtype)
      arrays[f'{member}/{path}'] = value
  meta = {
      'format': FORMAT,
      'name': name or os.path.basename(out)[:-len(ARCHIVE_SUFFIX)],
      'members': members,
      'configs': runs_lib.read_configs(run_dirs),
      'results': [runs_lib.read_json(os.path.join(run, 'results.json'))
                  for run in run_dirs],
      'storage_dtype': storage_dtype,
      'cv': pooled_cv(run_dirs),
      'provenance': PROVENANCE,
  }
  arrays['meta'] = np.array(json.dumps(meta, sort_keys=True))
  directory = os.path.dirname(os.path.abspath(out))
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=ARCHIVE_SUFFIX, dir=directory)
    with os.fdopen(fd, 'wb') as f:
      np.savez_compressed(f, **arrays)
    os.chmod(tmp, 0o644)
    os.link(tmp, out)  # Fails rather than overwrite a file made meanwhile.
    os.unlink(tmp)
  except OSError as e:
    if 'tmp' in locals() and os.path.exists(tmp):
      os.unlink(tmp)
    raise PredictError(f'{out} cannot be written ({e.strerror or e})'
                       ) from None
  return meta


def main(argv=None) -> int:
  """`python -m hc_jax.shipped`: exports finished runs as a shipped model."""
  parser = argparse.ArgumentParser(
      prog='python -m hc_jax.shipped',
      description='Write the shipped-model archive of finished runs.')
  parser.add_argument('--workdir', required=True,
                      help='a finished run or a directory of fold runs')
  parser.add_argument('--out', required=True, help='the .npz to write')
  parser.add_argument('--name', help='the model name (default: from --out)')
  parser.add_argument('--float16', action='store_true',
                      help='store the floats as float16')
  args = parser.parse_args(argv)
  from hc_jax import cli  # pylint: disable=import-outside-toplevel
  cli.quiet_logs()  # Before TensorFlow is imported.
  if not args.out.endswith(ARCHIVE_SUFFIX):
    parser.error(f'--out must end in {ARCHIVE_SUFFIX}')
  try:
    meta = export(args.workdir, args.out, args.name,
                  'float16' if args.float16 else 'float32')
  except PredictError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  cv = meta['cv']
  print(f'wrote {args.out}: {len(meta["members"])} members, '
        f'{os.path.getsize(args.out) / 1e6:.2f} MB ({meta["storage_dtype"]})'
        + (f'; CV {cv["mae_mm"]:.2f} ± {cv["mae_mm_sd"]:.2f} mm over '
           f'{cv["num_images"]} images' if cv and math.isfinite(
               cv['mae_mm']) else ''))
  return 0


if __name__ == '__main__':
  sys.exit(main())
