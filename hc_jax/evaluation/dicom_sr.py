"""DICOM Structured Reports of `python -m hc_jax.predict --dicom-sr=DIR`.

For each row of a DICOM scan (a frame of a multi-frame file is a row), one
Comprehensive SR file that a PACS or viewer can read beside the scan,
written with highdicom. It follows DICOM's TID 1500 "Measurement Report"
with one TID 1410 "Planar ROI Measurements and Qualitative Evaluations"
group:

  region        the head's ellipse as an SCOORD ELLIPSE on the source image
                (frame), its four points the ends of the major then the
                minor axis, in DICOM's image coordinates (the top-left
                corner of the top-left pixel is 0,0: hc_jax's pixel-centre
                coordinates + 0.5). Models that predict HC only have no
                ellipse; their group is a TID 1501 one, the measurement
                referencing the image instead.
  measurements  Head Circumference (LOINC 11984-2) in mm, where the pixel
                size is known; Gestational Age (LOINC 18185-9) in weeks,
                its method "HC, Hadlock 1984" (LOINC 11932-1, the formula
                in a comment), unless the HC is implausible.
  evaluations   hc_jax's status (ok, uncertain, implausible) and the row's
                message, in the local coding scheme `CODING_SCHEME`.
  references    the source instance (SOP class and instance UIDs, frame),
                in the region and as evidence; the patient and study are
                the source file's.

The observer is a device, hc_jax and its model. These reports are for
research: they are not a medical device's output and were not validated for
clinical use; every one says so in its comment. A row refused or in error
gets no report (the CSV says why).
"""

import os
from typing import Sequence

import numpy as np
import pydicom
from pydicom.sr.coding import Code

from hc_jax import log
from hc_jax import workdir as workdir_lib

CODING_SCHEME = '99HCJAX'  # Local codes: 99 + the maker's name (PS3.16 8.1).
SUFFIX = '_sr.dcm'
MANUFACTURER = 'hc_jax'
HEAD_CIRCUMFERENCE = Code('11984-2', 'LN', 'Head Circumference')
GESTATIONAL_AGE = Code('18185-9', 'LN', 'Gestational Age')
HADLOCK_HC_1984 = Code('11932-1', 'LN', 'HC, Hadlock 1984')
FETUS_US = Code('11525-3', 'LN', 'US Pelvis Fetus for pregnancy')
HEAD = Code('69536005', 'SCT', 'Head')
COMMENT = Code('121106', 'DCM', 'Comment')
STATUS = Code('status', CODING_SCHEME, 'hc_jax prediction status')
REPORTED = ('ok', 'uncertain', 'implausible')
# The patient and study attributes an SR copies from its source (type 2 in
# an ultrasound image, yet missing from some exported or anonymised files).
TYPE_2_COPIED = ('PatientName', 'PatientID', 'PatientBirthDate', 'PatientSex',
                 'StudyDate', 'StudyTime', 'ReferringPhysicianName', 'StudyID',
                 'AccessionNumber')
RESEARCH_NOTE = ('For research only: produced by hc_jax, not a medical '
                 'device, not validated for clinical use.')
HADLOCK_TEXT = ('GA (weeks) = 8.96 + 0.540 * HC + 0.0003 * HC^3, HC in cm '
                '(Hadlock et al., Radiology 1984), fitted on 14-42 weeks')


def report_path(directory: str, row_filename: str) -> str:
  """Where a row's report goes: DIR/<its path without the extension>
  [_framek]_sr.dcm."""
  name, _, frame = row_filename.partition('#')
  stem = os.path.splitext(name)[0] + (f'_frame{frame}' if frame else '')
  return os.path.join(directory, stem + SUFFIX)


def check_outputs(directory: str, row_filenames: Sequence[str]) -> None:
  """Raises PredictError where a report would replace a file hc_jax did not
  write (an SR hc_jax wrote earlier may be replaced)."""
  for name in row_filenames:
    path = report_path(directory, name)
    if not os.path.lexists(path):
      continue
    try:
      ds = pydicom.dcmread(path, stop_before_pixels=True)
      ours = (ds.get('Modality') == 'SR'
              and ds.get('Manufacturer') == MANUFACTURER)
    except Exception:  # pylint: disable=broad-except  # Not DICOM: not ours.
      ours = False
    if not ours:
      raise workdir_lib.PredictError(
          f'--dicom-sr {path} exists and is not a report hc_jax.predict '
          'wrote; not overwritten (give another --dicom-sr)')


def write_reports(directory: str, rows: Sequence[dict], paths: dict,
                  model: str) -> tuple[list[str], list[str]]:
  """Writes the report of each DICOM row (`rows` of predict's CSV).

  Args:
    directory: where the reports go (`report_path`).
    rows: the CSV rows of the DICOM scans.
    paths: {row filename without '#k': the DICOM file}.
    model: the model's name, for the algorithm identification.

  Returns:
    (the reports written, 'row: why' for each row without one).
  """
  written, missing = [], []
  for row in rows:
    name, _, frame = row['filename'].partition('#')
    if row['status'] not in REPORTED:
      missing.append(f'{row["filename"]}: {row["status"]} (see the CSV)')
      continue
    path = report_path(directory, row['filename'])
    try:
      source = pydicom.dcmread(paths[name], stop_before_pixels=True)
      report = build_report(source, row, int(frame) if frame else None, model)
      os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
      tmp = path + '.tmp'
      report.save_as(tmp, enforce_file_format=True)
      os.replace(tmp, path)
    except OSError as e:
      raise workdir_lib.PredictError(f'--dicom-sr {path} cannot be written '
                                     f'({e.strerror or e})') from None
    except Exception as e:  # pylint: disable=broad-except  # Per scan.
      missing.append(f'{row["filename"]}: {log.error_line(e)}')
      continue
    written.append(path)
  return written, missing


def write_and_list(directory: str, rows: Sequence[dict],
                   paths: dict[str, str], model: str) -> bool:
  """Writes the reports of the DICOM rows among `rows` (`write_reports`)
  and prints what it wrote and which rows got none.

  Args:
    directory: where the reports go.
    rows: every row of predict's CSV; those of a file in `paths` are
      reported.
    paths: {DICOM filename: the file}.
    model: the model's name, for the algorithm identification.

  Returns:
    Whether every row of a status in `REPORTED` got its report.
  """
  dicom_rows = [row for row in rows
                if row['filename'].partition('#')[0] in paths]
  written, missing = write_reports(directory, dicom_rows, paths, model)
  print(f'wrote {len(written)} DICOM SR report(s) to {directory}'
        + ('' if dicom_rows else ' (no DICOM scans among the inputs)'))
  for line in missing:
    print(f'  no report: {line}')
  reportable = [row for row in dicom_rows if row['status'] in REPORTED]
  return len(written) >= len(reportable)


def _number(cell) -> float | None:
  try:
    value = float(cell)
  except (TypeError, ValueError):
    return None
  return value if np.isfinite(value) else None


def ellipse_points(row: dict) -> np.ndarray | None:
  """The row's ellipse as SCOORD ELLIPSE points `[4, 2]` (column, row; the
  ends of the major axis, then of the minor), or None without one."""
  values = [_number(row.get(key)) for key in (
      'center_x_px', 'center_y_px', 'semi_axis_a_px', 'semi_axis_b_px',
      'angle_rad')]
  if any(v is None for v in values):
    return None
  center_x, center_y, a, b, angle = values
  major = np.array([np.cos(angle), np.sin(angle)])
  minor = np.array([-np.sin(angle), np.cos(angle)])
  center = np.array([center_x, center_y]) + 0.5  # To DICOM's corner origin.
  return np.stack([center - a * major, center + a * major,
                   center - b * minor, center + b * minor]).astype(np.float32)


def build_report(source: pydicom.Dataset, row: dict, frame: int | None,
                 model: str):
  """The `highdicom.sr.ComprehensiveSR` of one row (see the module's doc).

  Args:
    source: the scan's DICOM header.
    row: its CSV row (predict's columns, an ellipse model's too).
    frame: the frame (from 0) of a multi-frame file, else None.
    model: the model's name.

  Raises:
    ValueError: for a source that cannot be referenced (no study or
      instance UID), from highdicom.
  """
  # pylint: disable=import-outside-toplevel
  import highdicom as hd
  from highdicom.sr import (AlgorithmIdentification, ImageRegion,
                            Measurement, QualitativeEvaluation)
  from pydicom.sr.codedict import codes

  for keyword in ('StudyInstanceUID', 'SeriesInstanceUID', 'SOPInstanceUID',
                  'SOPClassUID'):
    if not source.get(keyword):
      raise ValueError(f'the scan has no {keyword} to reference')
  for keyword in TYPE_2_COPIED:  # Type 2: present, empty where unknown.
    if keyword not in source:
      setattr(source, keyword, '')
  frames = None if frame is None else [frame + 1]
  algorithm = AlgorithmIdentification(name=f'hc_jax {model}',
                                      version=_version())
  points = ellipse_points(row)
  # Without an ellipse (an HC-only model) each measurement references the
  # image itself.
  on_image = None if points is not None else [
      hd.sr.SourceImageForMeasurement(source.SOPClassUID,
                                      source.SOPInstanceUID,
                                      referenced_frame_numbers=frames)]
  measurements = []
  hc_mm = _number(row.get('hc_mm'))
  if hc_mm is not None:
    measurements.append(Measurement(
        name=HEAD_CIRCUMFERENCE, value=hc_mm, unit=codes.UCUM.Millimeter,
        algorithm_id=algorithm, referenced_images=on_image))
  ga_weeks = _number(row.get('ga_weeks'))
  if ga_weeks is not None:
    measurements.append(Measurement(
        name=GESTATIONAL_AGE, value=ga_weeks,
        unit=Code('wk', 'UCUM', 'week'), method=HADLOCK_HC_1984,
        algorithm_id=algorithm, referenced_images=on_image))
  status = QualitativeEvaluation(
      name=STATUS, value=Code(row['status'], CODING_SCHEME, row['status']))
  common = dict(tracking_identifier=hd.sr.TrackingIdentifier(
      uid=hd.UID(), identifier='fetal head'),
                finding_sites=[hd.sr.FindingSite(HEAD)],
                algorithm_id=algorithm, qualitative_evaluations=[status],
                measurements=measurements or None)
  if points is not None:
    region = ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.ELLIPSE, graphic_data=points,
        source_image=hd.sr.SourceImageForRegion(
            source.SOPClassUID, source.SOPInstanceUID,
            referenced_frame_numbers=frames))
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        referenced_region=region, **common)
  else:
    group = hd.sr.MeasurementsAndQualitativeEvaluations(**common)
  group[0].ContentSequence.append(hd.sr.TextContentItem(
      name=COMMENT, value=_comment(row, ga_weeks is not None),
      relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
  content = hd.sr.MeasurementReport(
      observation_context=hd.sr.ObservationContext(
          observer_device_context=hd.sr.ObserverContext(
              observer_type=codes.DCM.Device,
              observer_identifying_attributes=(
                  hd.sr.DeviceObserverIdentifyingAttributes(
                      uid=hd.UID(), name=f'hc_jax {model}')))),
      procedure_reported=FETUS_US, imaging_measurements=[group])
  return hd.sr.ComprehensiveSR(
      evidence=[source], content=content, series_instance_uid=hd.UID(),
      series_number=900, sop_instance_uid=hd.UID(), instance_number=1,
      manufacturer=MANUFACTURER, is_complete=True,
      series_description='hc_jax head circumference (research)')


def _comment(row: dict, with_ga: bool) -> str:
  parts = [RESEARCH_NOTE, f'status {row["status"]}']
  if row.get('message'):
    parts.append(row['message'])
  if _number(row.get('hc_px')) is not None:
    parts.append(f'HC {float(row["hc_px"]):.1f} px')
  if with_ga:
    parts.append(f'gestational age: {HADLOCK_TEXT}'
                 + (f' ({row["ga_flag"]})' if row.get('ga_flag') else ''))
  return ' '.join(part if part.endswith('.') else part + '.'
                  for part in parts)


def _version() -> str:
  import hc_jax  # pylint: disable=import-outside-toplevel
  return hc_jax.__version__

