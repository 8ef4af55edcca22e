"""Property tests of the readers of untrusted files (hypothesis).

The image reader (`hc18.read_grayscale`), the pixel-size CSV parser
(`scan_files.read_pixel_sizes`) and the HC18 checker (`hc18.scan_split`) either
read a file correctly or raise their module's own error with a message: never
another exception. The default runs are small; `-m slow` runs the long ones.
"""

import io
import os
import tempfile
import warnings

from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
from PIL import Image
import pytest

from hc_jax import workdir as workdir_lib
from hc_jax.data import hc18
from hc_jax.evaluation import scan_files

FAST = settings(max_examples=50, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=1000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

MODES = ('L', 'LA', 'RGB', 'RGBA', 'I;16', 'P', '1')


def _png_bytes(mode: str, width: int, height: int, seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  if mode == 'I;16':
    image = Image.fromarray(rng.integers(0, 65536, (height, width),
                                         dtype=np.uint16))
  else:
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3),
                                         dtype=np.uint8), 'RGB')
    image = image.convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  return buffer.getvalue()


pngs = st.builds(_png_bytes, st.sampled_from(MODES), st.integers(1, 40),
                 st.integers(1, 40), st.integers(0, 2**16))


@st.composite
def image_files(draw):
  """Bytes of a file that is meant to be a PNG: valid, cut, garbled or not."""
  kind = draw(st.sampled_from(('png', 'truncated', 'flipped', 'random')))
  if kind == 'random':
    return draw(st.binary(max_size=600))
  data = draw(pngs)
  if kind == 'truncated':
    return data[:draw(st.integers(0, len(data) - 1))]
  if kind == 'flipped':
    position = draw(st.integers(0, len(data) - 1))
    return (data[:position] + bytes([data[position] ^ draw(st.integers(1, 255))])
            + data[position + 1:])
  return data


def _check_read(data: bytes, mode_hint: str | None = None):
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'scan.png')
    with open(path, 'wb') as f:
      f.write(data)
    try:
      image, note = hc18.read_grayscale(path)
    except hc18.ImageReadError as e:
      assert str(e)
      return None
  assert image.dtype == np.uint8 and image.ndim == 2 and image.size
  assert note is None or 'converted to 8-bit grayscale' in note
  if mode_hint is not None:
    assert (note is None) == (mode_hint == 'L')
  return image


@FAST
@given(image_files())
def test_read_grayscale_reads_or_raises_its_error(data):
  _check_read(data)


@FAST
@given(st.sampled_from(MODES), st.integers(1, 60), st.integers(1, 60),
       st.integers(0, 2**16))
def test_read_grayscale_every_png_mode(mode, width, height, seed):
  image = _check_read(_png_bytes(mode, width, height, seed), mode)
  if mode == 'I;16':
    assert image is None  # 16-bit is refused, not squeezed into 8 bits.
  else:
    assert image is not None and image.shape == (height, width)


@pytest.mark.slow
@LONG
@given(image_files())
def test_read_grayscale_long(data):
  _check_read(data)


cells = st.text(alphabet=st.characters(blacklist_categories=('Cs',)),
                max_size=12)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(['0', '-1', '0.1', '1e-3', 'nan', 'inf', '', ' 0.2 ']))
rows = st.lists(st.one_of(st.lists(cells, max_size=4),
                          st.tuples(cells, numbers).map(list)), max_size=8)


@st.composite
def pixel_size_files(draw):
  if draw(st.booleans()):
    return draw(st.binary(max_size=300))
  lines = [','.join(row) for row in draw(rows)]
  if draw(st.booleans()):
    lines.insert(0, 'filename,pixel size(mm)')
  return '\n'.join(lines).encode('utf-8', 'surrogatepass')


def _check_pixel_sizes(data: bytes):
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'sizes.csv')
    with open(path, 'wb') as f:
      f.write(data)
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        sizes = scan_files.read_pixel_sizes(path)
    except workdir_lib.PredictError as e:
      assert path in str(e)
      return
  assert sizes
  for filename, size in sizes.items():
    assert isinstance(filename, str) and filename == filename.strip()
    assert np.isfinite(size) and size > 0


@FAST
@given(pixel_size_files())
def test_read_pixel_sizes_parses_or_raises_its_error(data):
  _check_pixel_sizes(data)


@pytest.mark.slow
@LONG
@given(pixel_size_files())
def test_read_pixel_sizes_long(data):
  _check_pixel_sizes(data)


@st.composite
def hc18_test_dirs(draw):
  """A test split: CSV text (or bytes) and a few files meant to be scans."""
  names = draw(st.lists(st.sampled_from(
      ['001_HC.png', '002_2HC.png', '003_HC.png', 'x.png', '../001_HC.png',
       '']), max_size=4))
  csv_rows = [f'{name},{draw(numbers)}' for name in names]
  csv_data = ('filename,pixel size(mm)\n' + '\n'.join(csv_rows)).encode()
  if draw(st.booleans()):
    csv_data = draw(st.binary(max_size=100))
  files = draw(st.dictionaries(
      st.sampled_from(['001_HC.png', '002_2HC.png', '004_HC.png']),
      image_files(), max_size=3))
  return csv_data, files


def _check_scan_split(case):
  csv_data, files = case
  with tempfile.TemporaryDirectory() as root:
    os.mkdir(os.path.join(root, 'test_set'))
    with open(os.path.join(root, 'test_set_pixel_size.csv'), 'wb') as f:
      f.write(csv_data)
    for name, data in files.items():
      with open(os.path.join(root, 'test_set', name), 'wb') as f:
        f.write(data)
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      records, problems = hc18.scan_split(root, 'test')
  assert all(isinstance(p, str) and p for p in problems)
  for record in records:
    assert record.filename in files
    assert np.isfinite(record.pixel_size_mm) and record.pixel_size_mm > 0
  # Every file on disk is either a record or named in a problem.
  named = {r.filename for r in records}
  for name in files:
    assert name in named or any(name in p for p in problems)


@FAST
@given(hc18_test_dirs())
def test_scan_split_reports_or_reads(case):
  _check_scan_split(case)


@pytest.mark.slow
@LONG
@given(hc18_test_dirs())
def test_scan_split_long(case):
  _check_scan_split(case)
