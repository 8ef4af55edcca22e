"""Reads ultrasound DICOM files as the 8-bit grayscale scans HC18 is made of.

`read_info` reads a file's header: its number of frames and its pixel size,
and checks that its pixels can be decoded here; `read_frame` decodes one
frame into a `[H, W]` uint8 image. `image_paths` is `--images` of
`python -m hc_jax.predict` with DICOM files among the PNGs.

Pixels (`to_grayscale`):

  MONOCHROME2       as stored; MONOCHROME1 (0 is white) is inverted.
  RGB               to grayscale with the ITU-R 601 luma weights, as PIL's
                    'L' conversion (L = (19595 R + 38470 G + 7471 B + 2^15)
                    >> 16), so an RGB DICOM gives the grey of the same RGB
                    PNG.
  YBR_FULL(_422)    to RGB by pydicom, then as RGB; so are the JPEG 2000
                    colour spaces (YBR_ICT, YBR_RCT), which the decoder
                    returns as RGB.
  other             (PALETTE COLOR, ...): an error.

Stored values of other than 8 bits are rescaled to 0-255 by the range
`BitsStored` can hold, not by the image's own minimum and maximum: v ->
round((v - lo) * 255 / (2^bits - 1)), lo = 0, or -2^(bits - 1) for signed
pixels (so 12-bit 0-4095 maps onto 0-255). No modality or VOI LUT
(windowing) is applied: ultrasound stores display values.

Pixel size (`pixel_spacing`), in this order:

  ultrasound_region  `SequenceOfUltrasoundRegions`: among the regions whose
                     box (RegionLocationMinX0, MinY0, MaxX1, MaxY1) holds
                     the image centre, those in cm in both directions
                     (PhysicalUnitsX/YDirection 3) first, the largest;
                     PhysicalDeltaX/Y (cm per pixel) x 10 is the spacing in
                     mm. A region in other units gives no pixel size, and
                     so do regions none of which holds the image centre, or
                     central regions in cm whose spacings differ: no region
                     clearly holds the scan, and a guessed spacing could be
                     far off.
  PixelSpacing       row spacing (y), column spacing (x), in mm.

`ImagerPixelSpacing` is not used: it is measured at a detector's front
plane, not in the patient. Spacings in x and y that differ by more than
`MAX_ANISOTROPY` give no pixel size either (HC in mm needs square pixels);
otherwise the pixel size is their mean. A file without either gives none.

Compressed transfer syntaxes decode with the plugins pydicom finds (RLE
always; JPEG baseline and JPEG 2000 through Pillow; JPEG-LS, 12-bit or
lossless JPEG only with pylibjpeg, pyjpegls or GDCM installed); a file whose
pixels cannot be decoded here is a `DicomError`, as is a truncated, corrupt
or non-DICOM one.
"""

import dataclasses
import os
from typing import Sequence

import numpy as np
import pydicom
from pydicom import pixels as dicom_pixels
from pydicom.errors import InvalidDicomError
from pydicom.pixels import utils as pixel_utils

from hc_jax import log
from hc_jax.data import hc18
from hc_jax.evaluation import scan_files

DICOM_EXTENSIONS = ('.dcm', '.dicom')
# Spacings in x and y further apart than this (relative) are anisotropic.
MAX_ANISOTROPY = 0.01
CM = 3  # PhysicalUnitsX/YDirection code of centimetres (PS3.3 C.8.5.5.1.15).
UNIT_NAMES = {0: 'none', 1: 'percent', 2: 'dB', 3: 'cm', 4: 'seconds',
              5: 'hertz', 6: 'dB/seconds', 7: 'cm/sec', 8: 'cm2',
              9: 'cm2/sec', 0xA: 'cm3', 0xB: 'cm3/sec', 0xC: 'degrees'}
GREY = ('MONOCHROME1', 'MONOCHROME2')
# Colour spaces that reach `to_grayscale` as RGB (pydicom converts YBR_FULL
# and YBR_FULL_422; JPEG 2000 decoders return YBR_ICT and YBR_RCT as RGB).
COLOUR = ('RGB', 'YBR_FULL', 'YBR_FULL_422', 'YBR_ICT', 'YBR_RCT')


class DicomError(hc18.ImageReadError):
  """A DICOM file that cannot be read as a scan; the message says why."""


@dataclasses.dataclass(frozen=True)
class Info:
  """What a DICOM file's header says about its scan(s).

  Attributes:
    frames: the number of frames (1 for a single-frame file).
    pixel_size_mm: the (square) pixel size in mm, or None.
    source: where it came from, 'ultrasound_region' or 'PixelSpacing'; ''
      when there is none.
    reason: why there is none ('' when there is one).
  """
  frames: int
  pixel_size_mm: float | None
  source: str
  reason: str


def is_dicom(path: str) -> bool:
  """Whether `path` is taken for a DICOM file: a `.dcm` or `.dicom` name,
  or no extension and the 'DICM' marker after the 128-byte preamble."""
  extension = os.path.splitext(path)[1].lower()
  if extension in DICOM_EXTENSIONS:
    return True
  if extension or os.path.basename(path).upper() == 'DICOMDIR':
    return False
  try:
    with open(path, 'rb') as f:
      return f.read(132)[128:] == b'DICM'
  except OSError:
    return False


def image_paths(specs: Sequence[str], skipped: list | None = None
                ) -> dict[str, str]:
  """`scan_files.image_paths` with DICOM files (`is_dicom`): directories
  give their PNG, JPEG, TIFF and BMP scans and DICOM files, keyed by the
  path relative to the deepest directory holding everything named; the
  other files of the directories are appended to `skipped` as (path, why).

  Raises:
    PredictError: when nothing is named, a named path does not exist, or a
      directory holds no scans.
  """
  return scan_files.image_paths(
      specs, accept=lambda path: (scan_files.is_scan_name(
          os.path.basename(path)) or is_dicom(path)),
      kinds='PNG, JPEG, TIFF, BMP or DICOM', skipped=skipped)


def _open(path: str):
  try:
    return open(path, 'rb')  # pylint: disable=consider-using-with
  except OSError as e:
    # pylint: disable-next=protected-access
    raise DicomError(hc18._os_error_reason(path, e)) from None


def read_info(path: str) -> Info:
  """Reads a DICOM file's header and checks that its pixels can be used.

  Raises:
    DicomError: for a missing or unreadable file, one that is not DICOM,
      holds no image, is truncated, uses a colour space other than those
      `to_grayscale` takes, or a transfer syntax no installed plugin
      decodes.
  """
  with _open(path) as f:
    try:
      ds = pydicom.dcmread(f, stop_before_pixels=True)
      pixel_offset, size = f.tell(), os.fstat(f.fileno()).st_size
    except InvalidDicomError:
      raise DicomError("not a DICOM file (no 'DICM' marker after the "
                       '128-byte preamble)') from None
    except Exception as e:  # pylint: disable=broad-except  # Any bad header.
      raise DicomError(
          f'corrupt or truncated DICOM header ({log.error_line(e)})') from None
  try:
    return _check(ds, pixel_offset, size)
  except DicomError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # Malformed values.
    raise DicomError(f'invalid DICOM header ({log.error_line(e)})') from None


def _check(ds: pydicom.Dataset, pixel_offset: int, size: int) -> Info:
  """`read_info` of a header read, its pixel data at `pixel_offset` of a
  `size`-byte file."""
  syntax = ds.file_meta.get('TransferSyntaxUID')
  no_pixels = pixel_offset >= size and not (syntax and syntax.is_deflated)
  if not ds.get('Rows') or not ds.get('Columns') or no_pixels:
    raise DicomError('no image in this DICOM file (no Rows, Columns or '
                     'Pixel Data)')
  photometric = str(ds.get('PhotometricInterpretation', ''))
  if photometric not in GREY + COLOUR:
    raise DicomError(f'unsupported PhotometricInterpretation {photometric!r} '
                     f'(expected one of {", ".join(GREY + COLOUR)})')
  if not syntax:
    raise DicomError('no TransferSyntaxUID in the file meta information')
  try:
    decoder = dicom_pixels.get_decoder(syntax)
  except NotImplementedError:
    raise DicomError(f'pixel data in {syntax.name} ({syntax}), which pydicom '
                     'cannot decode') from None
  if not decoder.is_available:
    raise DicomError(
        f'{syntax.name} pixel data cannot be decoded here: no decoder '
        f'installed ({"; ".join(decoder.missing_dependencies)})')
  if not syntax.is_compressed and not syntax.is_deflated:
    expected = pixel_utils.get_expected_length(ds)
    if size - pixel_offset - 8 < expected:  # 8: the smallest element header.
      raise DicomError(f'truncated DICOM file: {max(size - pixel_offset, 0)} '
                       f'bytes after the pixel data tag, {expected} needed')
  frames = int(ds.get('NumberOfFrames') or 1)
  if frames < 1:
    raise DicomError(f'NumberOfFrames is {frames}')
  return Info(frames, *pixel_spacing(ds))


def read_frame(path: str, index: int = 0) -> tuple[np.ndarray, str | None]:
  """Decodes frame `index` (0-based) of a DICOM file as an 8-bit scan.

  Returns:
    ([H, W] uint8 image, a note on its conversion or None) as
    `hc18.read_grayscale`; see `to_grayscale`.

  Raises:
    DicomError: when the file or that frame cannot be read or decoded.
  """
  header = pydicom.Dataset()
  with _open(path) as f:
    try:
      meta = pydicom.filereader.read_file_meta_info(path)
      if meta.get('TransferSyntaxUID', pydicom.uid.UID('')).is_deflated:
        header = pydicom.dcmread(f)  # pydicom inflates whole datasets only.
        pixels = dicom_pixels.pixel_array(header, index=index)
      else:
        pixels = dicom_pixels.pixel_array(f, index=index, ds_out=header)
    except InvalidDicomError:
      raise DicomError("not a DICOM file (no 'DICM' marker after the "
                       '128-byte preamble)') from None
    except Exception as e:  # pylint: disable=broad-except  # Any decoder's.
      raise DicomError(
          f'frame {index} cannot be decoded: corrupt, truncated '
          f'or unsupported pixel data ({log.error_line(e)})') from None
  return to_grayscale(pixels, str(header.get('PhotometricInterpretation', '')),
                      int(header.get('BitsStored') or pixels.itemsize * 8),
                      bool(header.get('PixelRepresentation', 0)))


def to_grayscale(pixels: np.ndarray, photometric: str, bits_stored: int,
                 signed: bool = False) -> tuple[np.ndarray, str | None]:
  """One decoded frame as a `[H, W]` uint8 scan (see the module's doc).

  Args:
    pixels: `[H, W]` (grey) or `[H, W, 3]` (RGB) stored values.
    photometric: the file's PhotometricInterpretation.
    bits_stored: its BitsStored.
    signed: its PixelRepresentation is 1 (two's complement).

  Returns:
    (image, a note saying what was converted, or None).

  Raises:
    DicomError: for a shape or colour space it does not take.
  """
  colour = photometric in COLOUR
  if (pixels.ndim != (3 if colour else 2) or not pixels.size
      or (colour and pixels.shape[-1] != 3)):
    raise DicomError(f'unexpected decoded shape {pixels.shape} for '
                     f'{photometric or "no PhotometricInterpretation"}')
  if photometric not in GREY + COLOUR:
    raise DicomError(f'unsupported PhotometricInterpretation {photometric!r}')
  notes = []
  if bits_stored != 8 or signed or pixels.dtype != np.uint8:
    low = -(1 << (bits_stored - 1)) if signed else 0
    top = (1 << bits_stored) - 1
    scaled = (pixels.astype(np.float64) - low) * (255.0 / top)
    pixels = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if bits_stored != 8 or signed:
      notes.append(f'{bits_stored}-bit{" signed" if signed else ""} values '
                   f'rescaled to 8 bits ({low}..{low + top} -> 0..255)')
  if colour:
    rgb = pixels.astype(np.uint32)
    pixels = ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471
               + 0x8000) >> 16).astype(np.uint8)
    notes.append(f'{photometric} converted to 8-bit grayscale')
  elif photometric == 'MONOCHROME1':
    pixels = 255 - pixels
    notes.append('MONOCHROME1 inverted (0 is white)')
  return np.ascontiguousarray(pixels), '; '.join(notes) or None


def pixel_spacing(ds: pydicom.Dataset) -> tuple[float | None, str, str]:
  """A DICOM header's pixel size in mm (see the module's doc).

  Returns:
    (pixel size in mm or None, its source ('ultrasound_region',
    'PixelSpacing'; '' when None), why there is none ('' when there is)).
  """
  regions = list(ds.get('SequenceOfUltrasoundRegions') or [])
  if regions:
    region, unclear = _region(regions, int(ds.Rows), int(ds.Columns))
    if region is None:
      return None, '', f'no pixel size: {unclear}; HC in px only'
    units = (region.get('PhysicalUnitsXDirection'),
             region.get('PhysicalUnitsYDirection'))
    if units != (CM, CM):
      names = '/'.join(UNIT_NAMES.get(u, str(u)) for u in units)
      return None, '', (f'no pixel size: the ultrasound region is in {names}, '
                        'not cm; HC in px only')
    source = 'ultrasound_region'
    try:
      x, y = (abs(float(region.get(key))) * 10
              for key in ('PhysicalDeltaX', 'PhysicalDeltaY'))
    except (TypeError, ValueError):
      x = y = float('nan')
  elif len(ds.get('PixelSpacing') or ()) == 2:
    source = 'PixelSpacing'
    try:
      y, x = (float(v) for v in ds.PixelSpacing)
    except (TypeError, ValueError):
      x = y = float('nan')
  else:
    return None, '', ('no pixel size in the file (neither an ultrasound '
                      'region nor PixelSpacing); HC in px only')
  if not (np.isfinite([x, y]).all() and x > 0 and y > 0):
    return None, '', f'no pixel size: invalid {source} spacing; HC in px only'
  if abs(x - y) > MAX_ANISOTROPY * max(x, y):
    return None, '', (f'no pixel size: anisotropic pixels ({x:.4g} mm in x, '
                      f'{y:.4g} mm in y, from {source}); HC in px only')
  return (x + y) / 2, source, ''


def _region(regions: list, rows: int, columns: int
            ) -> tuple[pydicom.Dataset | None, str]:
  """(the ultrasound region of the image, '') or (None, why no region
  clearly holds the scan); see the module's doc."""
  def box(region):
    return [int(region.get(key) or 0) for key in (
        'RegionLocationMinX0', 'RegionLocationMinY0', 'RegionLocationMaxX1',
        'RegionLocationMaxY1')]

  centre_x, centre_y = (columns - 1) / 2, (rows - 1) / 2
  central = [r for r in regions
             if box(r)[0] <= centre_x <= box(r)[2]
             and box(r)[1] <= centre_y <= box(r)[3]]

  def in_cm(region):
    return (region.get('PhysicalUnitsXDirection') == CM
            and region.get('PhysicalUnitsYDirection') == CM)

  def rank(region):
    x0, y0, x1, y1 = box(region)
    return in_cm(region), (x1 - x0 + 1) * (y1 - y0 + 1)

  if not central:
    return None, (f'none of its {len(regions)} ultrasound region(s) holds '
                  'the image centre')
  spacings = []
  for region in filter(in_cm, central):
    try:
      spacings.append(abs(float(region.get('PhysicalDeltaX'))))
    except (TypeError, ValueError):
      pass
  if spacings and max(spacings) - min(spacings) > MAX_ANISOTROPY * max(
      spacings):
    return None, (f'{len(spacings)} ultrasound regions in cm hold the image '
                  'centre, with different spacings')
  return max(central, key=rank), ''
