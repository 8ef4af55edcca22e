"""The scans `python -m hc_jax.predict` is given, and their pixel sizes.

`image_paths` turns `--images` (directories and files) into {filename: path},
a filename being the path relative to the deepest directory holding all of
them. Pixel sizes come from an HC18-style CSV (`read_pixel_sizes`), given or
found beside an images directory (`find_pixel_size_csv`).
"""

import csv
import math
import os
from typing import Sequence
import warnings

from hc_jax import hc18
from hc_jax import runs

# What the command line writes beside a scan's name for its overlay; such
# files are never taken for scans.
OVERLAY_SUFFIX = '_prediction.png'


def is_scan_name(name: str) -> bool:
  """Whether a file name is a scan's: a PNG, not an annotation or overlay."""
  return (name.lower().endswith('.png')
          and not name.endswith(hc18.ANNOTATION_SUFFIX)
          and not name.endswith(OVERLAY_SUFFIX))


def image_paths(specs: Sequence[str]) -> dict[str, str]:
  """Files named by `--images`, keyed by their path relative to the deepest
  directory holding all of them.

  Args:
    specs: directories (searched recursively, in sorted order) or files, each
      possibly a comma-separated list.

  Returns:
    {filename: path} in the order given; a missing file is kept, to be
    reported.

  Raises:
    PredictError: when nothing is named, or a directory holds no PNG.
  """
  paths, roots = [], []
  for spec in specs:
    for item in filter(None, (s.strip() for s in spec.split(','))):
      if os.path.isdir(item):
        found = []
        for folder, subfolders, names in os.walk(item):
          subfolders.sort()
          found += [os.path.join(folder, n) for n in sorted(names)
                    if is_scan_name(n)]
        if not found:
          raise runs.PredictError(f'{item} holds no PNG scans')
        paths += found
        roots.append(os.path.abspath(item))
      else:
        paths.append(item)
        roots.append(os.path.dirname(os.path.abspath(item)))
  if not paths:
    raise runs.PredictError('--images names no files')
  root = os.path.commonpath(roots)
  return {os.path.relpath(os.path.abspath(path), root): path for path in paths}


def read_pixel_sizes(path: str) -> dict[str, float]:
  """{filename: pixel size in mm} from an HC18-style CSV.

  The first row is a header unless its second cell is a number. A filename
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
    raise runs.PredictError(f'pixel-size CSV {path} does not exist')
  rows, line = [], 0
  try:
    with open(path, newline='', encoding='utf-8-sig') as f:
      reader = csv.reader(f)
      for row in reader:
        line = reader.line_num
        if any(cell.strip() for cell in row):
          rows.append((line, row))
  except UnicodeDecodeError as e:
    raise runs.PredictError(f'pixel-size CSV {path} is not UTF-8 text (byte '
                            f'{e.start} cannot be decoded)') from None
  except csv.Error as e:
    raise runs.PredictError(f'pixel-size CSV {path} line {line + 1}: '
                            f'malformed ({e})') from None
  except OSError as e:
    raise runs.PredictError(f'pixel-size CSV {path} cannot be read '
                            f'({e.strerror or e})') from None
  if rows and not _parses_as_number(rows[0][1][1:2]):
    rows = rows[1:]  # The header.
  if not rows:
    raise runs.PredictError(f'pixel-size CSV {path} holds no rows')
  sizes, first_line = {}, {}
  for line, row in rows:
    filename = row[0].strip()
    try:
      size = float(row[1])
      if not filename or not math.isfinite(size) or size <= 0:
        raise ValueError
    except (IndexError, ValueError):
      raise runs.PredictError(
          f'{path} line {line}: expected filename,pixel size(mm) with a '
          f'positive size, got {",".join(row)!r}') from None
    if filename in sizes:
      if sizes[filename] != size:
        raise runs.PredictError(
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
