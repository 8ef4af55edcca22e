"""python -m hc_jax.shipped: writes a shipped model (`hc_jax.archive`) from
finished fold runs.

  python -m hc_jax.shipped --workdir=runs/final/hcnet_mask --out=FILE.npz
  python -m hc_jax.shipped --add-digest=FILE.npz   # an older archive
  python -m hc_jax.shipped --calibrate=FILE.npz    # its quality threshold
  python -m hc_jax.shipped --record_command=FILE.npz --command='...'

The archive's provenance records the command that trained its runs:
`--command`, by default the grid command of `configs/<name>.py`;
`--record_command` replaces it in an archive exported with a wrong one.

An archive records the digest of its arrays (`archive.DIGEST_KEY`), which
loading checks. `--add-digest` gives one to an archive exported before
digests were recorded: the same arrays, written anew with the digest in
their `meta` (it refuses an archive that has one). `--calibrate` stores
the quality threshold of an archive whose runs were trained before runs
stored one (`calibrate`): chosen on each member's own validation part, as
training chooses it now.
"""

import argparse
import csv
import json
import math
import os
import sys
import tempfile

import numpy as np

from hc_jax import archive as archive_lib
from hc_jax import workdir as workdir_lib

PROVENANCE = {
    'data': 'HC18 training set (van den Heuvel et al. 2018, Zenodo record '
            '1327317, CC BY 4.0): a copy of 900 annotated images of 725 '
            'subjects',
    'evaluation': '5-fold subject-grouped cross-validation, the epoch with '
                  'the lowest validation MAE of each fold',
}


def default_command(name: str) -> str:
  """The command recorded for a model trained as the grid trains
  `configs/<name>.py` over five folds."""
  return (f'python -m hc_jax.grid --configs=configs/{name}.py '
          '--folds=0,1,2,3,4 --root=runs/final')


def pooled_cv(run_dirs: list[str]) -> dict | None:
  """Pooled test-fold figures of fold runs from their predictions_test.csv.

  Returns:
    {'num_images', 'mae_mm', 'mae_mm_sd', 'mae_px', 'pmae', 'bias_mm'} (SD
    ddof=0, as the results table), or None when a run lacks the file.
  """
  errors_mm, errors_px, pmae, signed = [], [], [], []
  for run in run_dirs:
    path = os.path.join(run, workdir_lib.PREDICTIONS_FILE)
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
           storage_dtype: str = 'float32', command: str | None = None) -> dict:
  """Writes the shipped-model archive of finished runs.

  Args:
    workdir: a run, or a directory of fold runs (as `loading.load` takes).
    out: the archive to write; it must not exist yet.
    name: the model's name (default: the archive's base name).
    storage_dtype: 'float32', or 'float16' to halve the file.
    command: the command that trained the runs, for the provenance (default:
      `default_command(name)`).

  Returns:
    The archive's `meta`.

  Raises:
    PredictError: bad runs, an existing `out`, or an unwritable one.
  """
  # pylint: disable=import-outside-toplevel
  from flax import traverse_util
  from hc_jax.evaluation import loading
  if storage_dtype not in ('float32', 'float16'):
    raise workdir_lib.PredictError(
        f'storage dtype must be float32 or float16, got '
        f'{storage_dtype!r}')
  if os.path.exists(out):
    raise workdir_lib.PredictError(f'{out} exists; not overwritten')
  run_dirs = workdir_lib.run_dirs(workdir)
  predictor = loading.load(workdir)
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
  name = name or os.path.basename(out)[:-len(archive_lib.ARCHIVE_SUFFIX)]
  meta = {
      'format': archive_lib.FORMAT,
      'name': name,
      'members': members,
      'configs': workdir_lib.read_configs(run_dirs),
      'results': [
          workdir_lib.read_json(os.path.join(run, workdir_lib.RESULTS_FILE))
          for run in run_dirs
      ],
      'storage_dtype': storage_dtype,
      'cv': pooled_cv(run_dirs),
      'provenance': {**PROVENANCE,
                     'command': command or default_command(name)},
  }
  meta[archive_lib.DIGEST_KEY] = archive_lib.arrays_digest(arrays)
  arrays['meta'] = np.array(json.dumps(meta, sort_keys=True))
  _write_archive(out, arrays)
  return meta


def calibrate(path: str, hc18_dir: str | None = None) -> float:
  """Stores the quality threshold of an archive whose members' results
  record none: each member's quality signal on its own fold's validation
  part (`cv.score(part='val')`, never a test fold) becomes its results'
  'quality' (`kinds.quality_record`), the arrays unchanged. Returns the
  ensemble's threshold (`kinds.stored_threshold`).

  Raises:
    PredictError: not a readable archive, a model with no quality signal, or
      one whose members record a threshold already.
  """
  # pylint: disable=import-outside-toplevel
  from hc_jax import models
  from hc_jax.evaluation import cv
  from hc_jax.evaluation import cv_runs
  from hc_jax.nets import kinds
  arrays, meta = _read_archive(path)
  quality = models.kind_of(meta['configs'][0]['model']).quality
  if quality is None:
    raise workdir_lib.PredictError(
        f'{path}: its model has no quality signal to calibrate')
  if all(result.get('quality') for result in meta['results']):
    raise workdir_lib.PredictError(
        f'{path} records its quality threshold already; not changed')
  try:
    scores = cv.score([path], hc18_dir=hc18_dir, part='val')
  except cv_runs.ScoreError as e:
    raise workdir_lib.PredictError(str(e)) from None
  for result in meta['results']:
    values = [row['quality'] for row in scores.rows
              if row['fold'] == result['fold']]
    if not values:
      raise workdir_lib.PredictError(
          f'{path}: no validation images of fold {result["fold"]}')
    result['quality'] = kinds.quality_record(quality, values)
  _replace_archive(path, arrays, meta)
  return kinds.stored_threshold(meta['results'], quality)


def _read_archive(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """An archive's arrays and its `meta`.

  Raises:
    PredictError: not a readable archive.
  """
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {key: archive[key] for key in archive.files}
    meta = json.loads(str(arrays['meta']))
    if not isinstance(meta, dict) or meta.get('format') != archive_lib.FORMAT:
      raise ValueError(f'format {meta.get("format")!r}, expected '
                       f'{archive_lib.FORMAT!r}')
  except Exception as e:  # pylint: disable=broad-except  # Any damage.
    raise workdir_lib.PredictError(
        f'{path}: not a readable shipped model ({e})') from None
  return arrays, meta


def _replace_archive(path: str, arrays: dict[str, np.ndarray],
                     meta: dict) -> None:
  """Writes `arrays` with `meta` over the archive at `path`, whole or not
  at all."""
  arrays['meta'] = np.array(json.dumps(meta, sort_keys=True))
  tmp = path + '.meta.tmp' + archive_lib.ARCHIVE_SUFFIX
  if os.path.lexists(tmp):
    os.unlink(tmp)  # Left by a killed call: only this module writes it.
  _write_archive(tmp, arrays)
  try:
    os.replace(tmp, path)
  except OSError as e:
    os.unlink(tmp)
    raise workdir_lib.PredictError(
        f'{path} cannot be replaced ({e.strerror or e})') from None


def record_command(path: str, command: str) -> None:
  """Replaces the training command an archive's provenance records, the
  arrays and everything else unchanged.

  Raises:
    PredictError: not a readable archive, or an empty command.
  """
  if not command.strip():
    raise workdir_lib.PredictError('--command is empty')
  arrays, meta = _read_archive(path)
  meta['provenance'] = {**meta.get('provenance', {}), 'command': command}
  _replace_archive(path, arrays, meta)


def add_digest(path: str) -> str:
  """Records the digest of an older archive's arrays in its `meta`, the
  arrays unchanged; returns the digest.

  Raises:
    PredictError: not a readable archive, or one that has a digest already.
  """
  arrays, meta = _read_archive(path)
  if archive_lib.DIGEST_KEY in meta:
    raise workdir_lib.PredictError(
        f'{path} records a digest already; not changed')
  meta[archive_lib.DIGEST_KEY] = archive_lib.arrays_digest(arrays)
  _replace_archive(path, arrays, meta)
  return meta[archive_lib.DIGEST_KEY]


def _write_archive(out: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes `arrays` as a compressed .npz at `out`, which must not exist:
  whole or not at all.

  Raises:
    PredictError: when it cannot be written (nothing is left behind).
  """
  directory = os.path.dirname(os.path.abspath(out))
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=archive_lib.ARCHIVE_SUFFIX, dir=directory)
    with os.fdopen(fd, 'wb') as f:
      np.savez_compressed(f, **arrays)
    os.chmod(tmp, 0o644)
    os.link(tmp, out)  # Fails rather than overwrite a file made meanwhile.
    os.unlink(tmp)
  except OSError as e:
    if 'tmp' in locals() and os.path.exists(tmp):
      os.unlink(tmp)
    raise workdir_lib.PredictError(
        f'{out} cannot be written ({e.strerror or e})') from None


def main(argv=None) -> int:
  """`python -m hc_jax.shipped`: exports finished runs as a shipped model."""
  parser = argparse.ArgumentParser(
      prog='python -m hc_jax.shipped',
      description='Write the shipped-model archive of finished runs.')
  parser.add_argument('--workdir',
                      help='a finished run or a directory of fold runs')
  parser.add_argument('--out', help='the .npz to write')
  parser.add_argument('--add-digest', '--add_digest', dest='add_digest',
                      metavar='FILE.npz',
                      help='record the digest of an older archive\'s arrays '
                      'in it (nothing else changes)')
  parser.add_argument('--calibrate', metavar='FILE.npz',
                      help='store the quality threshold of an archive whose '
                      'runs record none, chosen on each member\'s validation '
                      'part (nothing else changes)')
  parser.add_argument('--hc18_dir', '--hc18-dir', dest='hc18_dir',
                      help='--calibrate: the HC18 copy the members trained on '
                      '(default: theirs)')
  parser.add_argument('--name', help='the model name (default: from --out)')
  parser.add_argument('--float16', action='store_true',
                      help='store the floats as float16')
  parser.add_argument('--command',
                      help='the command that trained the runs, recorded in '
                      'the archive (default: the grid command of '
                      'configs/<name>.py)')
  parser.add_argument('--record-command', '--record_command',
                      dest='record_command', metavar='FILE.npz',
                      help='replace the training command recorded in an '
                      'archive with --command (nothing else changes)')
  args = parser.parse_args(argv)
  from hc_jax import cli  # pylint: disable=import-outside-toplevel
  if args.calibrate:
    if args.workdir or args.out or args.add_digest:
      parser.error('--calibrate takes no --workdir, --out or --add-digest')
    cli.quiet_logs()
    return cli.run_main(lambda: print(
        f'{args.calibrate}: quality threshold '
        f'{calibrate(args.calibrate, args.hc18_dir):.4f} stored (chosen on '
        'the members\' validation parts)'))
  if args.record_command:
    if args.workdir or args.out or args.add_digest or not args.command:
      parser.error('--record-command takes --command, and no --workdir, '
                   '--out or --add-digest')
    return cli.run_main(lambda: _record_command(args))
  if args.add_digest:
    if args.workdir or args.out:
      parser.error('--add-digest takes no --workdir or --out')
    return cli.run_main(lambda: print(
        f'{args.add_digest}: digest {add_digest(args.add_digest)} recorded'))
  if not args.workdir or not args.out:
    parser.error('--workdir and --out are required')
  cli.quiet_logs()  # Before TensorFlow is imported.
  if not args.out.endswith(archive_lib.ARCHIVE_SUFFIX):
    parser.error(f'--out must end in {archive_lib.ARCHIVE_SUFFIX}')
  return cli.run_main(lambda: _export(args))


def _record_command(args: argparse.Namespace) -> None:
  record_command(args.record_command, args.command)
  print(f'{args.record_command}: training command recorded')


def _export(args: argparse.Namespace) -> None:
  """Exports as `args` ask and prints what was written."""
  meta = export(args.workdir, args.out, args.name,
                'float16' if args.float16 else 'float32', args.command)
  cv = meta['cv']
  print(f'wrote {args.out}: {len(meta["members"])} members, '
        f'{os.path.getsize(args.out) / 1e6:.2f} MB ({meta["storage_dtype"]})'
        + (f'; CV {cv["mae_mm"]:.2f} ± {cv["mae_mm_sd"]:.2f} mm over '
           f'{cv["num_images"]} images' if cv and math.isfinite(
               cv['mae_mm']) else ''))


if __name__ == '__main__':
  sys.exit(main())
