"""DICOM scans: grey values, pixel sizes, frames and errors, alone and
through `python -m hc_jax.predict`."""

import csv
import os

import numpy as np
from PIL import Image
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
import pytest

from hc_jax import archive as archive_lib
from hc_jax import predict
from hc_jax.evaluation import dicom
from hc_jax.evaluation import prediction_rows

US_IMAGE = '1.2.840.10008.5.1.4.1.1.6.1'
US_MULTIFRAME_IMAGE = '1.2.840.10008.5.1.4.1.1.3.1'
JPEG_LS_LOSSLESS = '1.2.840.10008.1.2.4.80'
MPEG2 = '1.2.840.10008.1.2.4.100'  # No pydicom decoder at all.
# The DICOM files pydicom bundles, opened by path (no download).
PYDICOM_FILES = os.path.join(os.path.dirname(pydicom.__file__), 'data',
                             'test_files')


def _write(path, pixels, photometric='MONOCHROME2', bits_stored=None,
           frames=None, syntax=uid.ExplicitVRLittleEndian, pixel_data=None,
           **elements):
  """Writes `pixels` ([H, W] or [H, W, 3]; [F, ...] with `frames`) as an
  ultrasound DICOM file; `elements` are set on the dataset as they are."""
  pixels = np.asarray(pixels)
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.TransferSyntaxUID = syntax
  ds.SOPClassUID = US_MULTIFRAME_IMAGE if frames else US_IMAGE
  ds.SOPInstanceUID = uid.generate_uid()
  ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
  ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
  ds.Modality = 'US'
  shape = pixels.shape[1:] if frames else pixels.shape
  ds.Rows, ds.Columns = shape[:2]
  ds.SamplesPerPixel = 3 if len(shape) == 3 else 1
  if ds.SamplesPerPixel == 3:
    ds.PlanarConfiguration = 0
  ds.PhotometricInterpretation = photometric
  ds.BitsAllocated = pixels.itemsize * 8
  ds.BitsStored = bits_stored or ds.BitsAllocated
  ds.HighBit = ds.BitsStored - 1
  ds.PixelRepresentation = int(pixels.dtype.kind == 'i')
  if frames:
    ds.NumberOfFrames = frames
  for key, value in elements.items():
    setattr(ds, key, value)
  if pixel_data is None:
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder('<')).tobytes()
  else:
    ds.PixelData = pixel_data
    ds['PixelData'].VR = 'OB'
    ds['PixelData'].is_undefined_length = True
  pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
  return str(path)


def _region(x0, y0, x1, y1, delta_x_cm, delta_y_cm=None, units=3):
  region = Dataset()
  region.RegionSpatialFormat, region.RegionDataType = 1, 1
  region.RegionLocationMinX0, region.RegionLocationMinY0 = x0, y0
  region.RegionLocationMaxX1, region.RegionLocationMaxY1 = x1, y1
  region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = units
  region.PhysicalDeltaX = delta_x_cm
  region.PhysicalDeltaY = delta_x_cm if delta_y_cm is None else delta_y_cm
  return region


def _noise(shape, seed=0, high=256, dtype=np.uint8):
  return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def _pil_grey(rgb):
  return np.asarray(Image.fromarray(rgb, 'RGB').convert('L'))


def test_grey_values_of_each_photometric_interpretation(tmp_path):
  grey = _noise([8, 10])
  path = _write(tmp_path / 'm2.dcm', grey)
  image, note = dicom.read_frame(path)
  assert image.dtype == np.uint8 and np.array_equal(image, grey)
  assert note is None
  image, note = dicom.read_frame(_write(tmp_path / 'm1.dcm', grey,
                                        'MONOCHROME1'))
  assert np.array_equal(image, 255 - grey) and 'inverted' in note
  # 12 bits stored: rescaled by the stored range 0..4095, not min..max.
  wide = np.array([[0, 4095, 2048, 1], [100, 200, 300, 4000]], np.uint16)
  image, note = dicom.read_frame(_write(tmp_path / 'w.dcm', wide,
                                        bits_stored=12))
  expected = np.rint(wide.astype(float) * 255 / 4095).astype(np.uint8)
  assert np.array_equal(image, expected)
  assert image[0].tolist() == [0, 255, 128, 0] and '12-bit' in note
  signed = np.array([[-32768, 32767, 0, -1]], np.int16)
  image, _ = dicom.read_frame(_write(tmp_path / 's.dcm', signed))
  assert image[0].tolist() == [0, 255, 128, 127]
  # RGB: PIL's 'L' conversion exactly; YBR: within the colour conversion's
  # rounding of it.
  rgb = _noise([8, 10, 3], seed=1)
  rgb[:, 1::2] = rgb[:, ::2]  # Pixel pairs share a colour, as 4:2:2 keeps.
  image, note = dicom.read_frame(_write(tmp_path / 'rgb.dcm', rgb, 'RGB'))
  assert np.array_equal(image, _pil_grey(rgb)) and 'RGB' in note
  ybr = pydicom.pixels.convert_color_space(rgb, 'RGB', 'YBR_FULL')
  image, _ = dicom.read_frame(_write(tmp_path / 'ybr.dcm', ybr, 'YBR_FULL'))
  assert np.abs(image.astype(int) - _pil_grey(rgb)).max() <= 2
  pairs = ybr.reshape(8, 5, 2, 3)  # Y0 Y1 Cb Cr for each pixel pair.
  packed = np.concatenate([pairs[..., 0], pairs[:, :, 0, 1:]], axis=-1)
  path = _write(tmp_path / 'y422.dcm', ybr, 'YBR_FULL_422')
  ds = pydicom.dcmread(path)
  ds.PixelData = packed.astype(np.uint8).tobytes()
  ds.save_as(path)
  image, _ = dicom.read_frame(path)
  assert image.shape == (8, 10)
  assert np.abs(image.astype(int) - _pil_grey(rgb)).max() <= 2
  with pytest.raises(dicom.DicomError, match='PALETTE COLOR'):
    dicom.read_info(_write(tmp_path / 'pal.dcm', grey, 'PALETTE COLOR'))


@pytest.mark.parametrize('elements, size, source, reason', [
    ({'SequenceOfUltrasoundRegions': [_region(0, 0, 19, 15, 0.01)]},
     0.1, 'ultrasound_region', ''),
    # The region holding the centre, not the larger one beside it.
    ({'SequenceOfUltrasoundRegions': [_region(0, 0, 5, 15, 0.05),
                                      _region(6, 2, 15, 12, 0.02)]},
     0.2, 'ultrasound_region', ''),
    # None holds the centre: no region clearly holds the scan, no mm.
    ({'SequenceOfUltrasoundRegions': [_region(0, 0, 3, 3, 0.05),
                                      _region(12, 0, 19, 15, 0.03)]},
     None, '', 'none of its 2 ultrasound region(s) holds the image centre'),
    ({'SequenceOfUltrasoundRegions': [_region(12, 0, 19, 15, 0.03)]},
     None, '', 'none of its 1 ultrasound region(s) holds the image centre'),
    # Two central regions in cm that disagree: no mm either.
    ({'SequenceOfUltrasoundRegions': [_region(0, 0, 19, 15, 0.01),
                                      _region(5, 5, 14, 10, 0.02)]},
     None, '', '2 ultrasound regions in cm hold the image centre'),
    # ... but agreeing ones (a region nested in another) give it.
    ({'SequenceOfUltrasoundRegions': [_region(0, 0, 19, 15, 0.02),
                                      _region(5, 5, 14, 10, 0.02)]},
     0.2, 'ultrasound_region', ''),
    # Of two central regions, the one in cm (a Doppler trace is in seconds).
    ({'SequenceOfUltrasoundRegions': [_region(0, 0, 19, 15, 0.01, units=4),
                                      _region(5, 5, 14, 10, 0.02)]},
     0.2, 'ultrasound_region', ''),
    ({'SequenceOfUltrasoundRegions': [_region(0, 0, 19, 15, 0.01, units=4)]},
     None, '', 'seconds/seconds, not cm'),
    ({'SequenceOfUltrasoundRegions': [_region(0, 0, 19, 15, 0.01, 0.02)]},
     None, '', 'anisotropic pixels (0.1 mm in x, 0.2 mm in y'),
    ({'PixelSpacing': [0.25, 0.25]}, 0.25, 'PixelSpacing', ''),
    ({'PixelSpacing': [0.2, 0.201]}, 0.2005, 'PixelSpacing', ''),  # < 1 %.
    ({'PixelSpacing': [0.25, 0.2]}, None, '',
     'anisotropic pixels (0.2 mm in x, 0.25 mm in y'),
    ({}, None, '', 'no pixel size in the file'),
    ({'ImagerPixelSpacing': [0.2, 0.2]}, None, '', 'no pixel size'),
])
def test_pixel_size_and_its_source(tmp_path, elements, size, source, reason):
  info = dicom.read_info(_write(tmp_path / 'a.dcm', _noise([16, 20]),
                                **elements))
  assert info.frames == 1 and info.source == source
  if size is None:
    assert info.pixel_size_mm is None and reason in info.reason, info.reason
  else:
    assert info.pixel_size_mm == pytest.approx(size) and not info.reason


class _Stub:
  """A label-model predictor: HC is 1000 px plus the scan's top-left grey,
  in mm times the pixel size; it records how many scans each call gets."""
  predicts_ellipse = False
  kind = 'hc'

  def __init__(self):
    self.calls = []

  def __call__(self, images, pixel_sizes_mm, **unused):
    del unused
    self.calls.append(len(images))
    n = len(images)
    hc_px = np.array([1000.0 + image[0, 0] for image in images])
    return {'hc_px': hc_px,
            'hc_mm': np.array([h * p if p else np.nan
                               for h, p in zip(hc_px, pixel_sizes_mm)]),
            'hc_mm_sd': np.full(n, np.nan),
            'status': np.full(n, 'ok', object),
            'message': np.full(n, '', object)}


@pytest.fixture
def stub_cli(monkeypatch, tmp_path):
  """Runs predict.main on a stub model; returns (code, rows, header)."""
  stub = _Stub()
  monkeypatch.setattr(predict, 'load', lambda *a, **k: stub)

  def run_cli(*flags):
    out = tmp_path / 'hc.csv'
    if out.exists():
      out.unlink()
    code = predict.main([f'--out={out}', *flags])
    if not out.exists():
      return code, None, None
    with open(out, newline='') as f:
      reader = csv.DictReader(f)
      return code, {r['filename']: r for r in reader}, reader.fieldnames
  run_cli.stub = stub
  return run_cli


def _with_top_left(pixels, value):
  pixels = np.array(pixels)
  pixels[0, 0] = value
  return pixels


def _scan_folder(root):
  """A folder of PNG and DICOM scans, good and bad; the stub's HC in px is
  1000 + each scan's top-left grey."""
  root.mkdir()
  scan = _noise([16, 20])
  Image.fromarray(_with_top_left(scan, 5)).save(root / 'a.png')
  cm = [_region(0, 0, 19, 15, 0.01)]
  _write(root / 'region.dcm', _with_top_left(scan, 10),
         SequenceOfUltrasoundRegions=cm)
  _write(root / 'spacing.dcm', _with_top_left(scan, 20),
         PixelSpacing=[0.2, 0.2])
  _write(root / 'none.dcm', _with_top_left(scan, 30))
  _write(root / 'aniso.dcm', _with_top_left(scan, 40),
         PixelSpacing=[0.25, 0.2])
  frames = np.stack([_with_top_left(scan, v) for v in (50, 60, 70)])
  _write(root / 'multi.dcm', frames, frames=3, SequenceOfUltrasoundRegions=cm)
  rgb = _with_top_left(_noise([16, 20, 3]), [90, 90, 90])
  _write(root / 'rgb.dcm', rgb, 'RGB', PixelSpacing=[0.2, 0.2])
  _write(root / 'mono1.dcm', _with_top_left(scan, 255 - 100), 'MONOCHROME1')
  _write(root / 'wide.dcm',
         _with_top_left(_noise([16, 20], high=4096, dtype=np.uint16), 4095),
         bits_stored=12)
  _write(root / 'scan0042', _with_top_left(scan, 110))  # No extension.
  junk = encapsulate([b'\xff\xd8 not a JPEG-LS stream \xff\xd9'])
  _write(root / 'jpegls.dcm', scan, syntax=JPEG_LS_LOSSLESS, pixel_data=junk)
  _write(root / 'mpeg2.dcm', scan, syntax=MPEG2, pixel_data=junk)
  good = _write(root / 'cut.dcm', scan)
  with open(good, 'rb') as f:
    data = f.read()
  (root / 'cut.dcm').write_bytes(data[:-40])
  (root / 'text.dcm').write_text('not DICOM at all\n')
  (root / 'notes.txt').write_text('not a scan')


def test_folder_of_dicom_and_png_scans(stub_cli, tmp_path, monkeypatch,
                                       capsys):
  _scan_folder(tmp_path / 'scans')
  monkeypatch.setattr(prediction_rows, 'PROGRESS_EVERY', 4)
  code, rows, header = stub_cli(f'--images={tmp_path / "scans"}')
  assert code == 1
  assert header == list(prediction_rows.COLUMNS +
                         prediction_rows.DICOM_COLUMNS)
  assert sorted(rows) == sorted([
      'a.png', 'region.dcm', 'spacing.dcm', 'none.dcm', 'aniso.dcm',
      'multi.dcm#0', 'multi.dcm#1', 'multi.dcm#2', 'rgb.dcm', 'mono1.dcm',
      'wide.dcm', 'scan0042', 'jpegls.dcm', 'mpeg2.dcm', 'cut.dcm',
      'text.dcm'])
  # HC in px tells the scan's top-left grey: inverted, grey, rescaled.
  for name, grey, size, source in (
      ('a.png', 5, '', ''), ('region.dcm', 10, 0.1, 'ultrasound_region'),
      ('spacing.dcm', 20, 0.2, 'PixelSpacing'), ('multi.dcm#0', 50, 0.1,
                                                 'ultrasound_region'),
      ('multi.dcm#2', 70, 0.1, 'ultrasound_region'),
      ('rgb.dcm', 90, 0.2, 'PixelSpacing'), ('mono1.dcm', 100, '', ''),
      ('wide.dcm', 255, '', ''), ('scan0042', 110, '', '')):
    row = rows[name]
    assert row['status'] == 'ok', row
    assert float(row['hc_px']) == 1000 + grey, row
    assert row['pixel_size_source'] == source
    if size:
      assert float(row['pixel_size_mm']) == pytest.approx(size)
      assert float(row['hc_mm']) == pytest.approx((1000 + grey) * size)
      assert row['message'] == ''
  # No pixel size, or non-square pixels: HC in px only, and why.
  for name, why in (('none.dcm', 'no pixel size in the file'),
                    ('aniso.dcm', 'anisotropic pixels'),
                    ('mono1.dcm', 'no pixel size in the file')):
    assert rows[name]['status'] == 'ok' and rows[name]['hc_px']
    assert rows[name]['hc_mm'] == rows[name]['pixel_size_mm'] == ''
    assert why in rows[name]['message'] and 'HC in px only' in (
        rows[name]['message'])
  for name, why in (('jpegls.dcm', 'cannot be decoded'),
                    ('mpeg2.dcm', 'cannot decode'),
                    ('cut.dcm', 'truncated'), ('text.dcm', 'not a DICOM file')):
    assert rows[name]['status'] == 'error', rows[name]
    assert why in rows[name]['message'] and '\n' not in rows[name]['message']
    assert rows[name]['hc_px'] == ''
  # Predicted in chunks, frames included, never all at once.
  assert sum(stub_cli.stub.calls) == 12 and max(stub_cli.stub.calls) <= 4
  captured = capsys.readouterr()
  assert '12 of 16 images predicted' in captured.out
  assert 'Traceback' not in captured.err
  assert 'rgb.dcm: RGB converted to 8-bit grayscale' in captured.err


def test_frame_flag_picks_one_frame(stub_cli, tmp_path, capsys):
  _scan_folder(tmp_path / 'scans')
  code, rows, _ = stub_cli(f'--images={tmp_path / "scans"}', '--frame=1')
  assert 'multi.dcm#1' in rows and 'multi.dcm#0' not in rows
  assert float(rows['multi.dcm#1']['hc_px']) == 1060
  assert rows['region.dcm']['status'] == 'ok'  # Single-frame: itself.
  code, rows, _ = stub_cli(f'--images={tmp_path / "scans" / "multi.dcm"}',
                           '--frame=3')
  assert code == 1 and list(rows) == ['multi.dcm#3']
  assert rows['multi.dcm#3']['status'] == 'error'
  assert 'no frame 3: the file has 3 frames' in rows['multi.dcm#3']['message']
  capsys.readouterr()
  code, rows, _ = stub_cli(f'--images={tmp_path / "scans"}', '--frame=-1')
  assert code == 2 and rows is None
  assert capsys.readouterr().err.startswith('error: --frame must be >= 0')


def test_pixel_size_csv_overrides_the_files_own(stub_cli, tmp_path):
  _scan_folder(tmp_path / 'scans')
  sizes = tmp_path / 'sizes.csv'
  sizes.write_text('filename,pixel size(mm)\nregion.dcm,0.3\naniso.dcm,0.25\n'
                   'multi.dcm,0.15\n')
  images = [f'--images={tmp_path / "scans" / n}' for n in (
      'region.dcm', 'aniso.dcm', 'multi.dcm', 'spacing.dcm', 'a.png')]
  code, rows, _ = stub_cli(*images, f'--pixel-sizes={sizes}')
  for name, size, source in (('region.dcm', 0.3, 'csv'),
                             ('aniso.dcm', 0.25, 'csv'),
                             ('multi.dcm#1', 0.15, 'csv'),
                             ('spacing.dcm', 0.2, 'PixelSpacing')):
    assert float(rows[name]['pixel_size_mm']) == size, rows[name]
    assert rows[name]['pixel_size_source'] == source
    assert rows[name]['status'] == 'ok' and rows[name]['message'] == ''
  # A PNG missing from the CSV keeps its px, as without DICOMs.
  assert rows['a.png']['status'] == 'ok' and code == 0
  assert rows['a.png']['hc_mm'] == '' and 'HC in px only' in (
      rows['a.png']['message'])


def test_png_only_csv_is_unchanged(stub_cli, tmp_path):
  Image.fromarray(_noise([16, 20])).save(tmp_path / 'a.png')
  code, rows, header = stub_cli(f'--images={tmp_path / "a.png"}')
  assert code == 0 and header == list(prediction_rows.COLUMNS)


def test_submission_needs_every_dicoms_pixel_size(stub_cli, tmp_path, capsys):
  _scan_folder(tmp_path / 'scans')
  code, rows, _ = stub_cli(f'--images={tmp_path / "scans" / "region.dcm"},'
                           f'{tmp_path / "scans" / "none.dcm"}',
                           f'--submission={tmp_path / "sub.csv"}')
  assert code == 2 and rows is None
  assert 'pixel size of every image; none for none.dcm' in (
      capsys.readouterr().err)
  # The file's own pixel size counts: the check passes, the stub has no
  # ellipse.
  code, _, _ = stub_cli(f'--images={tmp_path / "scans" / "region.dcm"}',
                        f'--submission={tmp_path / "sub.csv"}')
  assert code == 2 and 'predicts HC only' in capsys.readouterr().err


def test_overlay_per_frame(stub_cli, tmp_path):
  _scan_folder(tmp_path / 'scans')
  overlays = tmp_path / 'overlays'
  stub_cli(f'--images={tmp_path / "scans" / "multi.dcm"}',
           f'--images={tmp_path / "scans" / "region.dcm"}',
           f'--overlays={overlays}')
  assert sorted(os.listdir(overlays)) == [
      'multi_frame0_prediction.png', 'multi_frame1_prediction.png',
      'multi_frame2_prediction.png', 'region_prediction.png']


def test_pydicoms_bundled_files_give_a_scan_or_a_clean_error(stub_cli):
  names = ('SC_rgb_rle.dcm', 'SC_rgb_rle_2frame.dcm',
           'SC_ybr_full_422_uncompressed.dcm', 'SC_rgb_jpeg_dcmtk.dcm',
           'SC_rgb_rle_16bit.dcm', 'examples_ybr_color.dcm', 'JPEG2000.dcm',
           'JPEG-lossy.dcm', 'MR_small_jpeg_ls_lossless.dcm',
           'MR_truncated.dcm', 'examples_palette.dcm', 'rtplan.dcm',
           'no_meta.dcm')
  paths = [os.path.join(PYDICOM_FILES, name) for name in names]
  code, rows, _ = stub_cli(f'--images={",".join(paths)}')
  assert code == 1
  for name, row in rows.items():
    assert row['status'] in ('ok', 'error'), row
    assert '\n' not in row['message'] and 'Traceback' not in row['message']
    assert bool(row['hc_px']) == (row['status'] == 'ok'), row
  # A 30-frame ultrasound cine (JPEG baseline, YBR_FULL_422) in cm.
  cine = [rows[f'examples_ybr_color.dcm#{k}'] for k in range(30)]
  assert {row['status'] for row in cine} == {'ok'}
  assert {row['pixel_size_source'] for row in cine} == {'ultrasound_region'}
  assert float(cine[0]['pixel_size_mm']) == pytest.approx(0.5104970559)
  assert rows['SC_rgb_rle_2frame.dcm#1']['status'] == 'ok'
  for name, why in (('MR_truncated.dcm', 'truncated'),
                    ('examples_palette.dcm', 'PALETTE COLOR'),
                    ('rtplan.dcm', 'no image'),
                    ('no_meta.dcm', 'not a DICOM file')):
    assert rows[name]['status'] == 'error' and why in rows[name]['message']
  # The same picture as RGB (RLE), 16-bit RGB, YBR 4:2:2 and JPEG YBR.
  reference, _ = dicom.read_frame(paths[0])
  for name in names[1:5]:
    image, _ = dicom.read_frame(os.path.join(PYDICOM_FILES, name))
    assert np.abs(image.astype(int) - reference).max() <= 2, name


def test_shipped_model_predicts_a_dicom_as_its_png(tmp_path):
  png = os.path.join(archive_lib.SAMPLE_IMAGES_DIR, '020_HC.png')
  with open(os.path.join(archive_lib.SAMPLES_DIR, 'test_set_pixel_size.csv')) as f:
    size_mm = float(dict(csv.reader(f))['020_HC.png'])
  scan = np.asarray(Image.open(png))
  rows, columns = scan.shape
  _write(tmp_path / '020_HC.dcm', scan, SequenceOfUltrasoundRegions=[
      _region(0, 0, columns - 1, rows - 1, size_mm / 10)])
  out = tmp_path / 'hc.csv'
  # The PNG's pixel size from the HC18 CSV beside its folder.
  assert predict.main([f'--images={png},{tmp_path / "020_HC.dcm"}',
                       f'--out={out}']) == predict.EXIT_OK
  with open(out, newline='') as f:
    by_name = {os.path.basename(r['filename']): r for r in csv.DictReader(f)}
  from_png, from_dicom = by_name['020_HC.png'], by_name['020_HC.dcm']
  assert from_png['pixel_size_source'] == 'csv'
  assert from_dicom['pixel_size_source'] == 'ultrasound_region'
  assert float(from_dicom['pixel_size_mm']) == pytest.approx(size_mm)
  assert abs(float(from_dicom['hc_mm']) - float(from_png['hc_mm'])) <= 0.01
