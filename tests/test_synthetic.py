"""Tests for the phantom HC18 writer (hc_jax.data.phantom_set)."""

import csv
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from hc_jax.data import ellipse
from hc_jax.data import hc18
from hc_jax.data import phantom as phantom_lib
from hc_jax.data import phantom_set

NUM_TRAIN = 40
NUM_TEST = 6
REAL_HC18 = pathlib.Path(hc18.default_dir() or '/nonexistent/hc18')


@pytest.fixture(scope='module')
def phantom(tmp_path_factory):
  root = tmp_path_factory.mktemp('hc18')
  summary = phantom_set.write_hc18(root, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=3)
  return root, summary


def _read_csv(path):
  with open(path, newline='') as f:
    return list(csv.reader(f))


def _all_bytes(root):
  return {path.relative_to(root).as_posix(): path.read_bytes()
          for path in sorted(pathlib.Path(root).rglob('*')) if path.is_file()}


def _neighbour_counts(mask):
  """Number of 8-neighbours of each pixel that are set in `mask`."""
  kernel = np.ones((3, 3), dtype=np.int32)
  kernel[1, 1] = 0
  return ndimage.convolve(mask.astype(np.int32), kernel, mode='constant')


def test_ramanujan_perimeter_of_circle_is_two_pi_r():
  radii = np.array([1.0, 10.0, 123.4])
  np.testing.assert_allclose(ellipse.ramanujan_perimeter(radii, radii), 2 * np.pi * radii)
  assert float(ellipse.ramanujan_perimeter(5.0, 5.0)) == pytest.approx(10 * np.pi)


def test_ramanujan_perimeter_of_ellipse():
  # Exact perimeter of a=2, b=1 is 9.688448...; Ramanujan is accurate to ~1e-5 here.
  assert float(ellipse.ramanujan_perimeter(2.0, 1.0)) == pytest.approx(9.688448, abs=1e-4)
  assert float(ellipse.ramanujan_perimeter(1.0, 2.0)) == pytest.approx(9.688448, abs=1e-4)


@pytest.mark.parametrize('seed', range(40))
def test_outline_is_closed_and_one_pixel_wide(seed):
  rng = np.random.default_rng(seed)
  a = rng.uniform(20.0, 250.0)
  b = a * rng.uniform(0.5, 1.0)
  angle_rad = rng.uniform(0.0, np.pi)
  center_x, center_y = 400 + rng.uniform(-5, 5), 270 + rng.uniform(-5, 5)
  outline = phantom_lib.draw_ellipse_outline(540, 800, center_x, center_y, a, b, angle_rad)
  assert outline.dtype == np.uint8 and outline.shape == (540, 800)
  assert set(np.unique(outline)) == {0, 255}
  on_outline = outline > 0
  # Thin and closed: every outline pixel has exactly two 8-neighbours on it...
  assert np.all(_neighbour_counts(on_outline)[on_outline] == 2)
  _, num_curves = ndimage.label(on_outline, structure=np.ones((3, 3)))
  assert num_curves == 1
  # ...and it separates the inside from the outside (4-connected background).
  _, num_regions = ndimage.label(~on_outline)
  assert num_regions == 2
  # An 8-connected digital curve has 0.71..1 pixel per unit of length.
  ratio = on_outline.sum() / ellipse.ramanujan_perimeter(a, b)
  assert 0.8 < ratio <= 1.0
  # The outline lies on the ellipse.
  rows, cols = np.nonzero(on_outline)
  distance, _, _ = phantom_lib.ellipse_distance_px(
      rows.astype(np.float32), cols.astype(np.float32), center_x, center_y, a, b, angle_rad)
  assert np.abs(distance).max() < 1.0


def test_outline_angle_is_in_image_coordinates():
  # a along +x rotated by pi/2 points along +y (down the rows).
  outline = phantom_lib.draw_ellipse_outline(200, 200, 100, 100, 80, 20, np.pi / 2)
  rows, cols = np.nonzero(outline)
  assert rows.max() - rows.min() == 160
  assert cols.max() - cols.min() == 40


def test_layout_and_csv_headers_match_real_format(phantom):
  root, summary = phantom
  train_rows = _read_csv(root / 'training_set_pixel_size_and_HC.csv')
  test_rows = _read_csv(root / 'test_set_pixel_size.csv')
  assert train_rows[0] == ['filename', 'pixel size(mm)', 'head circumference (mm)']
  assert test_rows[0] == ['filename', 'pixel size(mm)']
  if REAL_HC18.exists():
    assert train_rows[0] == _read_csv(REAL_HC18 / 'training_set_pixel_size_and_HC.csv')[0]
    assert test_rows[0] == _read_csv(REAL_HC18 / 'test_set_pixel_size.csv')[0]

  train_names = [row[0] for row in train_rows[1:]]
  test_names = [row[0] for row in test_rows[1:]]
  assert len(train_names) == NUM_TRAIN and len(test_names) == NUM_TEST
  assert train_names == sorted(train_names)
  for name in train_names + test_names:
    assert re.fullmatch(r'\d{3}_([23])?HC\.png', name), name
  assert all(name.endswith('_HC.png') for name in test_names)
  assert [record['filename'] for record in summary['train']] == train_names
  assert [record['filename'] for record in summary['test']] == test_names

  expected_train = set(train_names) | {n.replace('.png', '_Annotation.png') for n in train_names}
  assert set(os.listdir(root / 'training_set')) == expected_train
  assert set(os.listdir(root / 'test_set')) == set(test_names)
  assert sorted(os.listdir(root)) == [
      'test_set', 'test_set_pixel_size.csv', 'training_set', 'training_set_pixel_size_and_HC.csv']


def test_some_subjects_have_several_frames(phantom):
  _, summary = phantom
  subjects = [record['subject_id'] for record in summary['train']]
  assert len(set(subjects)) < NUM_TRAIN
  for record in summary['train']:
    if '_2HC' in record['filename']:
      assert f"{record['subject_id']:03d}_HC.png" in [r['filename'] for r in summary['train']]


def test_images_are_8bit_grayscale_mostly_800x540(phantom):
  root, summary = phantom
  sizes = []
  for split, records in (('training_set', summary['train']), ('test_set', summary['test'])):
    for record in records:
      with Image.open(root / split / record['filename']) as image:
        assert image.format == 'PNG' and image.mode == 'L'
        assert image.size == (record['width'], record['height'])
        sizes.append(image.size)
        if split == 'training_set':
          annotation_path = root / split / record['filename'].replace('.png', '_Annotation.png')
          with Image.open(annotation_path) as annotation:
            assert annotation.mode == 'L' and annotation.size == image.size
  train_sizes = sizes[:NUM_TRAIN]
  num_off_size = sum(size != (800, 540) for size in train_sizes)
  assert 1 <= num_off_size <= NUM_TRAIN // 4
  for width, height in sizes:
    assert abs(width - 800) <= 25 and abs(height - 540) <= 10


def test_annotations_are_outlines_of_true_ellipses(phantom):
  root, summary = phantom
  for record in summary['train']:
    assert record['semi_axis_a'] >= record['semi_axis_b'] > 0
    assert 0.0 <= record['angle_rad'] < np.pi
    path = root / 'training_set' / record['filename'].replace('.png', '_Annotation.png')
    annotation = np.asarray(Image.open(path))
    assert set(np.unique(annotation)) == {0, 255}
    on_outline = annotation > 0
    perimeter_px = ellipse.ramanujan_perimeter(record['semi_axis_a'], record['semi_axis_b'])
    assert 0.8 * perimeter_px < on_outline.sum() <= perimeter_px
    assert np.all(_neighbour_counts(on_outline)[on_outline] == 2)
    # The whole head is in the image: the outline keeps off the border.
    rows, cols = np.nonzero(on_outline)
    assert rows.min() > 0 and cols.min() > 0
    assert rows.max() < annotation.shape[0] - 1 and cols.max() < annotation.shape[1] - 1


def test_skull_ring_is_bright_on_the_annotation(phantom):
  root, summary = phantom
  record = summary['train'][0]
  scan = np.asarray(Image.open(root / 'training_set' / record['filename']), dtype=np.float32)
  annotation = np.asarray(Image.open(
      root / 'training_set' / record['filename'].replace('.png', '_Annotation.png')))
  assert scan[annotation > 0].mean() > 3 * scan[annotation == 0].mean()


def test_csv_hc_is_ramanujan_perimeter_times_pixel_size(phantom):
  root, summary = phantom
  rows = _read_csv(root / 'training_set_pixel_size_and_HC.csv')[1:]
  for (filename, pixel_size_text, hc_text), record in zip(rows, summary['train']):
    assert filename == record['filename']
    pixel_size_mm, hc_mm = float(pixel_size_text), float(hc_text)
    assert 0.05 <= pixel_size_mm <= 0.25
    assert pixel_size_mm == record['pixel_size_mm'] and hc_mm == record['hc_mm']
    assert len(hc_text.partition('.')[2]) <= 2
    perimeter_px = ellipse.ramanujan_perimeter(record['semi_axis_a'], record['semi_axis_b'])
    assert hc_mm == pytest.approx(perimeter_px * pixel_size_mm, abs=0.005 + 1e-9)
  for (filename, pixel_size_text), record in zip(
      _read_csv(root / 'test_set_pixel_size.csv')[1:], summary['test']):
    assert filename == record['filename']
    assert float(pixel_size_text) == record['pixel_size_mm']
    assert 0.05 <= float(pixel_size_text) <= 0.25


def test_ellipses_span_the_requested_ranges(phantom):
  _, summary = phantom
  records = summary['train']
  semi_major = np.array([record['semi_axis_a'] for record in records])
  aspect = np.array([record['semi_axis_b'] / record['semi_axis_a'] for record in records])
  assert semi_major.min() >= 60 and semi_major.max() <= 250
  assert aspect.min() >= 0.65 and aspect.max() <= 1.0


def test_hc_rises_with_subject_number(phantom):
  _, summary = phantom
  subjects = np.array([record['subject_id'] for record in summary['train']])
  hc_mm = np.array([record['hc_mm'] for record in summary['train']])
  assert np.corrcoef(subjects, hc_mm)[0, 1] > 0.8
  # Contiguous halves of the subject range differ a lot in head size.
  first_half = subjects < np.median(subjects)
  assert hc_mm[~first_half].mean() > 1.5 * hc_mm[first_half].mean()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
  first = phantom_set.write_hc18(tmp_path / 'first', num_train=6, num_test=2, seed=7)
  second = phantom_set.write_hc18(tmp_path / 'second', num_train=6, num_test=2, seed=7)
  other = phantom_set.write_hc18(tmp_path / 'other', num_train=6, num_test=2, seed=8)
  assert first['train'] == second['train'] and first['test'] == second['test']
  first_bytes = _all_bytes(tmp_path / 'first')
  assert first_bytes == _all_bytes(tmp_path / 'second')
  other_bytes = _all_bytes(tmp_path / 'other')
  # File names may differ too (other subjects have several frames).
  for name in set(first_bytes) & set(other_bytes):
    if name.endswith('.png'):
      assert first_bytes[name] != other_bytes[name], name
  assert (first_bytes['training_set_pixel_size_and_HC.csv']
          != other_bytes['training_set_pixel_size_and_HC.csv'])


def test_cli_writes_directory_without_importing_tensorflow_or_jax(tmp_path):
  out = tmp_path / 'cli'
  script = (
      'import sys\n'
      'from hc_jax import synthetic\n'
      f'synthetic.main(["--out", {str(out)!r}, "--num_train", "3", "--num_test", "1",'
      ' "--seed", "1"])\n'
      'assert not {"tensorflow", "jax"} & set(sys.modules), sorted(sys.modules)\n')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stderr
  assert len(_read_csv(out / 'training_set_pixel_size_and_HC.csv')) == 4
  assert len(_read_csv(out / 'test_set_pixel_size.csv')) == 2
  result = subprocess.run([sys.executable, '-m', 'hc_jax.synthetic', '--help'],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0 and '--num_train' in result.stdout


def test_cli_writes_nothing_into_a_directory_holding_files(tmp_path, capsys):
  from hc_jax import synthetic as command  # pylint: disable=import-outside-toplevel
  used = tmp_path / 'used'
  used.mkdir()
  (used / 'training_set_pixel_size_and_HC.csv').write_text('mine\n')
  with pytest.raises(SystemExit) as info:
    command.main(['--out', str(used), '--num_train', '2', '--num_test', '1'])
  assert info.value.code == 2
  assert capsys.readouterr().err.startswith(
      f'error: --out {used} exists and is not an empty directory')
  assert os.listdir(used) == ['training_set_pixel_size_and_HC.csv']
  assert (used / 'training_set_pixel_size_and_HC.csv').read_text() == 'mine\n'
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert command.main(['--out', str(empty), '--num_train', '2',
                       '--num_test', '1']) == 0
  assert 'Wrote 2 training images' in capsys.readouterr().out
