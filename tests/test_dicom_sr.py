"""`python -m hc_jax.predict --dicom-sr=DIR`: a DICOM Structured Report per
DICOM scan, read back with highdicom and pydicom."""

import csv
import os

import highdicom as hd
import numpy as np
from PIL import Image
import pydicom
from pydicom import uid
import pytest

from hc_jax import predict
from hc_jax.evaluation import dicom_sr
from hc_jax.evaluation import gestational_age
from test_dicom import _Stub, _noise, _write

# The stub's ellipse: centre (10 + top-left grey / 10, 8), semi-axes 6 and
# 4 px, 0.4 rad; its perimeter is the HC.
AXES_PX, ANGLE = (6.0, 4.0), 0.4


class _EllipseStub(_Stub):
  """`_Stub` that also predicts an ellipse, as the shipped mask model."""
  predicts_ellipse = True
  kind = 'ellipse'

  def __call__(self, images, pixel_sizes_mm, **unused):
    out = super().__call__(images, pixel_sizes_mm, **unused)
    ellipses = np.array([[10 + image[0, 0] / 10, 8.0, *AXES_PX, ANGLE]
                         for image in images])
    out['ellipse_px'] = ellipses
    out['ellipse_mm'] = np.array([
        e * (p or np.nan) if p else np.full(5, np.nan)
        for e, p in zip(ellipses, pixel_sizes_mm)])
    for row, p in zip(out['ellipse_mm'], pixel_sizes_mm):
      row[4] = ANGLE if p else np.nan
    return out


def _study(**elements):
  return dict(StudyInstanceUID=uid.generate_uid(),
              SeriesInstanceUID=uid.generate_uid(), PatientID='ANON7',
              PatientName='Anon^Seven', **elements)


def _scans(root):
  root.mkdir()
  scan = _noise([16, 20])
  Image.fromarray(scan).save(root / 'a.png')
  _write(root / 'single.dcm', scan, PixelSpacing=[0.2, 0.2], **_study())
  frames = np.stack([scan] * 3)
  frames[:, 0, 0] = (10, 20, 30)
  _write(root / 'multi.dcm', frames, frames=3, PixelSpacing=[0.5, 0.5],
         **_study())
  _write(root / 'nosize.dcm', scan, **_study())  # No pixel size.
  _write(root / 'nostudy.dcm', scan, PixelSpacing=[0.2, 0.2])


@pytest.fixture
def run_predict(monkeypatch, tmp_path):
  """predict.main on a stub model; returns (code, {filename: row})."""
  def run(stub, *flags):
    monkeypatch.setattr(predict, 'load', lambda *a, **k: stub)
    out = tmp_path / 'hc.csv'
    code = predict.main([f'--out={out}', *flags])
    if not out.exists():
      return code, None
    with open(out, newline='') as f:
      return code, {r['filename']: r for r in csv.DictReader(f)}
  return run


def test_each_dicom_scan_gets_a_report_that_reads_back(run_predict, tmp_path,
                                                       capsys):
  _scans(tmp_path / 'scans')
  reports = tmp_path / 'sr'
  code, rows = run_predict(_EllipseStub(), f'--images={tmp_path / "scans"}',
                           f'--dicom-sr={reports}')
  # nostudy.dcm is predicted, but a report must name its study.
  assert code == predict.EXIT_FLAGGED
  assert sorted(os.listdir(reports)) == [
      'multi_frame0_sr.dcm', 'multi_frame1_sr.dcm', 'multi_frame2_sr.dcm',
      'nosize_sr.dcm', 'single_sr.dcm']
  out = capsys.readouterr().out
  assert f'wrote 5 DICOM SR report(s) to {reports}' in out
  assert ('  no report: nostudy.dcm: ValueError: the scan has no '
          'StudyInstanceUID to reference') in out
  for name, path, frame in (
      ('single.dcm', 'single_sr.dcm', None),
      ('multi.dcm#2', 'multi_frame2_sr.dcm', 3),
      ('nosize.dcm', 'nosize_sr.dcm', None)):
    row = rows[name]
    source = pydicom.dcmread(tmp_path / 'scans' / name.split('#')[0])
    report = hd.sr.srread(reports / path)
    assert report.SOPClassUID == uid.ComprehensiveSRStorage
    assert report.ContentTemplateSequence[0].TemplateIdentifier == '1500'
    assert (report.StudyInstanceUID, report.PatientID) == (
        source.StudyInstanceUID, 'ANON7')
    assert report.Manufacturer == 'hc_jax'
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[
        0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    (group,) = report.content.get_planar_roi_measurement_groups()
    # The ellipse on the source image (frame), in DICOM's corner origin.
    region = group.roi
    assert region.GraphicType == 'ELLIPSE'
    image = region.ContentSequence[0].ReferencedSOPSequence[0]
    assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert image.get('ReferencedFrameNumber') == frame
    cx, cy = float(row['center_x_px']) + 0.5, float(row['center_y_px']) + 0.5
    major = AXES_PX[0] * np.array([np.cos(ANGLE), np.sin(ANGLE)])
    minor = AXES_PX[1] * np.array([-np.sin(ANGLE), np.cos(ANGLE)])
    np.testing.assert_allclose(
        region.value, [[cx, cy] - major, [cx, cy] + major,
                       [cx, cy] - minor, [cx, cy] + minor], atol=1e-3)
    measurements = {m.name.value: m for m in group.get_measurements()}
    (status,) = group.get_qualitative_evaluations()
    assert status.value.value == row['status'] == 'ok'
    comment = [item.TextValue for item in group[0].ContentSequence
               if item.ValueType == 'TEXT'][-1]
    assert comment.startswith('For research only')
    if name == 'nosize.dcm':  # HC in px only: no measurement in mm.
      assert not measurements and 'HC in px only' in comment
      continue
    hc = measurements['11984-2']
    assert (hc.unit.value, hc.value) == ('mm', pytest.approx(
        float(row['hc_mm']), abs=1e-3))
    ga = measurements['18185-9']
    assert (ga.unit.value, ga.method.value, ga.method.meaning) == (
        'wk', '11932-1', 'HC, Hadlock 1984')
    assert ga.value == pytest.approx(float(row['ga_weeks']), abs=1e-2)
    assert ga.value == pytest.approx(
        gestational_age.hadlock_ga_weeks(hc.value), abs=1e-2)
    assert 'GA (weeks) = 8.96 + 0.540 * HC + 0.0003 * HC^3, HC in cm' in (
        comment)


def test_an_hc_only_model_references_the_image_from_its_measurement(
    run_predict, tmp_path):
  _scans(tmp_path / 'scans')
  code, rows = run_predict(
      _Stub(), f'--images={tmp_path / "scans" / "single.dcm"}',
      f'--dicom-sr={tmp_path / "sr"}')
  assert code == 0 and rows['single.dcm']['status'] == 'ok'
  report = hd.sr.srread(tmp_path / 'sr' / 'single_sr.dcm')
  source = pydicom.dcmread(tmp_path / 'scans' / 'single.dcm')
  assert not report.content.get_planar_roi_measurement_groups()
  (group,) = report.content.get_image_measurement_groups()
  hc = next(m for m in group.get_measurements() if m.name.value == '11984-2')
  assert hc.value == pytest.approx(float(rows['single.dcm']['hc_mm']))
  (image,) = hc.referenced_images
  assert image.referenced_sop_instance_uid == source.SOPInstanceUID


def test_a_file_there_that_hc_jax_did_not_write_is_never_replaced(
    run_predict, tmp_path, capsys):
  _scans(tmp_path / 'scans')
  scan = tmp_path / 'scans' / 'single.dcm'
  reports = tmp_path / 'sr'
  # Its own earlier report is replaced.
  for _ in range(2):
    code, _ = run_predict(_EllipseStub(), f'--images={scan}',
                          f'--dicom-sr={reports}')
    assert code == 0
  capsys.readouterr()
  for name, content in (('single_sr.dcm', b'my notes'),):
    (reports / name).write_bytes(content)
    out = tmp_path / 'hc.csv'
    out.unlink()
    code, rows = run_predict(_EllipseStub(), f'--images={scan}',
                             f'--dicom-sr={reports}')
    assert code == 2 and rows is None
    assert (reports / name).read_bytes() == content
    assert capsys.readouterr().err == (
        f'error: --dicom-sr {reports / name} exists and is not a report '
        'hc_jax.predict wrote; not overwritten (give another --dicom-sr)\n')


def test_report_paths_keep_folders_and_frames_apart():
  assert dicom_sr.report_path('sr', 'a/b.dcm') == os.path.join(
      'sr', 'a', 'b_sr.dcm')
  assert dicom_sr.report_path('sr', 'scan0042#3') == os.path.join(
      'sr', 'scan0042_frame3_sr.dcm')
