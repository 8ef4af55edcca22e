"""Your own scans as a training set: a folder of images and a CSV of HC values.

  python -m hc_jax.main --config=configs/hcnet_mask_label.py \
      --config.data.source=folder --config.data.folder=path/to/scans \
      [--config.data.labels=path/to/labels.csv]

The folder holds the scans (PNG, JPEG, TIFF, BMP or DICOM; colour is
converted to grey), in subfolders if you like. The CSV (`labels.csv` in the
folder unless `data.labels` names another) has a header row naming its
columns, in any order (case, spaces, underscores and brackets are ignored):

  filename         the scan's path relative to the folder
  pixel_size_mm    millimetres per pixel of the scan (HC18's "pixel size(mm)")
  hc_mm            the reference head circumference in mm (HC18's "head
                   circumference (mm)")
  subject          optional: scans of one examination share it, so that they
                   land in one fold (without it, HC18 names 'NNN_[k]HC.png'
                   give the subject; any other name is a subject of its own)
  annotation       optional: an outline image (HC18's `_Annotation.png`: the
                   ellipse drawn as a thin line on black) relative to the
                   folder, for models trained with masks; a label-only model
                   (configs/hcnet_mask_label.py) needs none

Every row is read and checked before anything is prepared, and every
problem (a missing or unreadable file, a bad number, a repeated filename, a
scan in the folder without a row) is listed in one error; nothing is
dropped silently. The scans are prepared once (resized as HC18's are) and
cached by a digest of the bytes of the CSV and of every image file under
the folder
(`hc_jax.data.cache.prepare_folder`).
"""

import math
import os
import re
import warnings

import numpy as np

from hc_jax.data import folds
from hc_jax.data import hc18

LABELS_FILE = 'labels.csv'
# The image formats read, by file suffix.
PIL_FORMATS = {'.png': 'PNG', '.jpg': 'JPEG', '.jpeg': 'JPEG', '.tif': 'TIFF',
               '.tiff': 'TIFF', '.bmp': 'BMP'}
DICOM_SUFFIXES = ('.dcm', '.dicom')
# Header names (lower case, letters and digits only) of each column.
COLUMNS = {
    'filename': ('filename', 'file', 'image', 'path'),
    'pixel_size_mm': ('pixelsizemm', 'pixelsize', 'pixelspacingmm', 'mmperpixel'),
    'hc_mm': ('hcmm', 'hc', 'headcircumferencemm', 'headcircumference'),
    'subject': ('subject', 'subjectid', 'patient', 'patientid', 'study'),
    'annotation': ('annotation', 'outline', 'mask'),
}
REQUIRED = ('filename', 'pixel_size_mm', 'hc_mm')


class FolderError(hc18.ProblemsError):
  """A folder data set that cannot be read; the message lists every problem."""

  def __init__(self, where: str, problems: list[str]):
    super().__init__(f'the scans at {where} have', problems)


def labels_path(folder: str, labels: str = '') -> str:
  """The CSV of a folder data set: `labels`, else `<folder>/labels.csv`."""
  return labels or os.path.join(folder, LABELS_FILE)


def is_image_name(name: str) -> bool:
  suffix = os.path.splitext(name)[1].lower()
  return suffix in PIL_FORMATS or suffix in DICOM_SUFFIXES


def read_image(path: str) -> tuple[np.ndarray, str | None]:
  """`[H, W]` uint8 grey pixels of a scan in any supported format, and a
  warning or None (a conversion made).

  Raises:
    hc18.ImageReadError: for a file that cannot be read as an 8-bit scan.
  """
  suffix = os.path.splitext(path)[1].lower()
  if suffix in DICOM_SUFFIXES:
    return _read_dicom(path)
  if suffix not in PIL_FORMATS:
    raise hc18.ImageReadError(
        f'not a supported image type ({suffix or "no suffix"}; read are '
        f'{", ".join(sorted(set(PIL_FORMATS) | set(DICOM_SUFFIXES)))})')
  return hc18.read_grayscale(path, formats=(PIL_FORMATS[suffix],))


def _read_dicom(path: str) -> tuple[np.ndarray, str | None]:
  import pydicom  # pylint: disable=import-outside-toplevel
  try:
    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array
  except Exception as e:  # pylint: disable=broad-except  # Any damage.
    raise hc18.ImageReadError(
        f'cannot read as DICOM ({type(e).__name__}: '
        f'{" ".join(str(e).split())})') from None
  note = None
  frames = int(getattr(dataset, 'NumberOfFrames', 1) or 1)
  if frames > 1:
    pixels, note = pixels[0], f'{frames} frames: the first is used'
  if pixels.ndim == 3:
    pixels = np.round(pixels[..., :3].astype(np.float32) @ np.asarray(
        [0.299, 0.587, 0.114], np.float32))
    note = 'colour converted to grey'
  if int(getattr(dataset, 'BitsStored', 8)) > 8:
    raise hc18.ImageReadError(
        f'{dataset.BitsStored}-bit DICOM pixels: expected 8-bit scans')
  if pixels.ndim != 2 or not pixels.size:
    raise hc18.ImageReadError(f'unexpected pixel shape {pixels.shape}')
  return np.clip(pixels, 0, 255).astype(np.uint8), note


def _key(name: str) -> str:
  return re.sub(r'[^a-z0-9]', '', name.lower())


def _header(row: list[str]) -> tuple[dict[str, int], list[str]]:
  """{column: index} from a header row, and its problems."""
  where, problems = {}, []
  for index, cell in enumerate(row):
    key = _key(cell)
    for column, names in COLUMNS.items():
      if key in names:
        if column in where:
          problems.append(f'header: two columns are {column} '
                          f'({row[where[column]]!r}, {cell!r})')
        where[column] = index
  missing = [c for c in REQUIRED if c not in where]
  if missing:
    problems.append(
        f'header {",".join(row)!r} names no column for {", ".join(missing)} '
        f'(expected a header row such as '
        f'"filename,pixel_size_mm,hc_mm[,subject][,annotation]")')
  return where, problems


def _inside(folder: str, name: str) -> str | None:
  """The path of `name` under `folder`, or None when it leaves it."""
  if not name or os.path.isabs(name):
    return None
  path = os.path.normpath(os.path.join(folder, name))
  root = os.path.normpath(folder)
  return path if path.startswith(root + os.sep) else None


def _read_row(cells: dict[str, str], folder: str
              ) -> tuple[dict | None, list[str]]:
  errors = []
  values = {}
  for column, what in (('pixel_size_mm', 'pixel size (mm)'),
                       ('hc_mm', 'head circumference (mm)')):
    try:
      values[column] = hc18.positive_number(cells[column], what)
    except ValueError as e:
      errors.append(str(e))
  path = _inside(folder, cells['filename'])
  shape = None
  if path is None:
    errors.append('the filename must be a path inside the folder')
  elif not os.path.isfile(path):
    errors.append('listed in the CSV but the image is missing')
  else:
    try:
      image, note = read_image(path)
      shape = image.shape
      if note:
        warnings.warn(f'{cells["filename"]}: {note}', stacklevel=3)
    except hc18.ImageReadError as e:
      errors.append(str(e))
  fitted = None
  if cells.get('annotation'):
    outline = _inside(folder, cells['annotation'])
    try:
      if outline is None:
        raise ValueError('must be a path inside the folder')
      annotation, _ = read_image(outline)
      fitted = hc18.fit_outline(annotation, shape,
                                values.get('pixel_size_mm', math.nan),
                                values.get('hc_mm', math.nan))
    except ValueError as e:  # ImageReadError too.
      errors.append(f'annotation {cells["annotation"]}: {e}')
  if errors:
    return None, errors
  return dict(filename=os.path.relpath(path, folder), image_path=path,
              ellipse=fitted, **values), []


def _subject_ids(rows: list[dict], subjects: list[str] | None
                 ) -> tuple[list[int], str | None]:
  """An integer subject per row, and a note on where they came from."""
  if subjects is not None:
    ids = {s: i for i, s in enumerate(sorted(set(subjects)))}
    return [ids[s] for s in subjects], None
  try:
    return [folds.parse_filename(os.path.splitext(
        os.path.basename(r['filename']))[0] + '.png')[0] for r in rows], None
  except ValueError:
    return list(range(len(rows))), (
        'no subject column: each scan is a subject of its own; add one if '
        'several scans come from one examination, so that they share a fold')


def _image_files(folder: str) -> list[tuple[str, str]]:
  """(path relative to `folder`, path) of every file under it with an image
  suffix (scans and outlines), in a fixed order."""
  files = []
  for directory, dirs, names in os.walk(folder):
    dirs.sort()
    files += [(os.path.relpath(os.path.join(directory, n), folder),
               os.path.normpath(os.path.join(directory, n)))
              for n in sorted(names) if is_image_name(n)]
  return files


def sources(folder: str, labels: str = '') -> list[tuple[str, str]]:
  """(name, path) of every file a folder data set is made of: its CSV and
  every image file under the folder (scans, outlines, and any scan without
  a row, which `scan` refuses), for its content digest. Reads no image."""
  csv_path = labels_path(folder, labels)
  return [(os.path.basename(csv_path), csv_path)] + _image_files(folder)


def scan(folder: str, labels: str = ''
         ) -> tuple[list[hc18.Record], list[str]]:
  """Reads and checks a folder data set.

  Args:
    folder: the scans' folder.
    labels: its CSV ('' for `<folder>/labels.csv`).

  Returns:
    (records sorted by filename, notes): each record's `filename` is its
    path relative to the folder, `frame` 0; `notes` are status lines for the
    user.

  Raises:
    FolderError: listing every problem, when any is found.
  """
  csv_path = labels_path(folder, labels)
  if not os.path.isdir(folder):
    raise FolderError(folder, ['the folder does not exist'])
  problems = []
  rows = hc18.read_csv_rows(csv_path, problems)
  if problems:
    raise FolderError(folder, problems)
  where, problems = _header(rows[0][1])
  if problems:
    raise FolderError(folder, [f'{os.path.basename(csv_path)} {p}'
                               for p in problems])
  good, subjects, seen = [], [], set()
  for line, row in rows[1:]:
    cells = {c: row[i].strip() if i < len(row) else ''
             for c, i in where.items()}
    at = f'{os.path.basename(csv_path)} line {line} ({cells["filename"]})'
    if cells['filename'] in seen:
      problems.append(f'{at}: repeated filename')
      continue
    seen.add(cells['filename'])
    if 'subject' in where and not cells['subject']:
      problems.append(f'{at}: empty subject')
      continue
    record, errors = _read_row(cells, folder)
    if errors:
      problems.append(f'{at}: ' + '; '.join(errors))
      continue
    good.append(record)
    subjects.append(cells.get('subject'))
  listed = {os.path.normpath(os.path.join(folder, r[where['filename']]))
            for _, r in rows[1:] if where['filename'] < len(r)}
  if 'annotation' in where:
    listed |= {os.path.normpath(os.path.join(folder, r[where['annotation']]))
               for _, r in rows[1:] if where['annotation'] < len(r)}
  for name, path in _image_files(folder):
    if path not in listed and not name.endswith(hc18.ANNOTATION_SUFFIX):
      problems.append(f'{name}: a scan in the folder without a row in '
                      f'{os.path.basename(csv_path)}')
  if not good and not problems:
    problems.append(f'{os.path.basename(csv_path)}: no rows')
  if problems:
    raise FolderError(folder, problems)
  ids, note = _subject_ids(good, subjects if 'subject' in where else None)
  records = sorted(
      (hc18.Record(filename=r['filename'], image_path=r['image_path'],
                   subject_id=i, frame=0, pixel_size_mm=r['pixel_size_mm'],
                   hc_mm=r['hc_mm'], ellipse=r['ellipse'])
       for r, i in zip(good, ids)), key=lambda r: r.filename)
  return records, [note] if note else []


def ellipse_array(records: list[hc18.Record]) -> np.ndarray:
  """`[N, 5]` reference ellipses, NaN rows where a record has none."""
  return np.asarray([list(r.ellipse.as_dict().values())
                     if r.ellipse is not None else [math.nan] * 5
                     for r in records], np.float32).reshape(-1, 5)
