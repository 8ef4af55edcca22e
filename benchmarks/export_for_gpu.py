"""Exports HC18's training images, resized, for the TensorFlow-free GPU path.

  python benchmarks/export_for_gpu.py --hc18_dir=/work/shared/hc18 \
      --image_size=224 --out=export/hc18_224.npz [--tfds_data_dir=DIR]

Builds (or reuses) the `hc18` TFDS data set, resizes the train split once as
`input_pipeline.prepare` does (bilinear with antialiasing, 'stretch' by
default, rounded to uint8) and writes, side by side:

  hc18_224.npz          the images and labels (`hc_jax.numpy_data` layout)
  hc18_224.folds.json   the fold assignment that `hc_jax.data` draws (seed 0,
                        5 folds, 10 % validation subjects, from the CSV's HC)
  hc18_224.export.json  how the export was made (size, mode, counts, seconds)

`benchmarks/gpu_grid.py` reads the first two on a machine without TensorFlow.
The training targets never depend on the image size: they are HC in pixels of
the original image (see `hc_jax.targets`).
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Run from a bare checkout too (no `pip install -e .`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hc_jax import folds as folds_lib  # pylint: disable=g-import-not-at-top
from hc_jax import hc18
from hc_jax import hc18_tfds
from hc_jax import input_pipeline
from hc_jax import targets

# The fold protocol of configs/default.py (num_folds, val_fraction, fold_seed).
NUM_FOLDS = 5
VAL_FRACTION = 0.1
FOLD_SEED = 0


def sidecar_paths(npz_path: str) -> dict[str, str]:
  """The files written next to an export: {'folds': ..., 'export': ...}."""
  stem = npz_path[:-len('.npz')] if npz_path.endswith('.npz') else npz_path
  return {'folds': stem + '.folds.json', 'export': stem + '.export.json'}


def export(hc18_dir: str | None, out: str, image_size: int,
           resize_mode: str = 'stretch', tfds_data_dir: str | None = None,
           num_folds: int = NUM_FOLDS, val_fraction: float = VAL_FRACTION,
           fold_seed: int = FOLD_SEED, compressed: bool = True) -> dict:
  """Writes the .npz, its fold assignment and a record of the export.

  Args:
    hc18_dir: HC18 in the Zenodo layout (None: `hc18.default_dir()`).
    out: the .npz path to write (its folder is created).
    image_size: side of the square images, in pixels.
    resize_mode: one of `targets.RESIZE_MODES`.
    tfds_data_dir: where the `hc18` TFDS data set is (built there if absent).
    num_folds: folds of the assignment.
    val_fraction: fraction of training subjects held out for validation.
    fold_seed: seed of the assignment.
    compressed: zip-deflate the arrays.

  Returns:
    The record written to the .export.json file.

  Raises:
    ValueError: for a bad resize mode, image size or a missing HC18 copy.
  """
  if resize_mode not in targets.RESIZE_MODES:
    raise ValueError(f'unknown resize_mode {resize_mode!r}; choose one of '
                     f'{", ".join(targets.RESIZE_MODES)}')
  if image_size < 8:
    raise ValueError(f'image_size must be at least 8, got {image_size}')
  if not out.endswith('.npz'):
    raise ValueError(f'--out must end in .npz, got {out!r}')
  hc18_dir = hc18_dir or hc18.default_dir()
  if not hc18_dir:
    raise ValueError('HC18 not found: pass --hc18_dir (the Zenodo layout)')
  # Without its CSV, TFDS would try to download HC18 instead.
  csv_name = hc18.SPLITS['train'][1]
  if not os.path.isfile(os.path.join(hc18_dir, csv_name)):
    raise ValueError(f'--hc18_dir={hc18_dir!r} holds no {csv_name}')
  start = time.perf_counter()
  builder = hc18_tfds.build(hc18_dir, tfds_data_dir)
  built = time.perf_counter()
  examples = builder.as_dataset(split='train')
  # As hc_jax.data.load: folds from the CSV's HC in mm, without decoding.
  meta = list(examples.map(lambda e: {'filename': e['filename'],
                                      'hc_mm': e['hc_mm']}
                           ).as_numpy_iterator())
  assignment = folds_lib.assign_folds(
      [m['filename'].decode() for m in meta], [float(m['hc_mm']) for m in meta],
      num_folds=num_folds, val_fraction=val_fraction, seed=fold_seed)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  paths = sidecar_paths(out)
  prepared = input_pipeline.prepare(examples, image_size, resize_mode)
  num_images = input_pipeline.export_numpy(prepared, out,
                                           compressed=compressed)
  assignment.to_json(paths['folds'])
  done = time.perf_counter()
  record = {
      'npz': os.path.basename(out), 'num_images': num_images,
      'image_size': image_size, 'resize_mode': resize_mode,
      'compressed': compressed, 'npz_bytes': os.path.getsize(out),
      'raw_image_bytes': num_images * image_size * image_size,
      'folds': {'num_folds': num_folds, 'val_fraction': val_fraction,
                'seed': fold_seed, 'file': os.path.basename(paths['folds'])},
      'hc18_dir': os.path.abspath(hc18_dir),
      'tfds_seconds': round(built - start, 1),
      'export_seconds': round(done - built, 1),
  }
  with open(paths['export'], 'w') as f:
    json.dump(record, f, indent=2)
    f.write('\n')
  return record


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--hc18_dir', default=None,
                      help='HC18 (Zenodo layout); default: $HC18_DIR or '
                      '../shared/hc18')
  parser.add_argument('--tfds_data_dir', default=None)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--resize_mode', default='stretch',
                      choices=targets.RESIZE_MODES)
  parser.add_argument('--out', default='export/hc18_224.npz')
  parser.add_argument('--uncompressed', action='store_true',
                      help='np.savez instead of np.savez_compressed')
  args = parser.parse_args()
  try:
    record = export(args.hc18_dir, args.out, args.image_size,
                    args.resize_mode, args.tfds_data_dir,
                    compressed=not args.uncompressed)
  except (ValueError, hc18.HC18Error) as error:
    sys.exit(f'export_for_gpu: {error}')
  mib = record['npz_bytes'] / 2**20
  print(f'{record["num_images"]} images at {args.image_size}x'
        f'{args.image_size} ({args.resize_mode}) -> {args.out}: {mib:.1f} MiB '
        f'({record["raw_image_bytes"] / 2**20:.1f} MiB of raw pixels); TFDS '
        f'{record["tfds_seconds"]} s, export {record["export_seconds"]} s')
  print(f'folds: {sidecar_paths(args.out)["folds"]}')


if __name__ == '__main__':
  main()
