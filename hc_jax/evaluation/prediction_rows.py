"""The rows of `python -m hc_jax.predict`'s CSV: scan files read chunk by
chunk, predicted, and each row's cells and overlay.

  pixel_sizes, infos = prediction_rows.pixel_sizes_and_infos(files)
  rows, ellipses_mm = prediction_rows.predict_files(
      predictor, files, pixel_sizes, infos, overlays='overlays/')
  prediction_rows.write_rows('hc.csv', rows,
                             prediction_rows.columns(predictor, infos))

`files` is {filename: path} (`hc_jax.evaluation.dicom.image_paths`). Scans
are read (on all cores) and predicted `PROGRESS_EVERY` at a time, so a large
folder never sits in memory at once; a progress line (`log.Progress`)
follows them on a terminal. Every frame of a multi-frame DICOM file is a row
`file.dcm#k` (k from 0), or only frame N with `frame=N`; a single-frame
file is one row `file.dcm`. A DICOM's pixel size is its row of the
pixel-size CSV where it has one, else the file's own (`dicom.read_info`);
the row's `pixel_size_source` says which ('csv', 'ultrasound_region',
'PixelSpacing', or '' where it is unknown). A scan without a pixel size
keeps its HC in px, and its `message` says why; one that cannot be read,
or whose pixel size is outside `PIXEL_SIZE_RANGE_MM`, is an 'error' row.

Each row gets its HC (px, mm, SD), status and message (`fill_row`), its
gestational age (Hadlock) unless implausible, the model that measured it
(`model`), and the cells of the model's kind (`hc_jax.nets.kinds`: an
ellipse model's `ELLIPSE_COLUMNS`, a quality); the overlay is the scan with
what its kind draws (the ellipse, a mask's outline) and those lines, the
model's name last (`output_files.write_overlay`).
"""

import functools
import itertools
import math
import os
import sys
from typing import Sequence

from hc_jax import log
from hc_jax import workdir as workdir_lib
from hc_jax.evaluation import dicom
from hc_jax.evaluation import gestational_age
from hc_jax.evaluation import inference
from hc_jax.evaluation import output_files
from hc_jax.evaluation import scan_files
from hc_jax.nets import kinds

# The CSV's columns, whatever the model.
# `model`: which model measured the scan (`inference.Predictor.name`).
COLUMNS = ('filename', 'pixel_size_mm', 'hc_px', 'hc_mm', 'hc_mm_sd',
           'ga_weeks', 'ga_flag', 'status', 'message', 'model')
# Added after COLUMNS for an ellipse model (its kind's).
ELLIPSE_COLUMNS = kinds.ELLIPSE_COLUMNS
# Added last when DICOM files are among the scans: where the pixel size came
# from ('ultrasound_region', 'PixelSpacing', 'csv', or '' when unknown).
DICOM_COLUMNS = ('pixel_size_source',)
STATUSES = ('ok', 'uncertain', 'implausible', 'refused', 'error')
# Every row's message when the model trained on phantoms (the demos).
PHANTOM_NOTE = 'model trained on phantom scans'
PROGRESS_EVERY = 64  # Images per chunk, and per progress line.
# Pixel sizes (mm) taken as a scan's: HC18's are 0.05-0.39 mm; an ultrasound
# image at 0.001 or 10 mm per pixel is a unit or typing mistake, an error row.
PIXEL_SIZE_RANGE_MM = (0.001, 10.0)


def columns(predictor, infos: dict) -> tuple[str, ...]:
  """The CSV's header: `COLUMNS`, the model's kind's columns, and
  `DICOM_COLUMNS` where DICOM files are among the scans (`infos`)."""
  return COLUMNS + kinds.get(predictor.kind).columns + (
      DICOM_COLUMNS if infos else ())


def write_rows(path: str, rows: Sequence[dict],
               header: Sequence[str] = COLUMNS, unchanged_since=False,
               phantoms: bool = False) -> None:
  """Writes the prediction CSV atomically.

  Args:
    path: the CSV (`--out`).
    rows: its rows.
    header: its columns (`columns`).
    unchanged_since: see `output_files.write_csv` (False: not checked).
    phantoms: whether the model trained on phantom scans: every row's
      message then ends with `PHANTOM_NOTE`.

  Raises:
    PredictError: when it cannot be written, or another process wrote it
      since `unchanged_since`; nothing is left behind.
  """
  if phantoms:
    for row in rows:
      row['message'] = '; '.join(filter(None, (row['message'],
                                               PHANTOM_NOTE)))
  output_files.write_csv(path, header, rows, '--out', unchanged_since)


def print_summary(rows: Sequence[dict], skipped: Sequence[tuple],
                  out: str, submission: str | None, missing: Sequence[str],
                  phantoms: bool = False) -> int:
  """Prints what predict did: the count of rows predicted and flagged, each
  flagged row, the files skipped (`scan_files.skipped_lines`), a phantom
  model's note, and why the submission was not written.

  Args:
    rows: the CSV's rows.
    skipped: (path, why) of the files skipped.
    out: the CSV written.
    submission: the submission asked for, or None.
    missing: the rows without an ellipse in mm (no submission if any).
    phantoms: whether the model trained on phantom scans.

  Returns:
    The number of rows flagged or failed (any status but ok).
  """
  flagged = [row for row in rows if row['status'] != 'ok']
  print(f'{len(rows) - len(flagged)} of {len(rows)} images predicted, '
        f'{len(flagged)} failed or flagged'
        + (f', {len(skipped)} file(s) skipped' if skipped else '')
        + f'; wrote {out}'
        + (f' and {submission}' if submission and not missing else ''))
  for row in flagged:
    print(f'  {row["status"]}: {row["filename"]}: {row["message"]}')
  for line in scan_files.skipped_lines(skipped):
    print(f'  skipped: {line}')
  if phantoms:
    print(f'note: the model was trained on phantom scans, not HC18 '
          f'({PHANTOM_NOTE}): its HC says nothing about real scans')
  if submission and missing:
    print(
        f'error: --submission {submission} not written: '
        f'{output_files.some_names(missing)} '
        f'{"has" if len(missing) == 1 else "have"} '
        f'no ellipse (refused or unreadable, see {out})',
        file=sys.stderr)
  return len(flagged)


def pixel_sizes_and_infos(files: dict[str, str],
                          csv_path: str | None = None
                          ) -> tuple[dict[str, tuple], dict]:
  """({filename: (CSV path, pixel size or None)}, {DICOM filename:
  `dicom.read_info` or the error reading it}).

  The pixel sizes are `scan_files.pixel_sizes_of`: with `csv_path`, of
  every scan; else the HC18 CSV beside each directory, of the PNGs (a
  DICOM file's own is in its info).

  Raises:
    PredictError: for a bad pixel-size CSV.
  """
  dicoms = [name for name, path in files.items() if dicom.is_dicom(path)]
  pixel_sizes = scan_files.pixel_sizes_of(files if csv_path else {
      name: path for name, path in files.items() if name not in dicoms},
                                          csv_path)
  pixel_sizes.update({name: (None, None) for name in dicoms
                      if name not in pixel_sizes})
  infos = dict(zip(dicoms, scan_files.parallel_map(
      dicom.read_info, [files[n] for n in dicoms])))
  return pixel_sizes, infos


def known_pixel_sizes(pixel_sizes: dict[str, tuple], infos: dict
                      ) -> dict[str, tuple]:
  """`pixel_sizes` with each DICOM file's own where the CSV has none."""
  known = dict(pixel_sizes)
  for name, info in infos.items():
    if known[name][1] is None and isinstance(info, dicom.Info):
      known[name] = (known[name][0], info.pixel_size_mm)
  return known


def frames(info, frame: int | None) -> list[tuple[str, int]]:
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
    for suffix, index in frames(info, frame):
      yield (name + suffix, name,
             functools.partial(_read_dicom, path, info, index)
             if name in infos else
             functools.partial(scan_files.read_scan, path))


def predict_files(predictor, files: dict[str, str],
                  pixel_sizes: dict[str, tuple], infos: dict | None = None,
                  frame: int | None = None, overlays: str | None = None,
                  tta_flip: bool = False,
                  max_sd_mm: float = inference.DEFAULT_MAX_SD_MM,
                  min_quality: float | None = None
                  ) -> tuple[list[dict], dict[str, list]]:
  """The CSV rows of `files`, predicted chunk by chunk.

  Args:
    predictor: a `hc_jax.evaluation.inference.Predictor`.
    files: {filename: path}.
    pixel_sizes: {filename: (CSV path, pixel size or None)}
      (`pixel_sizes_and_infos`).
    infos: {DICOM filename: `dicom.read_info` or the error reading it}.
    frame: the only frame of a multi-frame DICOM to predict (None: all).
    overlays: a folder for each scan's overlay, or None.
    tta_flip, max_sd_mm, min_quality: passed to the predictor.

  Returns:
    (the rows, an ellipse model's ellipses in mm ({filename: [cx, cy, a, b,
    angle]}) of the images predicted where the pixel size is known).

  Raises:
    PredictError: when an overlay cannot be written.
  """
  infos = infos or {}
  rows, ellipses_mm, noted = [], {}, set()
  scans = _scans(files, infos, frame)
  progress = log.Progress(sum(len(frames(infos.get(name), frame))
                              for name in files), chunk=PROGRESS_EVERY)
  while True:
    chunk_scans = list(itertools.islice(scans, PROGRESS_EVERY))
    if not chunk_scans:
      break
    chunk = _read_chunk(chunk_scans, files, pixel_sizes, infos, rows, noted,
                        getattr(predictor, 'name', ''))
    if chunk:
      out = predictor([image for _, image, _, _ in chunk],
                      [row['pixel_size_mm'] or None for row, *_ in chunk],
                      tta_flip=tta_flip, max_sd_mm=max_sd_mm,
                      min_quality=min_quality, keep_masks=bool(overlays))
      for i, (row, image, file_name, no_mm) in enumerate(chunk):
        fill_row(row, out, i, predictor, no_mm, ellipses_mm)
        if overlays and row['status'] != 'refused':
          write_overlay(overlays, row, file_name, image, out, i,
                        predictor.kind)
    progress.update(len(rows))
  progress.done()
  return rows, ellipses_mm


def _read_chunk(chunk_scans, files: dict[str, str],
                pixel_sizes: dict[str, tuple], infos: dict,
                rows: list[dict], noted: set, model: str) -> list[tuple]:
  """Reads one chunk of `_scans`, appending a row for each to `rows` (an
  'error' row for a scan that cannot be read or has no usable pixel size),
  each naming the `model`.

  Returns:
    (row, image, file's filename, why no mm) of the scans read, to predict.
  """
  chunk = []
  reads = scan_files.parallel_map(lambda scan: scan[2](), chunk_scans)
  for (name, file_name, _), read in zip(chunk_scans, reads):
    row = dict.fromkeys(COLUMNS, '')
    row.update(filename=name, status='ok', model=model)
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


def _fmt(value: float, digits: int) -> str:
  return '' if value is None or not math.isfinite(value) else (
      f'{value:.{digits}f}')


def fill_row(row: dict, out: dict, i: int, predictor, no_mm: str,
             ellipses_mm: dict[str, list]) -> None:
  """Sets a row's cells from image `i` of the predictor's output `out` (its
  kind's cells too), and the ellipse in mm in `ellipses_mm` where the model
  gives one and the pixel size is known."""
  row.update(status=out['status'][i], message=out['message'][i])
  if row['status'] == 'refused':
    return
  if no_mm:
    row['message'] = '; '.join(filter(None, [row['message'], no_mm]))
  row.update(hc_px=_fmt(out['hc_px'][i], 3),
             hc_mm=_fmt(out['hc_mm'][i], 3),
             hc_mm_sd=_fmt(out['hc_mm_sd'][i], 3))
  row.update(kinds.get(predictor.kind).cells(out, i))
  if 'ellipse_mm' in out and math.isfinite(out['ellipse_mm'][i][0]):
    ellipses_mm[row['filename']] = list(out['ellipse_mm'][i])
  if row['status'] != 'implausible':
    ga_weeks = gestational_age.hadlock_ga_weeks(out['hc_mm'][i])
    row.update(ga_weeks=_fmt(ga_weeks, 2),
               ga_flag=gestational_age.ga_flag(ga_weeks))


def write_overlay(overlays: str, row: dict, file_name: str, image, out: dict,
                  i: int, kind) -> None:
  """Writes the overlay of image `i` of `out` under `overlays`, with what
  the model's `kind` (a `hc_jax.nets.kinds.Kind` or its name) draws.

  Raises:
    PredictError: when it cannot be written.
  """
  shapes = kinds.get(kind).overlay(out, i)
  # A frame k of file.dcm: file_framek_prediction.png.
  overlay = os.path.join(
      overlays, os.path.splitext(file_name)[0]
      + row['filename'][len(file_name):].replace('#', '_frame')
      + scan_files.OVERLAY_SUFFIX)
  try:
    os.makedirs(os.path.dirname(overlay), exist_ok=True)
    output_files.write_overlay(
        image, _overlay_lines(row), overlay, shapes['ellipse'],
        shapes['outline'])
  except OSError as e:
    raise workdir_lib.PredictError(
        f'overlay {overlay} cannot be written '
        f'({e.strerror or e})') from None


def _overlay_lines(row) -> list[str]:
  if not row['hc_mm']:
    lines = [f'HC {float(row["hc_px"]):.1f} px (pixel size unknown)']
  else:
    spread = f' ± {float(row["hc_mm_sd"]):.1f}' if row['hc_mm_sd'] else ''
    lines = [f'HC {float(row["hc_mm"]):.1f}{spread} mm']
    if row['ga_weeks']:
      lines.append(f'GA {row["ga_weeks"]} weeks (Hadlock)')
  if row['ga_flag']:
    lines.append(row['ga_flag'])
  if row['status'] != 'ok':
    lines.append(f'{row["status"].upper()}: {row["message"]}')
  if row.get('model'):
    lines.append(f'model: {row["model"]}')
  return lines

