"""HC18 as a TensorFlow Datasets builder.

  from hc_jax.data import hc18_tfds
  builder = hc18_tfds.build(manual_dir='path/to/hc18', data_dir='~/tfds')
  train = builder.as_dataset(split='train')

The builder reads a manual directory in the Zenodo layout (folders
`training_set/` and `test_set/`, or the Zenodo zips `training_set.zip` and
`test_set.zip`, beside the two CSVs) and, without one, downloads those files
from Zenodo record 1327317. Every file is checked before anything is written
(`hc_jax.data.hc18.scan`); a bad copy ends the build with one error listing every
bad file, and TFDS's incomplete-directory rename leaves nothing half written.
"""

import math
import os

import numpy as np
import tensorflow_datasets as tfds

from hc_jax.data import hc18

_DESCRIPTION = """
HC18: 2D fetal ultrasound scans with the sonographer's head-circumference
ellipse (van den Heuvel et al., PLoS ONE 2018). `train` holds the annotated
scans with their HC and the reference ellipse fitted to the annotation outline;
`test` holds the challenge test scans, whose ground truth is not published (its
HC and ellipse fields are NaN). Images keep their original size (mostly
800x540).
"""

_CITATION = """
@article{van2018automated,
  title={Automated measurement of fetal head circumference using 2D ultrasound images},
  author={van den Heuvel, Thomas L. A. and de Bruijn, Dagmar and de Korte, Chris L. and van Ginneken, Bram},
  journal={PLoS ONE}, volume={13}, number={8}, pages={e0200412}, year={2018}
}
"""

_MANUAL_INSTRUCTIONS = """
Download from https://zenodo.org/records/1327317 the files training_set.zip,
test_set.zip, training_set_pixel_size_and_HC.csv and test_set_pixel_size.csv
into one directory (zips may be left zipped or extracted to training_set/ and
test_set/), and pass it as the manual directory.
"""

ELLIPSE_KEYS = ('center_x', 'center_y', 'semi_axis_a', 'semi_axis_b',
                'angle_rad')


class Hc18(tfds.core.GeneratorBasedBuilder):
  """HC18 fetal head circumference data set."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'First release: original-size 1-channel images, subject_id, '
               'frame, pixel size, HC in mm and px, reference ellipse.',
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS

  # TFDS prints these two lines to stdout on every build ("Downloading and
  # preparing dataset Unknown size ..."); the commands' own output says what
  # is being built.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    scalar = lambda dtype: tfds.features.Scalar(dtype=dtype)  # pylint: disable=unnecessary-lambda-assignment
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 1),
                                         dtype=np.uint8,
                                         encoding_format='png'),
            'filename': tfds.features.Text(),
            'subject_id': scalar(np.int32),
            'frame': scalar(np.int32),
            'pixel_size_mm': scalar(np.float32),
            'hc_mm': scalar(np.float32),
            'hc_px': scalar(np.float32),
            'ellipse': tfds.features.FeaturesDict(
                {key: scalar(np.float32) for key in ELLIPSE_KEYS}),
        }),
        supervised_keys=('image', 'hc_mm'),
        homepage='https://hc18.grand-challenge.org/',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    root, image_dirs = _locate_files(dl_manager)
    records, problems = {}, []
    for split in hc18.SPLITS:
      records[split], split_problems = hc18.scan_split(
          root, split, image_dir=image_dirs.get(split))
      problems += split_problems
    if problems:
      raise hc18.HC18Error(root, problems)
    return {split: self._generate_examples(split_records)
            for split, split_records in records.items()}

  def _generate_examples(self, records):
    for record in records:
      image, _ = hc18.read_grayscale(record.image_path)
      if record.ellipse is None:
        ellipse = {key: math.nan for key in ELLIPSE_KEYS}
      else:
        ellipse = record.ellipse.as_dict()
      yield record.filename, {
          'image': image[..., None],
          'filename': record.filename,
          'subject_id': record.subject_id,
          'frame': record.frame,
          'pixel_size_mm': record.pixel_size_mm,
          'hc_mm': record.hc_mm,
          'hc_px': record.hc_px,
          'ellipse': ellipse,
      }


def _locate_files(dl_manager) -> tuple[str, dict[str, str]]:
  """Finds the CSVs and image folders: manual directory first, else Zenodo.

  Returns:
    (directory holding the CSVs, {split: image folder} for splits whose images
    come from an extracted zip rather than `root/<split folder>`).
  """
  try:
    root = os.fspath(dl_manager.manual_dir)
  except AssertionError:  # No manual directory given, or an empty one.
    root = None
  if root is None:
    try:
      paths = dl_manager.download_and_extract(
          {name: hc18.ZENODO_RECORD + name + '?download=1'
           for name in hc18.ZENODO_FILES})
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f'Could not download HC18 from Zenodo ({type(e).__name__}: '
          f'{" ".join(str(e).split())}). Downloads are verified against '
          'hc_jax/data/checksums.tsv (see its header).'
          f'{" ".join(_MANUAL_INSTRUCTIONS.split())}') from None
    return _from_download(paths)
  image_dirs = {}
  for split, (folder, _) in hc18.SPLITS.items():
    zip_path = os.path.join(root, folder + '.zip')
    if not os.path.isdir(os.path.join(root,
                                      folder)) and os.path.isfile(zip_path):
      image_dirs[split] = _images_in(os.fspath(dl_manager.extract(zip_path)),
                                     folder)
  return root, image_dirs


def _from_download(paths) -> tuple[str, dict[str, str]]:
  """Lays downloaded files out as a manual directory would be."""
  root = os.path.dirname(os.fspath(paths['training_set_pixel_size_and_HC.csv']))
  # Downloads are stored under checksummed names; link them by their names.
  staged = os.path.join(root, 'hc18_staged')
  os.makedirs(staged, exist_ok=True)
  for _, csv_name in hc18.SPLITS.values():
    target = os.path.join(staged, csv_name)
    if not os.path.exists(target):
      os.symlink(os.fspath(paths[csv_name]), target)
  image_dirs = {split: _images_in(os.fspath(paths[folder + '.zip']), folder)
                for split, (folder, _) in hc18.SPLITS.items()}
  return staged, image_dirs


def _images_in(extracted: str, folder: str) -> str:
  """The Zenodo zips hold a top folder named like the split; accept both."""
  inner = os.path.join(extracted, folder)
  return inner if os.path.isdir(inner) else extracted


def build(manual_dir: str | None, data_dir: str | None = None,
          ) -> tfds.core.DatasetBuilder:
  """Builds HC18 (once; later calls reuse the prepared files).

  Args:
    manual_dir: an HC18 directory in the Zenodo layout, or None to download.
    data_dir: where TFDS keeps prepared data sets (TFDS's default when None).

  Returns:
    The prepared builder; `builder.as_dataset(split='train')`.

  Raises:
    hc18.HC18Error: listing every bad file of a broken copy.
  """
  builder = Hc18(data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir,
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
        # Zenodo downloads must match hc_jax/data/checksums.tsv (size, sha256).
        force_checksums_validation=True))
  return builder
