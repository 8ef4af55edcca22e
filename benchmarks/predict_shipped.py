"""Per-scan time of the shipped ensemble, from PNG file to HC in mm.

  python benchmarks/predict_shipped.py [--model=hcnet_mask] [--hc18_dir=DIR]
      [--num_images=128] [--rounds=3]

Times what `python -m hc_jax.predict --images=DIR` does for a folder of
scans: start-up (`loading.load`: reading the archive, building the model,
TensorFlow's preprocessing graph) is reported apart; then, per round, every
scan is read from its PNG (`hc18.read_grayscale`) and the scans are
predicted in chunks of `prediction_rows.PROGRESS_EVERY` (resize, z-score,
the jitted model, the ellipse and HC in mm, statuses), as predict does. The
first chunk's compilation is a warm-up round, not timed.

The baseline, measured in the same process on the same scans, is one fold
model of the same archive: the ratio says what the five-model ensemble
costs over a single model. Scans are HC18's test set (the copy beside the
checkout, $HC18_DIR or --hc18_dir), else the shipped samples repeated.
"""

import argparse
import glob
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top

from hc_jax import archive as archive_lib
from hc_jax import cli
from hc_jax.data import hc18
from hc_jax.evaluation import loading
from hc_jax.evaluation import prediction_rows


def _scans(hc18_dir: str | None, count: int) -> list[str]:
  paths = []
  if hc18_dir:
    paths = sorted(glob.glob(os.path.join(hc18_dir, 'test_set', '*HC.png')))
  if not paths:
    paths = sorted(
        glob.glob(os.path.join(archive_lib.SAMPLE_IMAGES_DIR, '*.png')))
  return [paths[i % len(paths)] for i in range(count)]


def _time_predictor(predictor, paths: list[str], rounds: int) -> list[float]:
  """Seconds per scan of each round (reading and predicting)."""
  per_scan = []
  for round_index in range(rounds + 1):  # Round 0 compiles: not timed.
    start = time.perf_counter()
    for first in range(0, len(paths), prediction_rows.PROGRESS_EVERY):
      chunk = paths[first:first + prediction_rows.PROGRESS_EVERY]
      images = [hc18.read_grayscale(path)[0] for path in chunk]
      out = predictor(images, [0.1] * len(images))
      assert np.isfinite(out['hc_mm']).all()
    if round_index:
      per_scan.append((time.perf_counter() - start) / len(paths))
  return per_scan


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default=archive_lib.DEFAULT_MODEL)
  parser.add_argument('--hc18_dir', default=hc18.default_dir())
  parser.add_argument('--num_images', type=int, default=128)
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()
  cli.quiet_logs()
  paths = _scans(args.hc18_dir, args.num_images)
  start = time.perf_counter()
  ensemble = loading.load(model=args.model)
  startup = time.perf_counter() - start
  archive = archive_lib.read(args.model)
  single = loading.load(archive.runs[0])
  results = {}
  for name, predictor in (('one fold model', single),
                          (f'ensemble of {len(archive.members)}', ensemble)):
    results[name] = _time_predictor(predictor, paths, args.rounds)
  print(f'{args.model}: {len(paths)} scans, {args.rounds} rounds; start-up '
        f'(loading.load of the ensemble) {startup:.1f} s')
  for name, per_scan in results.items():
    print(f'  {name}: {1e3 * np.median(per_scan):.1f} ms per scan '
          f'[{1e3 * min(per_scan):.1f}-{1e3 * max(per_scan):.1f}]')
  base, ens = (np.median(v) for v in results.values())
  print(f'  ensemble / one model: {ens / base:.2f}x the time per scan')


if __name__ == '__main__':
  main()
