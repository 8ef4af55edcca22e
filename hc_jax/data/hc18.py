"""Reads and checks an HC18 directory in the Zenodo layout, without TensorFlow.

The layout (Zenodo record 1327317):

  training_set/NNN_[k]HC.png              8-bit grayscale scans
  training_set/NNN_[k]HC_Annotation.png   the sonographer's ellipse outline
  training_set_pixel_size_and_HC.csv      filename,pixel size(mm),head circumference (mm)
  test_set/NNN_[k]HC.png
  test_set_pixel_size.csv                 filename,pixel size(mm)

`scan_split` reads every file once, checks it and fits the reference ellipse.
It collects every problem instead of stopping at the first, so a broken copy
is reported in one go; conversions that are safe (an RGB scan to grayscale)
are done with a warning that names the file. The TFDS builder
(`hc_jax.data.hc18_tfds`) and the NumPy export both stand on it.
"""

import csv
import dataclasses
import errno
import math
import os
import struct
import warnings
import zlib

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from hc_jax.data import ellipse as ellipse_lib
from hc_jax.data import folds

SPLITS = {
    'train': ('training_set', 'training_set_pixel_size_and_HC.csv'),
    'test': ('test_set', 'test_set_pixel_size.csv'),
}
ZENODO_RECORD = 'https://zenodo.org/records/1327317/files/'
ZENODO_FILES = ('training_set.zip', 'test_set.zip',
                'training_set_pixel_size_and_HC.csv', 'test_set_pixel_size.csv')
ANNOTATION_SUFFIX = '_Annotation.png'
# The fitted perimeter reproduces the CSV's HC to 0.05 mm on HC18; a larger
# gap means the annotation and the CSV row do not belong together.
MAX_HC_DISAGREEMENT_MM = 1.0
# PIL modes of more than 8 bits per pixel; HC18 scans are 8-bit.
WIDE_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F')


class ImageReadError(ValueError):
  """An image file that cannot be read as an 8-bit grayscale scan."""


class ProblemsError(ValueError):
  """A data set that cannot be read; the message lists every problem (a
  command prints them one a line under its first, `cli.error_text`)."""

  def __init__(self, what: str, problems: list[str]):
    self.problems = list(problems)
    lines = '\n'.join(f'  {p}' for p in self.problems)
    super().__init__(f'{what} {len(self.problems)} problem(s):\n{lines}')


class HC18Error(ProblemsError):
  """An HC18 directory that cannot be read; the message lists every problem."""

  def __init__(self, root: str, problems: list[str]):
    super().__init__(f'HC18 data at {root} has', problems)


@dataclasses.dataclass(frozen=True)
class Record:
  """One checked image of a split (annotation fields are NaN in 'test')."""
  filename: str
  image_path: str
  subject_id: int
  frame: int
  pixel_size_mm: float
  hc_mm: float = math.nan
  ellipse: ellipse_lib.Ellipse | None = None

  @property
  def hc_px(self) -> float:
    """Head circumference in pixels of the original image."""
    return self.hc_mm / self.pixel_size_mm


def _os_error_reason(path: str, error: OSError) -> str:
  """What an operating-system error opening `path` means, in a few words."""
  if error.errno == errno.ENOENT:
    return ('broken symbolic link (its target does not exist)'
            if os.path.islink(path) else 'file is missing')
  if error.errno == errno.ELOOP:
    return 'symbolic link loop (the link never reaches a file)'
  if error.errno in (errno.EACCES, errno.EPERM):
    return 'permission denied (the file is not readable)'
  if error.errno == errno.EISDIR:
    return 'is a directory, not an image'
  return f'cannot read the file ({error.strerror or error})'


def read_grayscale(path: str, formats: tuple[str, ...] = ('PNG',)
                   ) -> tuple[np.ndarray, str | None]:
  """Reads an 8-bit grayscale PNG (or an image in another of `formats`).

  Args:
    path: the file.
    formats: the PIL formats taken, by content whatever the file's name
      (HC18 is PNG; `hc_jax.evaluation.scan_files.read_scan` also takes
      JPEG, TIFF and BMP). Of a multi-page file (TIFF), the first page.

  Returns:
    ([H, W] uint8 array, a warning or None). Colour, palette, 1-bit and
    grayscale-with-alpha images are converted to 8-bit grayscale with a
    warning.

  Raises:
    ImageReadError: for a missing, unreadable (permissions, a symbolic link
      loop, a directory), corrupt, truncated, non-PNG or 16-bit file; the
      message says which.
  """
  try:
    file = open(path, 'rb')  # pylint: disable=consider-using-with
  except OSError as e:
    raise ImageReadError(_os_error_reason(path, e)) from None
  try:
    with file, Image.open(file, formats=formats) as image:
      image.load()
      mode = image.mode
      if mode in WIDE_MODES:
        raise ImageReadError(
            f'{mode} image: expected 8-bit grayscale, got '
            f'{"16" if "16" in mode else "32"}-bit')
      notes = []
      if getattr(image, 'n_frames', 1) > 1:  # A multi-page TIFF.
        notes.append(f'first of its {image.n_frames} pages read')
      if mode != 'L':
        notes.append(f'{mode} image converted to 8-bit grayscale')
        image = image.convert('L')
      note = '; '.join(notes) or None
      pixels = np.asarray(image, dtype=np.uint8)
  except ImageReadError:
    raise
  except Image.DecompressionBombError as e:
    raise ImageReadError(f'image too large to decode safely ({e})') from None
  except UnidentifiedImageError:
    kinds = ('a PNG' if formats == ('PNG',) else
             f'a {", ".join(formats[:-1])} or {formats[-1]}')
    raise ImageReadError(f'corrupt or not {kinds} image (no signature of '
                         'one that PIL can read)') from None
  except OSError as e:
    if e.errno is not None:  # The file system, not the data.
      raise ImageReadError(_os_error_reason(path, e)) from None
    raise ImageReadError(f'corrupt or truncated image ({e})') from None
  # PIL's decoders raise these for malformed data (bad chunk lengths, bad
  # zlib streams, modes it cannot convert).
  except (SyntaxError, ValueError, EOFError, IndexError, TypeError,
          struct.error, zlib.error, MemoryError) as e:
    raise ImageReadError(
        f'corrupt or truncated image ({type(e).__name__}: {e})') from None
  if pixels.ndim != 2 or not pixels.size:
    raise ImageReadError(f'unexpected decoded shape {pixels.shape}')
  return pixels, note


def read_csv_rows(path: str, problems: list[str]
                  ) -> list[tuple[int, list[str]]]:
  """(line, cells) of every non-blank row of a CSV, its header first;
  [] with the reason in `problems` for a file that cannot be read."""
  name = os.path.basename(path)
  if not os.path.isfile(path):
    problems.append(f'{name}: file is missing')
    return []
  line = 0
  try:
    with open(path, newline='', encoding='utf-8-sig') as f:
      reader = csv.reader(f)
      rows = []
      for row in reader:
        line = reader.line_num
        if any(cell.strip() for cell in row):
          rows.append((line, row))
  except UnicodeDecodeError as e:
    problems.append(f'{name}: not a UTF-8 text CSV (byte {e.start} cannot '
                    'be decoded)')
    return []
  except csv.Error as e:
    problems.append(f'{name} line {line + 1}: malformed CSV ({e})')
    return []
  except OSError as e:
    problems.append(f'{name}: {_os_error_reason(path, e)}')
    return []
  if not rows:
    problems.append(f'{name}: file is empty')
    return []
  return rows


def _read_csv(path: str, columns: int, problems: list[str]) -> list[list[str]]:
  """Reads CSV rows after the header, recording malformed rows."""
  name = os.path.basename(path)
  rows = read_csv_rows(path, problems)
  if not rows:
    return []
  good = []
  for line, row in rows[1:]:
    if len(row) < columns:
      problems.append(f'{name} line {line}: expected {columns} columns, '
                      f'got {len(row)}')
    else:
      good.append([cell.strip() for cell in row[:columns]])
  return good


def positive_number(text: str, what: str) -> float:
  """A CSV cell as a finite positive number (ValueError saying what it is
  and why not, e.g. "pixel size (mm) 'abc' is not a number")."""
  try:
    value = float(text)
  except ValueError:
    raise ValueError(f'{what} {text!r} is not a number') from None
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f'{what} {text!r} is not a positive number')
  return value


def fit_outline(annotation: np.ndarray, image_shape, pixel_size_mm: float,
                hc_mm: float) -> ellipse_lib.Ellipse:
  """The reference ellipse of an annotation outline, checked against its
  scan: the same size (`image_shape`, None: unknown) and the CSV's HC within
  MAX_HC_DISAGREEMENT_MM (not checked when either is NaN).

  Raises:
    ValueError: saying what is wrong.
  """
  if image_shape is not None and annotation.shape != image_shape:
    raise ValueError(f'size {annotation.shape[::-1]} differs from the '
                     f'image\'s {image_shape[::-1]}')
  fitted = ellipse_lib.fit_annotation(annotation)
  gap = abs(fitted.perimeter_px * pixel_size_mm - hc_mm)
  if gap > MAX_HC_DISAGREEMENT_MM:  # False when either is NaN.
    raise ValueError(
        f'fitted ellipse gives HC {fitted.perimeter_px * pixel_size_mm:.2f}'
        f' mm, the CSV says {hc_mm:.2f} mm')
  return fitted


def _read_row(row: list[str], where: str, image_dir: str, on_disk: bool,
              labelled: bool) -> tuple[Record | None, list[str]]:
  """Reads and checks one CSV row's image (and annotation, if `labelled`).

  Returns:
    (the record, []) for a usable row, else (None, what is wrong with it).
  """
  filename = row[0]
  errors = []
  try:
    subject_id, frame = folds.parse_filename(filename)
  except ValueError as e:
    errors.append(str(e))
    subject_id = frame = -1
  pixel_size_mm = hc_mm = math.nan
  try:
    pixel_size_mm = positive_number(row[1], 'pixel size (mm)')
  except ValueError as e:
    errors.append(str(e))
  if labelled:
    try:
      hc_mm = positive_number(row[2], 'head circumference (mm)')
    except ValueError as e:
      errors.append(str(e))
  image_path = os.path.join(image_dir, filename)
  image_shape = None
  if not on_disk:
    errors.append('listed in the CSV but the image is missing')
  else:
    try:
      image, note = read_grayscale(image_path)
      image_shape = image.shape
      if note:
        warnings.warn(f'{where}: {note}', stacklevel=3)
    except ValueError as e:
      errors.append(str(e))
  fitted = None
  annotation_name = filename[:-len('.png')] + ANNOTATION_SUFFIX
  # A bare HC18 name (no path escapes); without its annotation file the
  # record has no ellipse, for models trained from HC values alone.
  if labelled and subject_id >= 0 and os.path.lexists(
      os.path.join(image_dir, annotation_name)):
    try:
      annotation, _ = read_grayscale(os.path.join(image_dir, annotation_name))
      fitted = fit_outline(annotation, image_shape, pixel_size_mm, hc_mm)
    except ValueError as e:
      errors.append(f'annotation {annotation_name}: {e}')
  if errors:
    return None, errors
  return Record(filename=filename, image_path=image_path,
                subject_id=subject_id, frame=frame,
                pixel_size_mm=pixel_size_mm, hc_mm=hc_mm,
                ellipse=fitted), []


def scan_split(root: str, split: str, *, image_dir: str | None = None
               ) -> tuple[list[Record], list[str]]:
  """Reads and checks one split of an HC18 directory.

  Every image is decoded and every annotation fitted, so a returned record is
  known to be usable.

  Args:
    root: the directory holding the CSVs (and the image folders).
    split: 'train' or 'test'.
    image_dir: where the split's PNGs are, when not `root/<split folder>`
      (an extracted Zenodo zip).

  Returns:
    (records sorted by filename, problems): each problem is one line naming the
    file and what is wrong with it. Records are returned only for good files.
  """
  folder, csv_name = SPLITS[split]
  image_dir = image_dir or os.path.join(root, folder)
  labelled = split == 'train'
  problems = []
  rows = _read_csv(os.path.join(root, csv_name), 3 if labelled else 2,
                   problems)
  if not os.path.isdir(image_dir):
    problems.append(f'{folder}/: directory is missing')
    return [], problems

  try:
    listing = os.listdir(image_dir)
  except OSError as e:
    problems.append(f'{folder}/: {_os_error_reason(image_dir, e)}')
    return [], problems
  on_disk = {name for name in listing
             if name.lower().endswith('.png')
             and not name.endswith(ANNOTATION_SUFFIX)}
  seen = set()
  records = []
  for row in rows:
    filename = row[0]
    where = f'{folder}/{filename}'
    if filename in seen:
      problems.append(f'{where}: duplicated filename in {csv_name}')
      continue
    seen.add(filename)
    record, errors = _read_row(row, where, image_dir, filename in on_disk,
                               labelled)
    if errors:
      problems.append(f'{where}: ' + '; '.join(errors))
      continue
    records.append(record)
  for filename in sorted(on_disk - seen):
    problems.append(f'{folder}/{filename}: image has no row in {csv_name}')
  records.sort(key=lambda r: r.filename)
  return records, problems


def scan(root: str) -> dict[str, list[Record]]:
  """Reads and checks both splits of an HC18 directory.

  Args:
    root: a directory in the Zenodo layout.

  Returns:
    {'train': records, 'test': records}.

  Raises:
    HC18Error: listing every bad file, when any is found.
  """
  if not os.path.isdir(root):
    raise HC18Error(root, ['directory does not exist'])
  out, problems = {}, []
  for split in SPLITS:
    out[split], split_problems = scan_split(root, split)
    problems += split_problems
  if problems:
    raise HC18Error(root, problems)
  return out


def default_dir() -> str | None:
  """Where HC18 is on this machine: $HC18_DIR, else ../shared/hc18 beside the
  checkout, else None."""
  candidates = [
      os.environ.get('HC18_DIR'),
      os.path.join(os.path.dirname(__file__), '..', '..', '..', 'shared',
                   'hc18')
  ]
  for path in candidates:
    if path and os.path.isfile(
        os.path.join(path, 'training_set_pixel_size_and_HC.csv')):
      return os.path.abspath(path)
  return None
