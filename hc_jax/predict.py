"""Applies a trained run, or a grid of fold runs, to new scans.

  python -m hc_jax.predict --workdir=runs/cnn263k_mse_fold0 \
      --images=path/to/hc18/test_set --out=predictions.csv \
      [--pixel-sizes=CSV] [--overlays=DIR] [--tta-flip] [--max-sd-mm=10] \
      [--submission=FILE] [--frame=N]
  python -m hc_jax.predict --samples --out=hc.csv --overlays=overlays/

Without `--workdir`, the model shipped with the package predicts
(`hc_jax.shipped`: `--model=NAME`, default the five-fold `hcnet_mask`
ensemble), so no training and no HC18 copy are needed; `--samples` adds the
five HC18 test-set scans shipped with it (and their pixel sizes) to
`--images`.

For each image: HC in pixels of the original image, in mm where its pixel size
is known, and the gestational age by Hadlock (1984), flagged outside the 14-42
weeks the formula was fitted on. `--images` takes directories (every PNG,
JPEG, TIFF and BMP below them, in subdirectories too, but `*_Annotation.png`
and `*_prediction.png`), files and glob patterns: several after the flag (so
an unquoted shell glob works), comma-separated or with the flag repeated.
JPEG, TIFF (its first page) and BMP scans are read as PNGs are, colour to
8-bit grey. The summary names each file of a directory that was skipped,
and why. A row's `filename` is
the image's path relative to the deepest directory holding everything
`--images` names, so same-named files in different folders stay apart.
Pixel sizes come from `--pixel-sizes` (CSV `filename,pixel size(mm)[,...]`, as
in HC18; a row matches by that relative path, else by the base name), or else
from the HC18 CSV beside an images directory (`test_set/` ->
`test_set_pixel_size.csv`, matched by base name). The CSV's header, if it
has one, must start `filename,pixel size(mm)`. A scan without a row in the
CSV keeps its HC in px, and its `message` says the mm is missing.

DICOM files (`hc_jax.evaluation.dicom`) mix with the PNGs: `--images` also takes
`.dcm` files, and directories give them too (and extensionless files with
the DICOM 'DICM' marker). Each is read as an 8-bit grayscale scan
(MONOCHROME1 inverted; RGB and YBR to grey with PIL's ITU-R 601 luma
weights; more than 8 bits rescaled to 0-255 by the stored range). Every
frame of a multi-frame file is a row `file.dcm#k` (k from 0), or only frame
N with `--frame=N`; a single-frame file is one row `file.dcm`. A DICOM's
pixel size is its `--pixel-sizes` row where it has one (matched by the
file's name; the HC18 CSV beside a directory applies to PNGs only), else the
file's own: the ultrasound region holding the image centre, in cm, else
`PixelSpacing`. Without one, or with non-square pixels (x and y more than 1%
apart), the row has HC in px only and its `message` says why, whatever its
status. The CSV then gains `DICOM_COLUMNS`: `pixel_size_source` is
`ultrasound_region`, `PixelSpacing`, `csv`, or empty where the pixel size is
unknown. A file that cannot be decoded here (a compressed transfer syntax
without its decoder installed, truncated, not DICOM) is one `error` row.

Every row has a `status` and, unless ok, a `message` saying why:

  ok           predicted, and inside the plausible range.
  uncertain    a fold ensemble whose runs disagree: `hc_mm_sd` above
               `--max-sd-mm` (only checked where the pixel size is known).
  implausible  the prediction is outside the plausible range (below); HC is
               written, the gestational age is not.
  refused      not a scan: a (nearly) constant image, one smaller than the
               model input, or one that does not look like an ultrasound
               scan (`hc_jax.evaluation.scan_likeness`: too few grey levels, neighbouring
               pixels uncorrelated as in noise, or neither a dark background
               in two corners nor speckle in its fine texture); nothing is
               predicted. `--no-scan-check` measures what only that last
               check would refuse.
  error        the file cannot be used: missing, unreadable, a symbolic link
               loop, corrupt, not an 8-bit PNG, JPEG, TIFF or BMP, or a
               DICOM that cannot be decoded here.

The plausible range is where HC can be trusted: in mm, HC18's span (44-346
mm) and the model's training range (from results.json, where recorded), each
widened by `RANGE_MARGIN` (10%) at both ends; in px, the training range so
widened, and always between a tenth of the image's short side and the
perimeter of an ellipse twice the image's size (pi * (H + W)), so that a head
must be visible and fit in the scan.

A workdir whose subdirectories are finished runs (`fold0/` ... `fold4/`) is a
fold ensemble: HC is the mean over the runs and `hc_mm_sd` their standard
deviation (ddof=1).

A model that gives the head's ellipse (the shipped `hcnet_mask`, whose
ellipse is that of its mask's moments, and `hcnet_ellipse`; not the HC
regressors) also predicts it, in pixels of the original image: the CSV
gains `ELLIPSE_COLUMNS` (centre x = column, y = row; semi-axes a >= b;
`angle_rad` the angle of a from +x towards +y, i.e. clockwise on the
screen, in [0, pi); in mm where the pixel size is known), and overlays draw
it. An ensemble's (or
`--tta-flip`'s) ellipse is the mean of the runs' ellipses, scaled so that
its perimeter is the reported HC (`inference.combine_ellipses`).
`--submission=FILE` writes the HC18 challenge CSV (`write_submission`).
`--dicom-sr=DIR` writes a DICOM Structured Report for each DICOM scan
(`hc_jax.evaluation.dicom_sr`).

This module is the command line: flags, the scans and their pixel sizes
(`hc_jax.evaluation.scan_files`), the CSV and overlays (each row's cells and
overlay: `hc_jax.evaluation.prediction_rows`), exit codes. The predictor
itself is `hc_jax.evaluation.inference`, loaded by `hc_jax.evaluation.loading`
(`predict.load` is `loading.load`):

  predictor = predict.load('runs/cv_grid')
  out = predictor([image_uint8_2d, ...], pixel_sizes_mm=[0.1, ...])
  out['hc_mm'], out['hc_mm_sd'], out['hc_px'], out['status'], out['message']
  out['ellipse_px'], out['ellipse_mm']  # An ellipse model's.

It preprocesses scans with the training code's own ops, so a run's test-fold
images get the very predictions in its `predictions_test.csv`.
"""

import argparse
import functools
import itertools
import math
import os
import sys
import time
from typing import Sequence
import warnings

from hc_jax import log
from hc_jax import workdir as workdir_lib
from hc_jax.evaluation import archive as archive_lib
from hc_jax.evaluation import dicom
from hc_jax.evaluation import dicom_sr
from hc_jax.evaluation import inference
from hc_jax.evaluation import loading
from hc_jax.evaluation import prediction_rows
from hc_jax.evaluation import scan_files
from hc_jax.nets import kinds

# The library entry point the README names: `predict.load(workdir)`.
load = loading.load

PROGRESS_EVERY = 64  # Images per chunk, and per progress line.
# Pixel sizes (mm) taken as a scan's: HC18's are 0.05-0.39 mm; an ultrasound
# image at 0.001 or 10 mm per pixel is a unit or typing mistake, an error row.
PIXEL_SIZE_RANGE_MM = (0.001, 10.0)
# Every row's message when the model trained on phantoms (the demos).
PHANTOM_NOTE = 'model trained on phantom scans'
COLUMNS = ('filename', 'pixel_size_mm', 'hc_px', 'hc_mm', 'hc_mm_sd',
           'ga_weeks', 'ga_flag', 'status', 'message')
# Added after COLUMNS: the columns of the model's kind
# (`hc_jax.nets.kinds`: an ellipse model's ellipse, a quality signal).
# Added last when DICOM files are among the scans: where the pixel size came
# from ('ultrasound_region', 'PixelSpacing', 'csv', or '' when unknown).
DICOM_COLUMNS = ('pixel_size_source',)
STATUSES = ('ok', 'uncertain', 'implausible', 'refused', 'error')
# Exit codes of the command line.
EXIT_OK, EXIT_FLAGGED, EXIT_USAGE = 0, 1, 2


def write_rows(path: str, rows: Sequence[dict],
               columns: Sequence[str] = COLUMNS, unchanged_since=False) -> None:
  """Writes the prediction CSV atomically: `COLUMNS`, and for an ellipse
  model `COLUMNS + ELLIPSE_COLUMNS`.

  Args:
    unchanged_since: see `scan_files.write_csv` (False: not checked).

  Raises:
    PredictError: when it cannot be written, or another process wrote it
      since `unchanged_since`; nothing is left behind.
  """
  scan_files.write_csv(path, columns, rows, '--out', unchanged_since)


_DESCRIPTION = 'Predict HC (and gestational age) for new scans.'
_EPILOG = f"""\
status of each row (the CSV's `status`; `message` says why unless ok):
  ok           predicted and plausible
  uncertain    fold ensemble SD above --max-sd-mm (pixel size known), or a
               mask model's quality below --min-quality
  implausible  HC outside HC18's {inference.HC18_HC_MM[0]:g}-{inference.HC18_HC_MM[1]:g} mm, the model's training
               range, or what fits in the image (each widened by
               {inference.RANGE_MARGIN:.0%}); HC is written, no gestational age
  refused      not a scan: (nearly) constant, smaller than the model input,
               or not like an ultrasound scan (few grey levels, noise,
               neither dark corners nor speckle; --no-scan-check: measured)
  error        missing, unreadable, corrupt or not an 8-bit PNG, JPEG,
               TIFF or BMP file, or a DICOM that cannot be decoded here
               (a scan without a row in the pixel-size CSV keeps its HC in
               px; its message says the mm is missing)

CSV columns: {", ".join(COLUMNS)}

DICOM (.dcm) files and folders of them mix with PNGs in --images. Grey,
RGB and YBR files, 8 bits or more (rescaled to 0-255 by the stored range);
each frame of a multi-frame file is a row file.dcm#k (--frame=N: frame N
only). Pixel size: the file's --pixel-sizes row, else its ultrasound region
(cm) at the image centre, else PixelSpacing; none, or non-square pixels:
HC in px only, and the message says why. The CSV then ends with
{", ".join(DICOM_COLUMNS)} (ultrasound_region, PixelSpacing, csv, or empty).

models that give the head's ellipse (hcnet_mask, the shipped default, and
hcnet_ellipse; not the HC regressors) add it, in pixels of the original
image and in mm where the pixel size is known (x the column, y the row,
semi-axes a >= b, angle_rad the angle of a from +x towards +y, i.e.
clockwise on the screen, in [0, pi)); overlays draw it:
  {", ".join(prediction_rows.ELLIPSE_COLUMNS[:5])},
  {", ".join(prediction_rows.ELLIPSE_COLUMNS[5:])}
mask models (hcnet_mask) add {kinds.QUALITY_COLUMN}, the soft IoU of the
head mask and the ellipse of its moments (1: the mask is an ellipse); overlays
also draw the mask's outline (red dots)

--dicom-sr DIR: for each DICOM scan (each frame) predicted, a DICOM
  Structured Report DIR/<name>[_framek]_sr.dcm (Comprehensive SR, TID 1500
  Measurement Report, written with highdicom): Head Circumference in mm,
  the ellipse as an SCOORD ELLIPSE on the source image, the gestational
  age with its method (HC, Hadlock 1984) and formula, the status, and a
  reference to the source instance. For research, not clinical use.
  Refused and error rows get none; an existing file there that hc_jax did
  not write is not replaced (exit 2).

--submission FILE: the HC18 challenge CSV, one row per image (its base name):
  {",".join(scan_files.SUBMISSION_COLUMNS)}
  It needs a model that gives the ellipse (the shipped one does) and the
  pixel size of every image (else exit 2), and is written only when every
  image was predicted. Our ellipse maps onto
  it unchanged: center_x_mm = column, center_y_mm = row, semi_axes_a_mm = a,
  semi_axes_b_mm = b (each x pixel size), angle_rad = angle_rad. Checked on
  HC18's 900 training annotations: the public entries' conversion of
  OpenCV's fitEllipse on (row, column) points (x/y swapped,
  angle_rad = (-angle_deg * pi / 180) mod pi) gives exactly our fit of each
  annotation (centre, a >= b, angle); the other angle sense does not.

exit codes:
  0  every image predicted, with status ok
  1  some images failed or were flagged (any status but ok)
  2  usage, configuration or model error (bad flags, missing or unfinished
     run, unreadable checkpoint or config, bad pixel-size CSV, unwritable
     --out, --overlays or --submission, --submission with a model that
     gives no ellipse or without every pixel size); a one-line
     'error: ...' on stderr, no CSV written
"""


def _parse_args(argv):
  from hc_jax import cli  # pylint: disable=import-outside-toplevel
  parser = cli.ArgumentParser(  # Its errors are one line, exit status 2.
      prog='python -m hc_jax.predict', description=_DESCRIPTION,
      epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir',
                      help='a finished run, or a directory of runs (ensemble); '
                      'default: the shipped model (--model)')
  parser.add_argument('--model',
                      help='a model shipped with hc_jax (default '
                      f'{archive_lib.DEFAULT_MODEL}; shipped: '
                      f'{", ".join(archive_lib.names()) or "none"})')
  parser.add_argument('--images', action='append', nargs='+',
                      metavar='PATH',
                      help='directories (searched recursively), PNG, JPEG, '
                      'TIFF, BMP or DICOM files, or glob patterns: several '
                      'after the flag (an unquoted shell glob), '
                      'comma-separated, or the flag repeated')
  parser.add_argument('--frame', type=int, metavar='N',
                      help='only frame N (0-based) of each multi-frame DICOM '
                      '(default: every frame, one row each)')
  parser.add_argument('--samples', action='store_true',
                      help='also predict the sample scans shipped with hc_jax '
                      '(five HC18 test-set images, CC BY 4.0)')
  parser.add_argument('--pixel-sizes', '--pixel_sizes', dest='pixel_sizes',
                      help='CSV filename,pixel size(mm); default: the HC18 '
                      'CSV beside each images directory')
  parser.add_argument('--out', required=True, help='output CSV')
  parser.add_argument('--overlays', help='directory for annotated PNGs')
  parser.add_argument('--tta-flip', '--tta_flip', dest='tta_flip',
                      action='store_true', help='average with the mirror image')
  parser.add_argument('--max-sd-mm', '--max_sd_mm', dest='max_sd_mm',
                      type=float, default=inference.DEFAULT_MAX_SD_MM,
                      help='ensemble SD (mm) above which a prediction is '
                      f'uncertain (default {inference.DEFAULT_MAX_SD_MM:g})')
  parser.add_argument('--min-quality', '--min_quality', dest='min_quality',
                      type=float, default=None,
                      help='a mask model\'s quality below which a prediction '
                      'is uncertain (default: the model\'s own, '
                      f'{kinds.MASK.quality.min_value:g} for hcnet_mask)')
  parser.add_argument('--dicom-sr', '--dicom_sr', dest='dicom_sr',
                      metavar='DIR',
                      help='also write a DICOM Structured Report (TID 1500, '
                      'for research) for each DICOM scan into DIR, see below')
  parser.add_argument('--submission',
                      help='also write the HC18 challenge CSV (ellipse '
                      'models; every pixel size needed), see below')
  parser.add_argument('--no-scan-check', '--no_scan_check',
                      dest='scan_check', action='store_false',
                      help='measure images that do not look like an '
                      'ultrasound scan instead of refusing them (for scans '
                      'you know to be ones; constant images and ones '
                      'smaller than the model input are still refused)')
  return parser.parse_args(argv)


def _check_not_theirs(path: str, flag: str, header: str, args) -> None:
  """Refuses to replace a file predict did not write: `path` may be new, or
  an earlier output of the same kind (its first line starts with `header`),
  never a run's file or anything else."""
  if not os.path.lexists(path):
    return
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      first = f.readline()
  except OSError as e:
    raise workdir_lib.PredictError(
        f'{flag} {path} cannot be read ({e.strerror or e}); '
        'not overwritten') from None
  if first.startswith(header):
    return
  if args.workdir and os.path.realpath(path).startswith(
      os.path.realpath(args.workdir) + os.sep):
    raise workdir_lib.PredictError(
        f'{flag} {path} is a file of the run directory '
        f'{args.workdir}; not overwritten (give a new name)')
  raise workdir_lib.PredictError(
      f'{flag} {path} exists and is not a file hc_jax.predict '
      'wrote; not overwritten (give a new name)')


def _print_warning(message, category, filename, lineno, file=None, line=None):
  del category, filename, lineno, file, line
  print(f'warning: {message}', file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit code (0 ok, 1 some images
  failed or were flagged, 2 usage, configuration or model error)."""
  args = _parse_args(argv)
  from hc_jax import cli  # pylint: disable=import-outside-toplevel
  cli.quiet_logs()  # Before TensorFlow is imported.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO.
  with warnings.catch_warnings():
    warnings.showwarning = _print_warning
    warnings.simplefilter('always', UserWarning)
    # Bad input: one line, exit EXIT_USAGE.
    return cli.run_main(lambda: _predict(args))


def _predict(args: argparse.Namespace) -> int:
  """Predicts, writes and reports what `args` ask for; returns the exit
  code."""
  _check_flags(args)
  args.skipped = []  # (path, why) of the directories' other files.
  files = dicom.image_paths(
      [path for paths in args.images or [] for path in paths] +
      ([archive_lib.SAMPLE_IMAGES_DIR] if args.samples else []),
      skipped=args.skipped)
  _check_outputs(args, files)
  pixel_sizes, infos = _pixel_sizes_and_dicom_infos(files, args)
  if args.dicom_sr:
    dicom_sr.check_outputs(args.dicom_sr, [
        name + suffix for name in infos
        for suffix, _ in _frames(infos[name], args.frame)])
  print(f'{len(files)} scan file(s): loading '
        f'{args.workdir or args.model or "the shipped model"} (JAX and '
        'TensorFlow start in about 10 s)...', file=sys.stderr, flush=True)
  predictor = (load(args.workdir) if args.workdir else
               load(model=args.model))  # None: the default shipped one.
  predictor.scan_check = args.scan_check
  if args.submission and not predictor.predicts_ellipse:
    raise workdir_lib.PredictError(
        '--submission needs a model that predicts the '
        f'ellipse; {args.workdir or args.model} predicts '
        'HC only')
  rows, ellipses_mm = _predict_files(predictor, files, pixel_sizes, args,
                                     infos)
  missing = _write_outputs(args, predictor, rows, ellipses_mm, infos)
  code = _report(args, predictor, rows, missing)
  if args.dicom_sr:
    code = max(code, _write_dicom_reports(args, rows, files, infos))
  return code


def _write_dicom_reports(args, rows: list[dict], files: dict[str, str],
                         infos: dict) -> int:
  """Writes --dicom-sr's reports and says what it wrote; returns
  EXIT_FLAGGED when a predicted scan got none, else EXIT_OK."""
  dicom_rows = [row for row in rows
                if row['filename'].partition('#')[0] in infos]
  written, missing = dicom_sr.write_reports(
      args.dicom_sr, dicom_rows, files,
      args.workdir or args.model or archive_lib.DEFAULT_MODEL)
  print(f'wrote {len(written)} DICOM SR report(s) to {args.dicom_sr}'
        + ('' if dicom_rows else ' (no DICOM scans among the inputs)'))
  for line in missing:
    print(f'  no report: {line}')
  reportable = [row for row in dicom_rows
                if row['status'] in dicom_sr.REPORTED]
  return EXIT_FLAGGED if len(written) < len(reportable) else EXIT_OK


def _check_flags(args) -> None:
  """Raises PredictError for flag values that cannot work together, or an
  output that cannot be written, before anything is read."""
  if not math.isfinite(args.max_sd_mm) or args.max_sd_mm < 0:
    raise workdir_lib.PredictError(
        f'--max-sd-mm must be >= 0, got {args.max_sd_mm}')
  if args.min_quality is not None and not 0 <= args.min_quality <= 1:
    raise workdir_lib.PredictError(f'--min-quality must be in [0, 1], got '
                                   f'{args.min_quality}')
  scan_files.check_writable(args.out, '--out')
  if args.overlays:
    try:
      os.makedirs(args.overlays, exist_ok=True)
    except OSError as e:
      raise workdir_lib.PredictError(
          f'--overlays {args.overlays} cannot be created '
          f'({e.strerror or e})') from None
    scan_files.check_writable(os.path.join(args.overlays, 'probe.png'),
                              '--overlays')
  if args.submission:
    scan_files.check_writable(args.submission, '--submission')
  if args.dicom_sr:
    _check_folder(args.dicom_sr, '--dicom-sr')
  if args.workdir and args.model:
    raise workdir_lib.PredictError('give --workdir or --model, not both')
  if not args.images and not args.samples:
    raise workdir_lib.PredictError('no scans: give --images (or --samples)')
  if args.frame is not None and args.frame < 0:
    raise workdir_lib.PredictError(
        f'--frame must be >= 0, got {args.frame}')


def _check_folder(folder: str, flag: str) -> None:
  """Raises PredictError unless files can be written in `folder` (made if
  missing)."""
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise workdir_lib.PredictError(
        f'{flag} {folder} cannot be created ({e.strerror or e})') from None
  scan_files.check_writable(os.path.join(folder, 'probe'), flag)


def _check_outputs(args, files: dict[str, str]) -> None:
  """Raises PredictError where --out or --submission would replace an input
  scan or a file predict did not write."""
  inputs = {os.path.realpath(path) for path in files.values()}
  for flag, target in (('--out', args.out),
                       ('--submission', args.submission)):
    if target and os.path.realpath(target) in inputs:
      raise workdir_lib.PredictError(
          f'{flag} {target} is one of the input scans; '
          'not overwritten')
  _check_not_theirs(args.out, '--out', 'filename,pixel_size_mm', args)
  # What they are now: a predict that finishes first is not overwritten.
  args.out_state = scan_files.file_state(args.out)
  args.submission_state = scan_files.file_state(args.submission or '')
  if args.submission:
    _check_not_theirs(args.submission, '--submission',
                      ','.join(scan_files.SUBMISSION_COLUMNS[:2]), args)


def _pixel_sizes_and_dicom_infos(files: dict[str, str], args
                                 ) -> tuple[dict[str, tuple], dict]:
  """({filename: (CSV path, pixel size or None)}, {DICOM filename:
  `dicom.read_info` or the error reading it}); with --submission, checks
  that every scan has a pixel size."""
  dicoms = [name for name, path in files.items() if dicom.is_dicom(path)]
  # The HC18 CSV beside a directory names PNGs; --pixel-sizes, any scan.
  pixel_sizes = scan_files.pixel_sizes_of(files if args.pixel_sizes else {
      name: path for name, path in files.items() if name not in dicoms},
                                          args.pixel_sizes)
  pixel_sizes.update({name: (None, None) for name in dicoms
                      if name not in pixel_sizes})
  infos = dict(zip(dicoms, inference.parallel_map(
      dicom.read_info, [files[n] for n in dicoms])))
  if args.submission:
    scan_files.check_submission_inputs(
        files, _known_pixel_sizes(pixel_sizes, infos))
  return pixel_sizes, infos


def _write_outputs(args, predictor, rows: list[dict],
                   ellipses_mm: dict[str, list], infos: dict) -> list[str]:
  """Writes the CSV (and the submission where every row has an ellipse);
  returns the rows without an ellipse in mm."""
  if getattr(predictor, 'trained_on_phantoms', False):
    for row in rows:
      row['message'] = '; '.join(filter(None, (row['message'],
                                               PHANTOM_NOTE)))
  write_rows(args.out, rows, COLUMNS + kinds.get(predictor.kind).columns + (
      DICOM_COLUMNS if infos else ()), getattr(args, 'out_state', False))
  missing = [row['filename'] for row in rows
             if row['filename'] not in ellipses_mm]
  if args.submission and not missing:
    scan_files.write_submission(args.submission, ellipses_mm,
                                getattr(args, 'submission_state', False))
  return missing


def _report(args, predictor, rows: list[dict], missing: list[str]) -> int:
  """Prints the summary, the flagged rows and notes; returns the exit code."""
  flagged = [row for row in rows if row['status'] != 'ok']
  skipped = getattr(args, 'skipped', [])
  print(f'{len(rows) - len(flagged)} of {len(rows)} images predicted, '
        f'{len(flagged)} failed or flagged'
        + (f', {len(skipped)} file(s) skipped' if skipped else '')
        + f'; wrote {args.out}'
        + (f' and {args.submission}' if args.submission and not missing
           else ''))
  for row in flagged:
    print(f'  {row["status"]}: {row["filename"]}: {row["message"]}')
  for line in scan_files.skipped_lines(skipped):
    print(f'  skipped: {line}')
  if getattr(predictor, 'trained_on_phantoms', False):
    print(f'note: the model was trained on phantom scans, not HC18 '
          f'({PHANTOM_NOTE}): its HC says nothing about real scans')
  if args.submission and missing:
    print(
        f'error: --submission {args.submission} not written: '
        f'{scan_files.some_names(missing)} '
        f'{"has" if len(missing) == 1 else "have"} '
        f'no ellipse (refused or unreadable, see {args.out})',
        file=sys.stderr)
  return EXIT_FLAGGED if flagged else EXIT_OK


def _known_pixel_sizes(pixel_sizes: dict[str, tuple], infos: dict
                       ) -> dict[str, tuple]:
  """`pixel_sizes` with each DICOM file's own where the CSV has none."""
  known = dict(pixel_sizes)
  for name, info in infos.items():
    if known[name][1] is None and isinstance(info, dicom.Info):
      known[name] = (known[name][0], info.pixel_size_mm)
  return known


def _frames(info, frame: int | None) -> list[tuple[str, int]]:
  """(suffix of the row's filename, frame index) of each row of a file;
  `info` is its `dicom.Info`, None for a PNG, or the error reading it."""
  if not isinstance(info, dicom.Info) or info.frames == 1:
    return [('', 0)]
  if frame is not None:
    return [(f'#{frame}', frame)]
  return [(f'#{k}', k) for k in range(info.frames)]


def _read_dicom(path: str, info, index: int):
  if isinstance(info, Exception):
    raise info
  if index >= info.frames:
    raise dicom.DicomError(f'no frame {index}: the file has {info.frames} '
                           'frames (--frame counts from 0)')
  return dicom.read_frame(path, index)


def _scans(files: dict[str, str], infos: dict, frame: int | None):
  """(row filename, file's filename, a function reading the scan) of each
  row, one file at a time: the frames of a DICOM file are decoded only when
  their chunk is predicted."""
  for name, path in files.items():
    info = infos.get(name)
    for suffix, index in _frames(info, frame):
      yield (name + suffix, name,
             functools.partial(_read_dicom, path, info, index)
             if name in infos else
             functools.partial(scan_files.read_scan, path))


def _predict_files(predictor: inference.Predictor, files: dict[str, str],
                   pixel_sizes: dict[str, tuple], args,
                   infos: dict | None = None
                   ) -> tuple[list[dict], dict[str, list]]:
  """The CSV rows for `files` ({filename: path}), chunk by chunk, and an
  ellipse model's ellipses in mm ({filename: [cx, cy, a, b, angle]}) of the
  images predicted where the pixel size is known. `infos` holds
  `dicom.read_info` of the DICOM files (or the error reading it)."""
  infos = infos or {}
  rows, ellipses_mm, noted = [], {}, set()
  scans = _scans(files, infos, args.frame)
  progress = Progress(sum(len(_frames(infos.get(name), args.frame))
                          for name in files))
  while True:
    chunk_scans = list(itertools.islice(scans, PROGRESS_EVERY))
    if not chunk_scans:
      break
    chunk = _read_chunk(chunk_scans, files, pixel_sizes, infos, rows, noted)
    if chunk:
      out = predictor([image for _, image, _, _ in chunk],
                      [row['pixel_size_mm'] or None for row, *_ in chunk],
                      tta_flip=args.tta_flip, max_sd_mm=args.max_sd_mm,
                      min_quality=args.min_quality,
                      keep_masks=bool(args.overlays))
      for i, (row, image, file_name, no_mm) in enumerate(chunk):
        prediction_rows.fill_row(row, out, i, predictor, no_mm, ellipses_mm)
        if args.overlays and row['status'] != 'refused':
          prediction_rows.write_overlay(args.overlays, row, file_name, image,
                                        out, i, predictor.kind)
    progress.update(len(rows))
  progress.done()
  return rows, ellipses_mm


def _read_chunk(chunk_scans, files: dict[str, str],
                pixel_sizes: dict[str, tuple], infos: dict,
                rows: list[dict], noted: set) -> list[tuple]:
  """Reads one chunk of `_scans`, appending a row for each to `rows` (an
  'error' row for a scan that cannot be read or has no usable pixel size).

  Returns:
    (row, image, file's filename, why no mm) of the scans read, to predict.
  """
  chunk = []
  reads = inference.parallel_map(lambda scan: scan[2](), chunk_scans)
  for (name, file_name, _), read in zip(chunk_scans, reads):
    row = dict.fromkeys(COLUMNS, '')
    row.update(filename=name, status='ok')
    rows.append(row)
    csv_path, pixel_size = pixel_sizes[file_name]
    if isinstance(read, Exception):
      message = (str(read) if isinstance(read, ValueError) else
                 f'cannot read the file ({log.error_line(read)})')
      row.update(status='error', message=message)
      continue
    source, no_mm = ('csv' if pixel_size is not None else ''), ''
    if file_name in infos:
      if pixel_size is None:  # A DICOM's own, where the CSV has none.
        info = infos[file_name]
        pixel_size, source, no_mm = (info.pixel_size_mm, info.source,
                                     info.reason)
    elif csv_path and pixel_size is None:  # HC in px, and why not in mm.
      no_mm = f'no pixel size for it in {csv_path}; HC in px only'

    if infos:
      row['pixel_size_source'] = source
    if pixel_size is not None and not (
        PIXEL_SIZE_RANGE_MM[0] <= pixel_size <= PIXEL_SIZE_RANGE_MM[1]):
      row.update(status='error', message=(
          f'pixel size {pixel_size:g} mm is not a scan\'s: outside '
          f'{PIXEL_SIZE_RANGE_MM[0]:g}-{PIXEL_SIZE_RANGE_MM[1]:g} mm'))
      continue
    image, note = read
    if note and (file_name, note) not in noted:
      noted.add((file_name, note))
      print(f'{files[file_name]}: {note}', file=sys.stderr)
    row['pixel_size_mm'] = '' if pixel_size is None else pixel_size
    chunk.append((row, image, file_name, no_mm))
  return chunk


class Progress:
  """A progress line on stderr (rate and ETA), only when it is a terminal.

  It is rewritten in place (carriage return) after each chunk of
  `PROGRESS_EVERY` images and ended with a newline; nothing is written when
  stderr is not a terminal (a log file, a pipe) or for a single chunk.
  """

  def __init__(self, total: int, stream=None, clock=time.monotonic):
    self.total = total
    self.stream = stream or sys.stderr
    self.clock = clock
    self.start = clock()
    self.shown = False
    isatty = getattr(self.stream, 'isatty', None)
    self.enabled = total > PROGRESS_EVERY and bool(isatty and isatty())

  def line(self, done: int) -> str:
    """'done/total images, R images/s, ETA m:ss'."""
    elapsed = max(self.clock() - self.start, 1e-9)
    rate = done / elapsed
    left = (self.total - done) / rate if rate > 0 else math.inf
    eta = (f'{int(left // 60)}:{int(left % 60):02d}' if math.isfinite(left)
           else '?')
    return (f'{done}/{self.total} images, {rate:.1f} images/s, ETA {eta}')

  def update(self, done: int) -> None:
    if self.enabled:
      self.stream.write('\r' + self.line(done) + '\x1b[K')
      self.stream.flush()
      self.shown = True

  def done(self) -> None:
    if self.shown:
      self.stream.write('\n')
      self.stream.flush()


if __name__ == '__main__':
  sys.exit(main())
