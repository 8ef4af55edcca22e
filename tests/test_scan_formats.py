"""Scans as clinics export them, through `python -m hc_jax.predict`: JPEG,
TIFF and BMP read as PNGs are, the files of a folder that were skipped named
with why, the pixel-size CSV's header, scans missing from it, and several
paths after `--images`."""

import csv
import os

import numpy as np
from PIL import Image
import pytest

from hc_jax import predict
from hc_jax.data import hc18
from hc_jax.evaluation import scan_files
from test_dicom import _Stub, _write


@pytest.fixture
def run_predict(monkeypatch, tmp_path):
  """Runs predict.main on a stub model (HC = 1000 px + the top-left grey);
  returns (code, {filename: row} or None)."""
  monkeypatch.setattr(predict, 'load', lambda *a, **k: _Stub())

  def run(*flags):
    out = tmp_path / 'hc.csv'
    if out.exists():
      out.unlink()
    code = predict.main([f'--out={out}', *flags])
    if not out.exists():
      return code, None
    with open(out, newline='') as f:
      return code, {r['filename']: r for r in csv.DictReader(f)}
  return run


def _grey(seed=0, top_left=None):
  pixels = np.random.default_rng(seed).integers(0, 256, [24, 32]).astype(
      np.uint8)
  if top_left is not None:
    pixels[0, 0] = top_left
  return pixels


def test_jpeg_tiff_and_bmp_read_as_the_png_does(tmp_path):
  pixels = _grey()
  for name in ('a.png', 'a.tif', 'a.tiff', 'a.bmp'):
    Image.fromarray(pixels).save(tmp_path / name)
    image, note = scan_files.read_scan(str(tmp_path / name))
    np.testing.assert_array_equal(image, pixels)  # Lossless: the same.
    assert note is None, name
  smooth = np.tile(np.arange(32, dtype=np.uint8) * 8, (24, 1))
  Image.fromarray(smooth).convert('RGB').save(tmp_path / 'c.jpg', quality=95)
  image, note = scan_files.read_scan(str(tmp_path / 'c.jpg'))
  assert image.shape == smooth.shape and image.dtype == np.uint8
  assert np.abs(image.astype(int) - smooth).max() <= 3
  assert note == 'RGB image converted to 8-bit grayscale'
  # By content, whatever the name: a PNG named .jpg reads.
  Image.fromarray(pixels).save(tmp_path / 'png.jpg', format='PNG')
  np.testing.assert_array_equal(
      scan_files.read_scan(str(tmp_path / 'png.jpg'))[0], pixels)
  # A multi-page TIFF gives its first page, and says so.
  pages = [Image.fromarray(_grey(seed)) for seed in (1, 2)]
  pages[0].save(tmp_path / 'pages.tif', save_all=True,
                append_images=pages[1:])
  image, note = scan_files.read_scan(str(tmp_path / 'pages.tif'))
  np.testing.assert_array_equal(image, _grey(1))
  assert note == 'first of its 2 pages read'
  # 16 bits, as for a PNG, and a file that is none of them: clear errors.
  Image.fromarray(pixels.astype(np.uint16) * 256).save(tmp_path / 'w.tif')
  with pytest.raises(hc18.ImageReadError, match='expected 8-bit'):
    scan_files.read_scan(str(tmp_path / 'w.tif'))
  Image.fromarray(pixels).save(tmp_path / 'g.gif')
  with pytest.raises(hc18.ImageReadError,
                     match='not a PNG, JPEG, TIFF or BMP image'):
    scan_files.read_scan(str(tmp_path / 'g.gif'))
  # HC18 itself stays PNG only.
  with pytest.raises(hc18.ImageReadError, match='not a PNG image'):
    hc18.read_grayscale(str(tmp_path / 'a.bmp'))


def test_a_folder_of_every_format_in_one_command_names_what_it_skips(
    run_predict, tmp_path, capsys):
  scans = tmp_path / 'scans'
  (scans / 'more').mkdir(parents=True)
  Image.fromarray(_grey(0, 10)).save(scans / 'a.png')
  Image.fromarray(_grey(1, 20)).save(scans / 'b.TIFF')
  Image.fromarray(_grey(2, 30)).save(scans / 'more' / 'c.bmp')
  Image.fromarray(np.full([24, 32], 40, np.uint8)).save(scans / 'd.jpeg')
  _write(scans / 'e.dcm', _grey(3, 50), PixelSpacing=[0.2, 0.2])
  Image.fromarray(_grey()).save(scans / 'f.gif')
  (scans / 'notes.txt').write_text('not a scan')
  for name in ('a_Annotation.png', 'b_Annotation.png', 'old_prediction.png'):
    Image.fromarray(_grey()).save(scans / name)
  code, rows = run_predict(f'--images={scans}')
  assert code == 0
  assert sorted(rows) == ['a.png', 'b.TIFF', 'd.jpeg', 'e.dcm',
                          os.path.join('more', 'c.bmp')]
  for name, grey in (('a.png', 10), ('b.TIFF', 20), ('d.jpeg', 40),
                     ('e.dcm', 50), (os.path.join('more', 'c.bmp'), 30)):
    assert rows[name]['status'] == 'ok'
    assert float(rows[name]['hc_px']) == 1000 + grey, name
  out = capsys.readouterr().out
  assert '5 of 5 images predicted, 0 failed or flagged, 5 file(s) skipped' \
      in out
  kinds = 'not a PNG, JPEG, TIFF, BMP or DICOM file (by its name)'
  assert f'  skipped: {scans / "f.gif"}: {kinds}' in out
  assert f'  skipped: {scans / "notes.txt"}: {kinds}' in out
  assert (f'  skipped: 2 files like {scans / "a_Annotation.png"}: an HC18 '
          'annotation mask, not a scan') in out
  assert (f'  skipped: {scans / "old_prediction.png"}: an overlay '
          'hc_jax.predict wrote') in out


def test_a_jpeg_named_directly_is_predicted(run_predict, tmp_path):
  Image.fromarray(np.full([24, 32], 60, np.uint8)).save(tmp_path / 'x.jpg')
  code, rows = run_predict(f'--images={tmp_path / "x.jpg"}')
  assert code == 0
  assert rows['x.jpg']['status'] == 'ok'
  assert float(rows['x.jpg']['hc_px']) == 1060


@pytest.mark.parametrize('header', [
    'name,px', 'filename,hc', 'filename,pixel size(cm)', 'a.png,size'])
def test_a_pixel_size_csv_with_another_header_is_refused(
    run_predict, tmp_path, capsys, header):
  Image.fromarray(_grey()).save(tmp_path / 'a.png')
  sizes = tmp_path / 'sizes.csv'
  sizes.write_text(f'{header}\na.png,0.1\n')
  code, rows = run_predict(f'--images={tmp_path / "a.png"}',
                           f'--pixel-sizes={sizes}')
  assert code == 2 and rows is None
  err = capsys.readouterr().err
  assert err == (f"error: {sizes} line 1: the header must start with "
                 f"filename,pixel size(mm) (as HC18's), got {header!r}\n")


@pytest.mark.parametrize('header', [
    'filename,pixel size(mm)', 'Filename, Pixel Size (mm),head circumference',
    ''])
def test_hc18s_header_any_case_or_none_is_taken(run_predict, tmp_path,
                                                header):
  Image.fromarray(_grey(0, 10)).save(tmp_path / 'a.png')
  sizes = tmp_path / 'sizes.csv'
  sizes.write_text((f'{header}\n' if header else '') + 'a.png,0.1\n')
  code, rows = run_predict(f'--images={tmp_path / "a.png"}',
                           f'--pixel-sizes={sizes}')
  assert code == 0 and float(rows['a.png']['pixel_size_mm']) == 0.1


def test_a_scan_missing_from_the_csv_keeps_its_px(run_predict, tmp_path):
  Image.fromarray(_grey(0, 10)).save(tmp_path / 'a.png')
  Image.fromarray(_grey(1, 20)).save(tmp_path / 'b.png')
  sizes = tmp_path / 'sizes.csv'
  sizes.write_text('filename,pixel size(mm)\na.png,0.1\n')
  code, rows = run_predict(f'--images={tmp_path / "a.png"},'
                           f'{tmp_path / "b.png"}', f'--pixel-sizes={sizes}')
  assert code == 0
  assert float(rows['a.png']['hc_mm']) == pytest.approx(101.0)
  assert (rows['b.png']['status'], rows['b.png']['hc_px'],
          rows['b.png']['hc_mm'], rows['b.png']['pixel_size_mm']) == (
              'ok', '1020.000', '', '')
  assert rows['b.png']['message'] == (f'no pixel size for it in {sizes}; '
                                      'HC in px only')


def test_images_takes_several_paths_after_the_flag(run_predict, tmp_path,
                                                   capsys):
  for k in range(4):
    Image.fromarray(_grey(k, 10 * k)).save(tmp_path / f'00{k}_HC.png')
  paths = [str(tmp_path / f'00{k}_HC.png') for k in range(3)]
  # What the shell passes for an unquoted `--images 00[0-2]_HC.png`.
  code, rows = run_predict('--images', *paths)
  assert code == 0 and sorted(rows) == ['000_HC.png', '001_HC.png',
                                        '002_HC.png']
  # Mixed with commas and a repeated flag.
  code, rows = run_predict('--images', paths[0], f'{paths[1]},{paths[2]}',
                           f'--images={tmp_path / "003_HC.png"}')
  assert code == 0 and len(rows) == 4
  # A pattern the shell left alone (quoted, or after --images=).
  code, rows = run_predict(f'--images={tmp_path / "00[0-2]_HC.png"}')
  assert code == 0 and sorted(rows) == ['000_HC.png', '001_HC.png',
                                        '002_HC.png']
  capsys.readouterr()
  code, rows = run_predict(f'--images={tmp_path / "9*.png"}')
  assert code == 2 and rows is None
  assert capsys.readouterr().err == (
      f'error: --images {tmp_path / "9*.png"} matches no files\n')
