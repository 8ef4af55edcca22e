"""Tests for reading, checking and building HC18 (hc_jax.data.hc18, hc_jax.data.hc18_tfds)."""

import csv
import errno
import math
import os
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from hc_jax.data import ellipse
from hc_jax.data import hc18
from hc_jax.data import hc18_tfds
from hc_jax.data import phantom as phantom_lib
from hc_jax.data import phantom_set

TRAIN_CSV = 'training_set_pixel_size_and_HC.csv'
TEST_CSV = 'test_set_pixel_size.csv'
REAL_HC18 = hc18.default_dir()


@pytest.fixture(scope='module')
def phantom_source(tmp_path_factory):
  root = tmp_path_factory.mktemp('phantom') / 'hc18'
  summary = phantom_set.write_hc18(str(root), num_train=12, num_test=4, seed=3)
  return root, summary


@pytest.fixture
def phantom(phantom_source, tmp_path):
  """A fresh, writable copy of a small phantom HC18 directory."""
  source, summary = phantom_source
  root = tmp_path / 'hc18'
  shutil.copytree(source, root)
  return root, summary


def _rows(root, name=TRAIN_CSV):
  with open(root / name, newline='') as f:
    return list(csv.reader(f))


def _write_rows(root, rows, name=TRAIN_CSV):
  with open(root / name, 'w', newline='') as f:
    csv.writer(f).writerows(rows)


def _problems(root):
  with pytest.raises(hc18.HC18Error) as info:
    hc18.scan(str(root))
  return info.value.problems


def test_fit_ellipse_recovers_drawn_ellipse():
  outline = phantom_lib.draw_ellipse_outline(540, 800, 400.3, 270.8, 180.0,
                                             120.0, 0.6)
  fitted = ellipse.fit_annotation(outline)
  assert fitted.center_x == pytest.approx(400.3, abs=0.5)
  assert fitted.center_y == pytest.approx(270.8, abs=0.5)
  assert fitted.semi_axis_a == pytest.approx(180.0, abs=0.5)
  assert fitted.semi_axis_b == pytest.approx(120.0, abs=0.5)
  assert fitted.angle_rad == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize('points', [
    np.zeros((0, 2)),
    np.stack([np.arange(50.0), 2 * np.arange(50.0)], 1),  # A line.
    np.ones((20, 2)),
])
def test_fit_ellipse_rejects_non_ellipses(points):
  with pytest.raises(ValueError):
    ellipse.fit_ellipse(points[:, 0], points[:, 1])


def test_scan_phantom_matches_truth(phantom):
  root, summary = phantom
  records = hc18.scan(str(root))
  assert len(records['train']) == 12 and len(records['test']) == 4
  truth = {t['filename']: t for t in summary['train']}
  for record in records['train']:
    expected = truth[record.filename]
    assert record.hc_mm == pytest.approx(expected['hc_mm'])
    assert record.ellipse.semi_axis_a == pytest.approx(
        expected['semi_axis_a'], abs=1.0)
    assert record.ellipse.perimeter_px * record.pixel_size_mm == pytest.approx(
        record.hc_mm, abs=0.1)
    assert (record.subject_id, record.frame) == hc18.folds.parse_filename(
        record.filename)
  assert all(math.isnan(r.hc_mm) and r.ellipse is None
             for r in records['test'])


# --- Bad input: each case is reported with the file it concerns. ---


def test_csv_row_without_image(phantom):
  root, _ = phantom
  name = _rows(root)[1][0]
  os.remove(root / 'training_set' / name)
  assert any(name in p and 'image is missing' in p for p in _problems(root))


def test_image_without_csv_row(phantom):
  root, _ = phantom
  shutil.copy(root / 'test_set' / _rows(root, TEST_CSV)[1][0],
              root / 'training_set' / '999_HC.png')
  assert any('999_HC.png' in p and 'no row' in p for p in _problems(root))


def test_corrupt_and_truncated_png(phantom):
  root, _ = phantom
  corrupt, truncated = _rows(root)[1][0], _rows(root)[2][0]
  (root / 'training_set' / corrupt).write_bytes(b'not a png at all')
  data = (root / 'training_set' / truncated).read_bytes()
  (root / 'training_set' / truncated).write_bytes(data[:len(data) // 2])
  problems = _problems(root)
  assert any(corrupt in p and 'corrupt' in p for p in problems)
  assert any(truncated in p and 'corrupt or truncated' in p for p in problems)


def test_rgb_image_is_converted_with_a_warning(phantom):
  root, _ = phantom
  name = _rows(root)[1][0]
  path = root / 'training_set' / name
  gray = np.asarray(Image.open(path))
  Image.open(path).convert('RGB').save(path)
  with pytest.warns(UserWarning, match=name):
    records = hc18.scan(str(root))
  assert len(records['train']) == 12
  image, note = hc18.read_grayscale(str(path))
  assert 'RGB' in note and image.shape == gray.shape
  np.testing.assert_array_equal(image, gray)


def test_16_bit_image(phantom):
  root, _ = phantom
  name = _rows(root)[1][0]
  path = root / 'training_set' / name
  wide = np.asarray(Image.open(path)).astype(np.uint16) * 257
  Image.fromarray(wide).save(path)
  assert Image.open(path).mode.startswith('I')
  assert any(name in p and '16-bit' in p for p in _problems(root))


def test_blank_and_unfittable_annotation(phantom):
  root, _ = phantom
  blank, line = _rows(root)[1][0], _rows(root)[2][0]
  for name, draw in ((blank, False), (line, True)):
    path = root / 'training_set' / name.replace('.png', hc18.ANNOTATION_SUFFIX)
    annotation = np.zeros_like(np.asarray(Image.open(path)))
    if draw:
      annotation[100, 50:400] = 255
    Image.fromarray(annotation).save(path)
  problems = _problems(root)
  assert any(blank in p and 'blank' in p for p in problems)
  assert any(line in p and 'ellipse' in p for p in problems)


@pytest.mark.parametrize('pixel_size, message', [
    ('', 'not a number'), ('abc', 'not a number'), ('0', 'not a positive'),
    ('-0.1', 'not a positive'), ('nan', 'not a positive'),
])
def test_bad_pixel_size(phantom, pixel_size, message):
  root, _ = phantom
  rows = _rows(root)
  rows[3][1] = pixel_size
  _write_rows(root, rows)
  assert any(rows[3][0] in p and message in p for p in _problems(root))


def test_duplicated_filename(phantom):
  root, _ = phantom
  rows = _rows(root)
  _write_rows(root, rows + [rows[2]])
  assert any(rows[2][0] in p and 'duplicated' in p for p in _problems(root))


def test_annotation_disagreeing_with_csv(phantom):
  root, _ = phantom
  rows = _rows(root)
  rows[1][2] = str(float(rows[1][2]) * 1.5)
  _write_rows(root, rows)
  assert any(rows[1][0] in p and 'CSV says' in p for p in _problems(root))


def test_every_problem_is_listed_at_once(phantom):
  root, _ = phantom
  rows = _rows(root)
  os.remove(root / 'training_set' / rows[1][0])
  (root / 'training_set' / rows[2][0]).write_bytes(b'junk')
  rows[3][1] = 'x'
  _write_rows(root, rows)
  (root / 'test_set' / _rows(root, TEST_CSV)[1][0]).write_bytes(b'junk')
  problems = _problems(root)
  assert len(problems) == 4
  message = str(hc18.HC18Error(str(root), problems))
  assert '4 problem(s)' in message
  for name in (rows[1][0], rows[2][0], rows[3][0]):
    assert name in message


def test_missing_directory_and_csv(tmp_path):
  with pytest.raises(hc18.HC18Error, match='does not exist'):
    hc18.scan(str(tmp_path / 'nowhere'))
  (tmp_path / 'training_set').mkdir()
  problems = _problems(tmp_path)
  assert any(TRAIN_CSV in p and 'missing' in p for p in problems)


# --- The TFDS builder. ---


def test_tfds_build_phantom(phantom, tmp_path):
  root, summary = phantom
  builder = hc18_tfds.build(str(root), str(tmp_path / 'tfds'))
  assert builder.info.splits['train'].num_examples == 12
  assert builder.info.splits['test'].num_examples == 4
  truth = {t['filename']: t for t in summary['train']}
  for example in builder.as_dataset(split='train').as_numpy_iterator():
    expected = truth[example['filename'].decode()]
    assert example['image'].dtype == np.uint8
    assert example['image'].shape == (expected['height'], expected['width'], 1)
    assert example['hc_mm'] == pytest.approx(expected['hc_mm'], rel=1e-5)
    assert example['hc_px'] == pytest.approx(
        expected['hc_mm'] / example['pixel_size_mm'], rel=1e-4)
    assert example['ellipse']['semi_axis_a'] >= example['ellipse']['semi_axis_b']
  test = list(builder.as_dataset(split='test').as_numpy_iterator())
  assert all(np.isnan(t['hc_mm']) for t in test)


def test_tfds_build_from_zips(phantom, tmp_path):
  root, _ = phantom
  for folder in ('training_set', 'test_set'):
    with zipfile.ZipFile(root / f'{folder}.zip', 'w') as archive:
      for path in sorted((root / folder).iterdir()):
        archive.write(path, f'{folder}/{path.name}')
    shutil.rmtree(root / folder)
  builder = hc18_tfds.build(str(root), str(tmp_path / 'tfds'))
  assert builder.info.splits['train'].num_examples == 12


def test_tfds_bad_input_writes_nothing(phantom, tmp_path):
  root, _ = phantom
  (root / 'training_set' / _rows(root)[1][0]).write_bytes(b'junk')
  data_dir = tmp_path / 'tfds'
  with pytest.raises(hc18.HC18Error, match='corrupt'):
    hc18_tfds.build(str(root), str(data_dir))
  leftovers = [p for p in data_dir.rglob('*') if p.is_file()] if (
      data_dir.exists()) else []
  assert not leftovers, leftovers
  assert not hc18_tfds.Hc18(data_dir=str(data_dir)).is_prepared()


# --- The real copy, where present. ---


@pytest.mark.skipif(REAL_HC18 is None, reason='HC18 copy not found')
def test_real_hc18_ellipses_match_csv():
  records, problems = hc18.scan_split(REAL_HC18, 'train')
  assert not problems
  assert len(records) >= 100  # A subset of the 999 published images.
  gaps = [abs(r.ellipse.perimeter_px * r.pixel_size_mm - r.hc_mm)
          for r in records]
  print(f'{len(records)} images, largest |fitted HC - CSV HC| = '
        f'{max(gaps):.4f} mm')
  assert max(gaps) < 0.1


@pytest.mark.slow
@pytest.mark.skipif(REAL_HC18 is None, reason='HC18 copy not found')
def test_real_hc18_tfds_build(tmp_path):
  builder = hc18_tfds.build(REAL_HC18, str(tmp_path / 'tfds'))
  counts = {split: builder.info.splits[split].num_examples
            for split in ('train', 'test')}
  assert counts['train'] == len(hc18.scan_split(REAL_HC18, 'train')[0])
  assert counts['test'] == len(hc18.scan_split(REAL_HC18, 'test')[0])


# --- Files that are not what they seem: each named for what it is. ---


def test_read_grayscale_names_the_file_system_problem(tmp_path, monkeypatch):
  os.symlink('b.png', tmp_path / 'a.png')
  os.symlink('a.png', tmp_path / 'b.png')
  with pytest.raises(hc18.ImageReadError, match='symbolic link loop'):
    hc18.read_grayscale(str(tmp_path / 'a.png'))
  os.symlink('nowhere.png', tmp_path / 'dangling.png')
  with pytest.raises(hc18.ImageReadError, match='broken symbolic link'):
    hc18.read_grayscale(str(tmp_path / 'dangling.png'))
  with pytest.raises(hc18.ImageReadError, match='file is missing'):
    hc18.read_grayscale(str(tmp_path / 'gone.png'))
  with pytest.raises(hc18.ImageReadError, match='is a directory'):
    hc18.read_grayscale(str(tmp_path))
  Image.fromarray(np.zeros([4, 4], np.uint8)).save(tmp_path / 'locked.png')
  real_open = open

  def locked_open(file, *args, **kwargs):  # Tests may run as root.
    if str(file).endswith('locked.png'):
      raise PermissionError(errno.EACCES, 'Permission denied', str(file))
    return real_open(file, *args, **kwargs)
  monkeypatch.setattr('builtins.open', locked_open)
  with pytest.raises(hc18.ImageReadError, match='permission denied'):
    hc18.read_grayscale(str(tmp_path / 'locked.png'))


def test_read_grayscale_refuses_non_png(tmp_path):
  Image.fromarray(np.zeros([4, 4], np.uint8)).save(tmp_path / 'scan.bmp')
  with pytest.raises(hc18.ImageReadError, match='not a PNG'):
    hc18.read_grayscale(str(tmp_path / 'scan.bmp'))


def test_symlink_loop_in_a_split(phantom):
  root, _ = phantom
  name = _rows(root)[1][0]
  os.remove(root / 'training_set' / name)
  os.symlink(name, root / 'training_set' / name)  # Points at itself.
  assert any(name in p and 'symbolic link loop' in p for p in _problems(root))


@pytest.mark.parametrize('data, message', [
    (b'\x89PNG\r\n\x1a\n\xff\xfe\xfa', 'not a UTF-8 text CSV'),
    (b'filename,pixel size(mm),head circumference (mm)\n"' + b'x' * 200_000,
     'line 2: malformed CSV (field larger than field limit'),
])
def test_binary_or_malformed_csv_is_named(phantom, data, message):
  root, _ = phantom
  (root / TRAIN_CSV).write_bytes(data)
  problems = _problems(root)
  assert any(p.startswith(TRAIN_CSV) and message in p for p in problems), (
      problems)


# --- Downloads are checked against registered checksums. ---


def test_tfds_finds_the_registered_checksums():
  path = os.fspath(hc18_tfds.Hc18._checksums_path)  # pylint: disable=protected-access
  assert path == os.path.join(os.path.dirname(hc18.__file__), 'checksums.tsv')
  assert os.path.isfile(path)
  urls = {hc18.ZENODO_RECORD + name + '?download=1'
          for name in hc18.ZENODO_FILES}
  infos = hc18_tfds.Hc18.url_infos or {}
  assert set(infos) <= urls, set(infos) - urls
  for info in infos.values():
    assert len(info.checksum) == 64 and int(info.size) > 0


def test_download_without_registered_checksum_is_refused(tmp_path,
                                                         monkeypatch):
  """Validation is forced: an unregistered URL is never downloaded."""
  monkeypatch.setattr(hc18_tfds.Hc18, 'url_infos', {})
  with pytest.raises(ValueError, match='Missing checksums url: '
                     + hc18.ZENODO_RECORD.replace('.', r'\.')) as error:
    hc18_tfds.build(None, str(tmp_path / 'tfds'))
  message = str(error.value)
  assert '\n' not in message and 'checksums.tsv' in message


def test_corrupted_download_is_rejected(tmp_path):
  """A file that differs from its registered size and sha256 is rejected
  with its URL, through the same checksums.tsv format and TFDS check."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.core.download import download_manager  # pylint: disable=import-outside-toplevel
  name = 'test_set_pixel_size.csv'
  url = hc18.ZENODO_RECORD + name + '?download=1'
  good = b'filename,pixel size(mm)\n000_HC.png,0.1\n'
  checksums = tmp_path / 'checksums.tsv'
  checksums.write_text(f'# A registered file.\n{url}\t{len(good)}\t'
                       f'{hashlib.sha256(good).hexdigest()}\t{name}\n')
  url_infos = tfds.core.download.checksums.load_url_infos(checksums)
  manual = tmp_path / 'manual'
  manual.mkdir()

  def fetch(data):
    (manual / name).write_bytes(data)
    manager = tfds.download.DownloadManager(
        download_dir=str(tmp_path / 'downloads'), manual_dir=str(manual),
        url_infos=url_infos, force_checksums_validation=True)
    return manager.download(url)

  assert os.path.basename(os.fspath(fetch(good))) == name
  with pytest.raises(download_manager.NonMatchingChecksumError,
                     match=r'test_set_pixel_size\.csv.*wrong checksum'):
    fetch(good.replace(b'0.1', b'0.2'))
