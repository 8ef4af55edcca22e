"""The scan files of `python -m hc_jax.predict`: scans and pixel sizes in.

`image_paths` turns `--images` (directories, files and glob patterns) into
{filename: path}, a filename being the path relative to the deepest
directory holding all of them, and says which files of the directories it
skipped and why. `read_scan` reads a PNG, JPEG, TIFF or BMP scan as 8-bit
grey. Pixel sizes come from an HC18-style CSV (`read_pixel_sizes`), given or
found beside an images directory (`find_pixel_size_csv`). `parallel_map`
reads and prepares scans on all cores. What predict writes is
`hc_jax.evaluation.output_files`.
"""

import concurrent.futures
import csv
import glob
import math
import os
import sys
from typing import Sequence
import warnings

from hc_jax import workdir as workdir_lib
from hc_jax.data import hc18

# What the command line writes beside a scan's name for its overlay; such
# files are never taken for scans.
OVERLAY_SUFFIX = '_prediction.png'
# Image files taken for scans, by extension (any case), and the PIL formats
# read (by content, whatever the extension says).
SCAN_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')
SCAN_FORMATS = ('PNG', 'JPEG', 'TIFF', 'BMP')
# The first cells of a pixel-size CSV's header (HC18's), lower case, spaces
# dropped.
PIXEL_SIZE_HEADER = ('filename', 'pixelsize(mm)')


def available_cores() -> int:
  """The cores this process may run on (its affinity, e.g. under taskset)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def parallel_map(fn, items) -> list:
  """[fn(item) or the exception it raised, ...], in order, over threads.

  PNG decoding (PIL) and the resize (TensorFlow) release the GIL, so reading
  and preparing scans on all cores is faster than one after another.
  """
  def call(item):
    try:
      return fn(item)
    except Exception as e:  # pylint: disable=broad-except  # Reported per item.
      return e
  items = list(items)
  if len(items) < 2:
    return [call(item) for item in items]
  workers = min(len(items), available_cores())
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(call, items))


def is_scan_name(name: str) -> bool:
  """Whether a file name is a scan's: a PNG, JPEG, TIFF or BMP, not an
  annotation or overlay."""
  return skip_reason(name) is None


def skip_reason(name: str, kinds: str = 'PNG, JPEG, TIFF or BMP'
                ) -> str | None:
  """Why a file of an `--images` directory is not taken for a scan (None:
  it is one); `kinds` names what is taken."""
  if name.endswith(hc18.ANNOTATION_SUFFIX):
    return 'an HC18 annotation mask, not a scan'
  if name.endswith(OVERLAY_SUFFIX):
    return 'an overlay hc_jax.predict wrote'
  if not name.lower().endswith(SCAN_EXTENSIONS):
    return f'not a {kinds} file (by its name)'
  return None


def read_scan(path: str) -> tuple:
  """A PNG, JPEG, TIFF or BMP scan as `hc18.read_grayscale` reads a PNG:
  ([H, W] uint8, a note on its conversion or None); colour to grey with a
  note, 16-bit and float images refused (`hc18.ImageReadError`)."""
  return hc18.read_grayscale(path, SCAN_FORMATS)


def image_paths(specs: Sequence[str], accept=None,
                kinds: str = 'PNG, JPEG, TIFF or BMP',
                skipped: list | None = None) -> dict[str, str]:
  """Files named by `--images`, keyed by their path relative to the deepest
  directory holding all of them.

  Args:
    specs: directories (searched recursively, in sorted order), files, or
      glob patterns (`scans/00[0-2]_HC.png`, for a pattern the shell left
      alone), each possibly a comma-separated list.
    accept: `path -> bool`, which files of a directory are scans (default:
      `is_scan_name` of the file's name).
    kinds: what `accept` takes, for the messages.
    skipped: a list to which each file of a directory that is not taken is
      appended as (path, why).

  Returns:
    {filename: path} in the order given.

  Raises:
    PredictError: when nothing is named, a named path does not exist (or a
      pattern matches nothing), or a directory holds no scans.
  """
  if accept is None:
    def accept(path):
      return is_scan_name(os.path.basename(path))
  paths, roots = [], []
  for spec in specs:
    for item in _expand(filter(None, (s.strip() for s in spec.split(',')))):
      if os.path.isdir(item):
        found = []
        for folder, subfolders, names in os.walk(item):
          subfolders.sort()
          for name in sorted(names):
            path = os.path.join(folder, name)
            if accept(path):
              found.append(path)
            elif skipped is not None:
              skipped.append((path, skip_reason(name, kinds) or
                              f'not a {kinds} file'))
        if not found:
          raise workdir_lib.PredictError(f'{item} holds no {kinds} scans')
        paths += found
        roots.append(os.path.abspath(item))
      elif not os.path.lexists(item):  # A usage error, not a CSV row.
        raise workdir_lib.PredictError(f'--images {item} does not exist')
      else:
        paths.append(item)
        roots.append(os.path.dirname(os.path.abspath(item)))
  if not paths:
    raise workdir_lib.PredictError('--images names no files')
  root = os.path.commonpath(roots)
  return {os.path.relpath(os.path.abspath(path), root): path for path in paths}


def skipped_lines(skipped: Sequence[tuple[str, str]]) -> list[str]:
  """'path: why' for each file `image_paths` skipped; HC18's annotation
  masks and predict's own overlays, skipped by design, one line for all of
  each ('N files like path: why')."""
  lines, by_design = [], {}
  for path, why in skipped:
    name = os.path.basename(path)
    if name.endswith((hc18.ANNOTATION_SUFFIX, OVERLAY_SUFFIX)):
      by_design.setdefault(why, []).append(path)
    else:
      lines.append(f'{path}: {why}')
  for why, paths in by_design.items():
    lines.append(f'{paths[0]}: {why}' if len(paths) == 1 else
                 f'{len(paths)} files like {paths[0]}: {why}')
  return lines


def _expand(items):
  """Each item, or the sorted paths a glob pattern of them matches (an item
  that exists is taken as it is, whatever its characters)."""
  for item in items:
    if os.path.lexists(item) or not any(c in item for c in '*?['):
      yield item
      continue
    matches = sorted(glob.glob(item))
    if not matches:
      raise workdir_lib.PredictError(f'--images {item} matches no files')
    yield from matches


def read_pixel_sizes(path: str) -> dict[str, float]:
  """{filename: pixel size in mm} from an HC18-style CSV.

  The first row is a header unless its second cell is a number; a header
  must start `filename,pixel size(mm)` (case and spaces aside), so that a
  CSV of other units or columns is not read as pixel sizes. A filename
  listed twice with the same size is accepted with a warning; with different
  sizes it is an error.

  Args:
    path: the CSV, `filename,pixel size(mm)[,...]`.

  Returns:
    Pixel sizes by filename (as written in the CSV, stripped).

  Raises:
    PredictError: for a missing or unreadable file, a malformed row, or
      contradictory duplicate rows; the message names the file and line.
  """
  if not os.path.isfile(path):
    raise workdir_lib.PredictError(f'pixel-size CSV {path} does not exist')
  rows, line = [], 0
  try:
    with open(path, newline='', encoding='utf-8-sig') as f:
      reader = csv.reader(f)
      for row in reader:
        line = reader.line_num
        if any(cell.strip() for cell in row):
          rows.append((line, row))
  except UnicodeDecodeError as e:
    raise workdir_lib.PredictError(
        f'pixel-size CSV {path} is not UTF-8 text (byte '
        f'{e.start} cannot be decoded)') from None
  except csv.Error as e:
    raise workdir_lib.PredictError(f'pixel-size CSV {path} line {line + 1}: '
                            f'malformed ({e})') from None
  except OSError as e:
    raise workdir_lib.PredictError(f'pixel-size CSV {path} cannot be read '
                            f'({e.strerror or e})') from None
  if rows and not _parses_as_number(rows[0][1][1:2]):
    line, header = rows.pop(0)
    if tuple(cell.strip().lower().replace(' ', '')
             for cell in header[:2]) != PIXEL_SIZE_HEADER:
      raise workdir_lib.PredictError(
          f'{path} line {line}: the header must start with filename,pixel '
          f'size(mm) (as HC18\'s), got {",".join(header)!r}')
  if not rows:
    raise workdir_lib.PredictError(f'pixel-size CSV {path} holds no rows')
  sizes, first_line = {}, {}
  for line, row in rows:
    filename = row[0].strip()
    try:
      size = float(row[1])
      if not filename or not math.isfinite(size) or size <= 0:
        raise ValueError
    except (IndexError, ValueError):
      raise workdir_lib.PredictError(
          f'{path} line {line}: expected filename,pixel size(mm) with a '
          f'positive size, got {",".join(row)!r}') from None
    if filename in sizes:
      if sizes[filename] != size:
        raise workdir_lib.PredictError(
            f'{path} line {line}: {filename} has pixel size {size:g} mm, but '
            f'{sizes[filename]:g} mm on line {first_line[filename]}')
      warnings.warn(f'{path} line {line}: {filename} is listed again (same '
                    f'pixel size as on line {first_line[filename]})',
                    stacklevel=2)
      continue
    sizes[filename], first_line[filename] = size, line
  return sizes


def _parses_as_number(cells: Sequence[str]) -> bool:
  try:
    float(cells[0])
    return True
  except (IndexError, ValueError):
    return False


def find_pixel_size_csv(image_dir: str) -> str | None:
  """The HC18 CSV beside an images directory (`test_set/` ->
  `../test_set_pixel_size.csv`), or the only one there, or None."""
  parent, folder = os.path.split(os.path.abspath(image_dir))
  present = {split_folder: os.path.join(parent, csv_name)
             for split_folder, csv_name in hc18.SPLITS.values()
             if os.path.isfile(os.path.join(parent, csv_name))}
  if folder in present:
    return present[folder]
  return next(iter(present.values())) if len(present) == 1 else None


def pixel_sizes_of(files: dict[str, str], csv_path: str | None = None
                   ) -> dict[str, tuple]:
  """Each image's pixel size, and the CSV it was looked up in.

  Args:
    files: {filename: path} (`image_paths`).
    csv_path: a pixel-size CSV (a row matches by filename, else by base
      name), or None to use the HC18 CSV beside each images directory
      (matched by base name; which one is printed on stderr).

  Returns:
    {filename: (csv path or None, pixel size or None)} for every image.

  Raises:
    PredictError: for a bad CSV (`read_pixel_sizes`).
  """
  if csv_path:
    sizes = read_pixel_sizes(csv_path)
    return {name: (csv_path, sizes.get(name, sizes.get(
        os.path.basename(name)))) for name in files}
  tables = {}
  for image_dir in dict.fromkeys(os.path.dirname(p) for p in files.values()):
    found = find_pixel_size_csv(image_dir or '.')
    tables[image_dir] = (found, read_pixel_sizes(found) if found else {})
    print(f'pixel sizes for {image_dir or "."}/: '
          f'{found or "none found, HC in px only"}', file=sys.stderr)
  out = {}
  for name, path in files.items():
    csv_path, sizes = tables[os.path.dirname(path)]
    out[name] = (csv_path, sizes.get(os.path.basename(path)))
  return out
