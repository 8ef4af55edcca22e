"""Applies a trained run, or a grid of fold runs, to new scans.

  python -m hc_jax.predict --workdir=runs/cnn263k_mse_fold0 \
      --images=path/to/hc18/test_set --out=predictions.csv \
      [--pixel-sizes=CSV] [--overlays=DIR] [--tta-flip] [--max-sd-mm=10] \
      [--submission=FILE] [--frame=N]
  python -m hc_jax.predict --samples --out=hc.csv --overlays=overlays/

Without `--workdir`, the model shipped with the package predicts
(`hc_jax.archive`: `--model=NAME`, default the five-fold
`hcnet_mask_refine` ensemble), so no training and no HC18 copy are needed;
`--samples` adds the five HC18 test-set scans shipped with it (and their
pixel sizes) to `--images`. A workdir whose subdirectories are finished
runs (`fold0/` ... `fold4/`) is a fold ensemble: HC is the mean over the
runs and `hc_mm_sd` their standard deviation (ddof=1).

For each image: HC in pixels of the original image, in mm where its pixel
size is known, the gestational age by Hadlock (1984), a `status` (ok,
uncertain, implausible, refused, error) and, unless ok, a `message` saying
why, and the `model` that measured it (also on each overlay); a model that
gives the head's ellipse adds it. `--help` and the
README say what each column and status means; the code behind them:

  hc_jax.evaluation.scan_files       --images (directories, files, globs;
                                     what is skipped) and --pixel-sizes
  hc_jax.evaluation.dicom            DICOM scans: grey values, pixel size
  hc_jax.evaluation.prediction_rows  scans read and predicted chunk by
                                     chunk, each row's cells and overlay
  hc_jax.evaluation.inference        the predictor: statuses, the plausible
                                     range, ensembles and --tta-flip
  hc_jax.evaluation.output_files     the CSVs, --submission (HC18's format)
                                     and overlays, never replacing a file
                                     predict did not write
  hc_jax.evaluation.dicom_sr         --dicom-sr's Structured Reports

This module is the command line: flags, wiring and exit codes. The
predictor is also a library (`predict.load` is `loading.load`):

  predictor = predict.load('runs/cv_grid')
  out = predictor([image_uint8_2d, ...], pixel_sizes_mm=[0.1, ...])
  out['hc_mm'], out['hc_mm_sd'], out['hc_px'], out['status'], out['message']
  out['ellipse_px'], out['ellipse_mm']  # An ellipse model's.

It preprocesses scans with the training code's own ops, so a run's test-fold
images get the very predictions in its `predictions_test.csv`.
"""

import argparse
import math
import sys
from typing import Sequence
import warnings

from hc_jax import archive as archive_lib
from hc_jax import workdir as workdir_lib
from hc_jax.evaluation import dicom
from hc_jax.evaluation import dicom_sr
from hc_jax.evaluation import inference
from hc_jax.evaluation import loading
from hc_jax.evaluation import output_files
from hc_jax.evaluation import prediction_rows
from hc_jax.nets import kinds

# The library entry point the README names: `predict.load(workdir)`.
load = loading.load

# Exit codes of the command line.
EXIT_OK, EXIT_FLAGGED, EXIT_USAGE = 0, 1, 2


_DESCRIPTION = 'Predict HC (and gestational age) for new scans.'
_EPILOG = f"""\
status of each row (the CSV's `status`; `message` says why unless ok):
  ok           predicted and plausible
  uncertain    fold ensemble SD above --max-sd-mm (pixel size known), or a
               quality below --min-quality (default: the model's own)
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

CSV columns: {", ".join(prediction_rows.COLUMNS)}

DICOM (.dcm) files and folders of them mix with PNGs in --images. Grey,
RGB and YBR files, 8 bits or more (rescaled to 0-255 by the stored range);
each frame of a multi-frame file is a row file.dcm#k (--frame=N: frame N
only). Pixel size: the file's --pixel-sizes row, else its ultrasound region
(cm) at the image centre, else PixelSpacing; none, or non-square pixels:
HC in px only, and the message says why. The CSV then ends with
{", ".join(prediction_rows.DICOM_COLUMNS)} (ultrasound_region, PixelSpacing, csv, or empty).

models that give the head's ellipse (the mask models, such as the shipped
default hcnet_mask_refine, and hcnet_ellipse; not the HC regressors) add
it, in pixels of the original image and in mm where the pixel size is
known (x the column, y the row, semi-axes a >= b, angle_rad the angle of a
from +x towards +y, i.e. clockwise on the screen, in [0, pi)); overlays
draw it:
  {", ".join(prediction_rows.ELLIPSE_COLUMNS[:5])},
  {", ".join(prediction_rows.ELLIPSE_COLUMNS[5:])}
mask models add {kinds.QUALITY_COLUMN}, the soft IoU of the
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
  {",".join(output_files.SUBMISSION_COLUMNS)}
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
                      help='the quality below which a prediction is '
                      'uncertain (models with a quality signal; default: '
                      'the threshold stored with the model, chosen on its '
                      'validation parts)')
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


def _print_warning(message, category, filename, lineno, file=None, line=None):
  del category, filename, lineno, file, line
  print(f'warning: {message}', file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit code (0 ok, 1 some images
  failed or were flagged, 2 usage, configuration or model error)."""
  args = _parse_args(argv)
  from hc_jax import cli  # pylint: disable=import-outside-toplevel
  # Orbax's INFO lines off; TensorFlow once the inputs are checked (_predict).
  cli.quiet_logs(tensorflow=False)
  with warnings.catch_warnings():
    warnings.showwarning = _print_warning
    warnings.simplefilter('always', UserWarning)
    # Bad input: one line, exit EXIT_USAGE.
    return cli.run_main(lambda: _predict(args))


def _predict(args: argparse.Namespace) -> int:
  """Predicts, writes and reports what `args` ask for; returns the exit
  code."""
  _check_flags(args)
  skipped = []  # (path, why) of the directories' other files.
  files = dicom.image_paths(
      [path for paths in args.images or [] for path in paths] +
      ([archive_lib.SAMPLE_IMAGES_DIR] if args.samples else []),
      skipped=skipped)
  states = output_files.check_outputs(
      {'--out': args.out, '--submission': args.submission}, files,
      args.workdir)
  pixel_sizes, infos = prediction_rows.pixel_sizes_and_infos(
      files, args.pixel_sizes)
  if args.submission:
    output_files.check_submission_inputs(
        files, prediction_rows.known_pixel_sizes(pixel_sizes, infos))
  if args.dicom_sr:
    dicom_sr.check_outputs(args.dicom_sr, [
        name + suffix for name in infos
        for suffix, _ in prediction_rows.frames(infos[name], args.frame)])
  print(f'{len(files)} scan file(s): loading '
        f'{args.workdir or args.model or "the shipped model"} (JAX and '
        'TensorFlow start in about 10 s)...', file=sys.stderr, flush=True)
  from hc_jax import cli  # pylint: disable=import-outside-toplevel
  cli.quiet_logs()  # Imports TensorFlow without its start-up lines.
  predictor = (load(args.workdir) if args.workdir else
               load(model=args.model))  # None: the default shipped one.
  predictor.scan_check = args.scan_check
  if args.submission and not predictor.predicts_ellipse:
    raise workdir_lib.PredictError(
        '--submission needs a model that predicts the '
        f'ellipse; {args.workdir or args.model} predicts '
        'HC only')
  rows, ellipses_mm = prediction_rows.predict_files(
      predictor, files, pixel_sizes, infos, frame=args.frame,
      overlays=args.overlays, tta_flip=args.tta_flip,
      max_sd_mm=args.max_sd_mm, min_quality=args.min_quality)
  phantoms = getattr(predictor, 'trained_on_phantoms', False)
  prediction_rows.write_rows(
      args.out, rows, prediction_rows.columns(predictor, infos),
      states['--out'], phantoms)
  missing = [row['filename'] for row in rows
             if row['filename'] not in ellipses_mm]
  if args.submission and not missing:
    output_files.write_submission(args.submission, ellipses_mm,
                                  states['--submission'])
  flagged = prediction_rows.print_summary(
      rows, skipped, args.out, args.submission, missing, phantoms)
  reported = not args.dicom_sr or dicom_sr.write_and_list(
      args.dicom_sr, rows, {name: files[name] for name in infos},
      args.workdir or args.model or archive_lib.DEFAULT_MODEL)
  return EXIT_FLAGGED if flagged or not reported else EXIT_OK


def _check_flags(args) -> None:
  """Raises PredictError for flag values that cannot work together, or an
  output that cannot be written, before anything is read."""
  if not math.isfinite(args.max_sd_mm) or args.max_sd_mm < 0:
    raise workdir_lib.PredictError(
        f'--max-sd-mm must be >= 0, got {args.max_sd_mm}')
  if args.min_quality is not None and not 0 <= args.min_quality <= 1:
    raise workdir_lib.PredictError(f'--min-quality must be in [0, 1], got '
                                   f'{args.min_quality}')
  output_files.check_writable(args.out, '--out')
  if args.overlays:
    output_files.check_folder(args.overlays, '--overlays', 'probe.png')
  if args.submission:
    output_files.check_writable(args.submission, '--submission')
  if args.dicom_sr:
    output_files.check_folder(args.dicom_sr, '--dicom-sr')
  if args.workdir and args.model:
    raise workdir_lib.PredictError('give --workdir or --model, not both')
  if not args.images and not args.samples:
    raise workdir_lib.PredictError('no scans: give --images (or --samples)')
  if args.frame is not None and args.frame < 0:
    raise workdir_lib.PredictError(
        f'--frame must be >= 0, got {args.frame}')


if __name__ == '__main__':
  sys.exit(main())
