"""What `python -m hc_jax.predict` writes, without losing a file the user
owns: CSVs, the HC18 submission and overlays.

`write_csv` writes a CSV atomically (nothing is left behind when it fails)
and refuses to replace one another process wrote meanwhile (`file_state`);
`check_writable`, `check_folder` and `check_not_theirs` refuse, before
anything is read, an output that cannot be written or that would replace an
input scan or a file predict did not write. `write_overlay` draws a scan
with its prediction, and `write_submission` writes the HC18 challenge's CSV
(where its conventions and the evidence for them are written down).
"""

import contextlib
import csv
import fcntl
import os
from typing import Sequence

import numpy as np

from hc_jax import leftovers
from hc_jax import workdir as workdir_lib

# The HC18 challenge's submission CSV (`write_submission`).
SUBMISSION_COLUMNS = ('filename', 'center_x_mm', 'center_y_mm',
                      'semi_axes_a_mm', 'semi_axes_b_mm', 'angle_rad')
# The first cells of predict's CSV: a file starting so is one it wrote.
PREDICTIONS_HEADER = 'filename,pixel_size_mm'


def check_writable(path: str, what: str) -> None:
  """Raises PredictError unless a file can be created in `path`'s folder."""
  if os.path.isdir(path):
    raise workdir_lib.PredictError(
        f'{what} {path} is a directory; give a file name')
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
    leftovers.remove_stale(folder, '.hc_jax_probe')
    probe = leftovers.tmp_name(os.path.join(folder, '.hc_jax_probe'))
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    os.remove(probe)
  except OSError as e:
    raise workdir_lib.PredictError(f'{what} {path} cannot be written '
                            f'({e.strerror or e})') from None


def file_state(path: str) -> tuple[int, int, int] | None:
  """(inode, size, mtime in ns) of a file, None where there is none: what
  `write_csv` compares to see that no one else wrote it meanwhile."""
  try:
    stat = os.stat(path)
  except OSError:
    return None
  return stat.st_ino, stat.st_size, stat.st_mtime_ns


@contextlib.contextmanager
def _folder_lock(folder: str):
  """Serialises the processes of this host replacing files in `folder`
  (best effort: a file system without flock is not serialised)."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    yield
    return
  try:
    with contextlib.suppress(OSError):
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def write_csv(path: str, columns: Sequence[str], rows: Sequence[dict],
              what: str, unchanged_since=False) -> None:
  """Writes rows (dicts keyed by `columns`) as a CSV, atomically.

  It is written under a temporary name carrying this process's pid
  (`leftovers.tmp_name`), then renamed; such files that killed processes
  left beside it are removed first. The CSV gets the permissions of a new
  file under the umask (0644 under 022), as `open` would give it.

  Args:
    path: the CSV to write.
    columns: its header.
    rows: one dict per row.
    what: the flag that named `path`, for messages.
    unchanged_since: `file_state(path)` when this process started (None:
      there was no file), to refuse replacing what another process wrote
      meanwhile; False: not checked.

  Raises:
    PredictError: when it cannot be written, or `path` changed since
      `unchanged_since`; nothing is left behind.
  """
  check_writable(path, what)
  folder = os.path.dirname(os.path.abspath(path))
  leftovers.remove_stale(folder, '.' + os.path.basename(path))
  tmp = leftovers.tmp_name(os.path.abspath(path), hidden=True)
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    with os.fdopen(fd, 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=columns)
      writer.writeheader()
      writer.writerows(rows)
    with _folder_lock(folder):
      if unchanged_since is not False and (
          file_state(path) != unchanged_since):
        os.remove(tmp)
        raise workdir_lib.PredictError(
            f'{what} {path} was written by another process while this one '
            'ran (another hc_jax.predict?); not overwritten: run again, or '
            f'give another {what}')
      os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise workdir_lib.PredictError(f'{what} {path} cannot be written '
                            f'({e.strerror or e})') from None


def check_folder(folder: str, flag: str, probe: str = 'probe') -> None:
  """Raises PredictError unless files (such as `probe`) can be written in
  `folder` (made if missing)."""
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise workdir_lib.PredictError(
        f'{flag} {folder} cannot be created ({e.strerror or e})') from None
  check_writable(os.path.join(folder, probe), flag)


def check_not_theirs(path: str, flag: str, header: str,
                     workdir: str | None = None) -> None:
  """Refuses to replace a file predict did not write: `path` may be new, or
  an earlier output of the same kind (its first line starts with `header`),
  never a file of the run directory `workdir` or anything else.

  Raises:
    PredictError: naming `flag`, when `path` is not to be replaced.
  """
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
  if workdir and os.path.realpath(path).startswith(
      os.path.realpath(workdir) + os.sep):
    raise workdir_lib.PredictError(
        f'{flag} {path} is a file of the run directory '
        f'{workdir}; not overwritten (give a new name)')
  raise workdir_lib.PredictError(
      f'{flag} {path} exists and is not a file hc_jax.predict '
      'wrote; not overwritten (give a new name)')


def check_outputs(outputs: dict[str, str | None], files: dict[str, str],
                  workdir: str | None = None) -> dict[str, tuple | None]:
  """Refuses outputs that would replace an input scan or a file predict did
  not write, and says what they are now.

  Args:
    outputs: {'--out': the predictions CSV, '--submission': the submission
      CSV or None}.
    files: the input scans, {filename: path}.
    workdir: the run directory predicting, whose files are never replaced.

  Returns:
    {flag: `file_state` of its file} of the outputs given, for `write_csv`'s
    `unchanged_since`: a predict that finishes first is not overwritten.

  Raises:
    PredictError: naming the flag, for an output not to be replaced.
  """
  inputs = {os.path.realpath(path) for path in files.values()}
  headers = {'--out': PREDICTIONS_HEADER,
             '--submission': ','.join(SUBMISSION_COLUMNS[:2])}
  for flag, target in outputs.items():
    if target and os.path.realpath(target) in inputs:
      raise workdir_lib.PredictError(
          f'{flag} {target} is one of the input scans; '
          'not overwritten')
  states = {}
  for flag, target in outputs.items():
    if target:
      check_not_theirs(target, flag, headers[flag], workdir)
      states[flag] = file_state(target)
  return states


def ellipse_points(ellipse: Sequence[float], num_points: int = 360
                   ) -> np.ndarray:
  """`[num_points, 2]` (x, y) on an ellipse `[cx, cy, a, b, angle]`."""
  center_x, center_y, a, b, angle = (float(v) for v in ellipse)
  t = np.linspace(0, 2 * np.pi, num_points, endpoint=False)
  cos, sin = np.cos(angle), np.sin(angle)
  return np.stack([center_x + a * np.cos(t) * cos - b * np.sin(t) * sin,
                   center_y + a * np.cos(t) * sin + b * np.sin(t) * cos], 1)


def write_overlay(image: np.ndarray, lines: Sequence[str], path: str,
                  ellipse: Sequence[float] | None = None,
                  outline: np.ndarray | None = None) -> None:
  """Writes the scan as RGB with `lines` of text in its top-left corner.

  Args:
    image: [H, W] uint8 scan.
    lines: the text.
    path: the PNG to write.
    ellipse: `[cx, cy, a, b, angle]` in the scan's pixels, drawn as an
      outline (green), or None.
    outline: `[K, 2]` (x, y) points of a head mask's outline in the scan's
      pixels, drawn as red dots, or None.
  """
  # pylint: disable=import-outside-toplevel
  from PIL import Image, ImageDraw, ImageFont
  canvas = Image.fromarray(image).convert('RGB')
  draw = ImageDraw.Draw(canvas)
  if outline is not None:
    radius = max(1, image.shape[0] // 300)
    for x, y in np.asarray(outline, np.float64).reshape(-1, 2):
      draw.ellipse((x - radius, y - radius, x + radius, y + radius),
                   fill=(255, 40, 40))
  if ellipse is not None and np.all(np.isfinite(ellipse)):
    points = [tuple(p) for p in ellipse_points(ellipse)]
    draw.line(points + points[:1], fill=(0, 255, 0),
              width=max(1, image.shape[0] // 270), joint='curve')
  font = ImageFont.load_default(size=max(10, image.shape[0] // 27))
  text = '\n'.join(lines)
  box = draw.multiline_textbbox((8, 8), text, font=font)
  draw.rectangle((box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4), fill='black')
  draw.multiline_text((8, 8), text, font=font, fill=(255, 220, 0))
  canvas.save(path)


def some_names(names: Sequence[str]) -> str:
  """'a.png' or 'a.png and 3 more'."""
  more = f' and {len(names) - 1} more' if len(names) > 1 else ''
  return f'{names[0]}{more}'


def check_submission_inputs(files: dict[str, str],
                            pixel_sizes: dict[str, tuple]) -> None:
  """Raises PredictError unless every image has a pixel size and its own
  base name (the submission's filename)."""
  unknown = [name for name in files if pixel_sizes[name][1] is None]
  if unknown:
    raise workdir_lib.PredictError(
        f'--submission needs the pixel size of every image; none for '
        f'{some_names(unknown)} (give --pixel-sizes=CSV)')
  seen = {}
  for name in files:
    base = os.path.basename(name)
    if base in seen:
      raise workdir_lib.PredictError(f'--submission needs distinct file names; '
                              f'{seen[base]} and {name} are both {base}')
    seen[base] = name


def write_submission(path: str, ellipses_mm: dict[str, Sequence[float]],
                     unchanged_since=False) -> None:
  """Writes the HC18 challenge's submission CSV, atomically.

  The header is `SUBMISSION_COLUMNS`; one row per image, its file's base
  name (`000_HC.png`), the ellipse in mm, the angle in radians.

  Our ellipse maps onto the challenge's columns unchanged: center_x_mm =
  center_x (the column) x pixel size, center_y_mm = center_y (the row) x
  pixel size, semi_axes_a_mm = a x pixel size (a >= b, the axis along the
  angle), semi_axes_b_mm = b x pixel size, angle_rad = our angle (from +x
  towards +y, in [0, pi)). Evidence: public HC18 entries fit OpenCV's
  `fitEllipse` to `np.argwhere(mask)` points (row, column pairs) and write
  center_x_mm from OpenCV's second coordinate, center_y_mm from its first,
  semi_axes_a_mm from its second axis, semi_axes_b_mm from its first and
  angle_rad = (-angle_deg * pi / 180) mod pi. Done on all 900 training
  annotations of the HC18 copy this was checked on, that recipe gives
  `hc_jax.data.ellipse.fit_annotation`'s ellipse (the one behind the published
  HC) exactly: the same centre (to 0.001 px), semi-axes (to 0.02 px, a >= b
  on every image) and angle (to 0.0001 rad on the 260 tilted, elongated
  ones), and its outline lies on the annotation's (0.39 px mean distance),
  while the opposite angle sense lies 6.4 px off. The leaderboard ranks the
  HC, which depends on the semi-axes alone; the centre and angle could only
  be checked against that recipe, not against the challenge's scorer.

  Args:
    path: the CSV to write.
    ellipses_mm: {filename: `[cx, cy, a, b, angle]` in mm (angle in rad)},
      in the order of the rows; the filenames' base names must differ.
    unchanged_since: as for `write_csv`.

  Raises:
    PredictError: when it cannot be written; nothing is left behind.
  """
  rows = [{'filename': os.path.basename(name),
           **{column: f'{float(value):.6f}' for column, value in
              zip(SUBMISSION_COLUMNS[1:], ellipse)}}
          for name, ellipse in ellipses_mm.items()]
  write_csv(path, SUBMISSION_COLUMNS, rows, '--submission', unchanged_since)
