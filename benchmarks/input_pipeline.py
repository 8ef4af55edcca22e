"""Throughput of the tf.data training pipeline: cached, augmented, batched.

  python benchmarks/input_pipeline.py [--hc18_dir=DIR] [--image_size=224]
      [--batch_size=32]

Reads HC18 (the copy beside the checkout, $HC18_DIR or --hc18_dir; phantom
scans when none is found), prepares the train split once (decode, resize,
cache), then times full passes of `input_pipeline.train_dataset` with the
paper's augmentation. The first pass fills the cache and is reported apart.
Prints images per second (and per CPU-second, which another job on the
machine disturbs less), and the ratio against the un-augmented pipeline
measured in the same run as the baseline.
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from hc_jax import hc18  # pylint: disable=g-import-not-at-top
from hc_jax import hc18_tfds
from hc_jax import input_pipeline
from hc_jax import synthetic


def time_passes(dataset, passes: int) -> tuple[float, float, int]:
  """Wall seconds, CPU seconds (all threads) and images, per pass."""
  images = 0
  start, start_cpu = time.perf_counter(), time.process_time()
  for _ in range(passes):
    for batch in dataset:
      images += int(batch['image'].shape[0])
  return ((time.perf_counter() - start) / passes,
          (time.process_time() - start_cpu) / passes, images // passes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--hc18_dir', default=hc18.default_dir())
  parser.add_argument('--tfds_data_dir', default=None)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--passes', type=int, default=3)
  args = parser.parse_args()
  scratch = tempfile.mkdtemp()
  source = args.hc18_dir
  if source is None:
    source = os.path.join(scratch, 'hc18')
    synthetic.write_hc18(source, num_train=300, num_test=4)
    print('HC18 not found: using 300 phantom scans')
  builder = hc18_tfds.build(source, args.tfds_data_dir or
                            os.path.join(scratch, 'tfds'))
  prepared = input_pipeline.prepare(builder.as_dataset(split='train'),
                                    args.image_size, 'stretch').cache()
  start = time.perf_counter()
  count = sum(1 for _ in prepared)
  print(f'{count} images decoded, resized to {args.image_size}x'
        f'{args.image_size} and cached in {time.perf_counter() - start:.1f} s')
  paper = {'flip': True, 'max_translate_px': 5.0, 'max_rotate_deg': 10.0}
  rates = {}
  for name, augment in (('no augmentation (baseline)', None),
                        ("paper's augmentation", paper),
                        ('paper + scale 0.9-1.1', {**paper,
                                                   'scale_range': (0.9, 1.1)})):
    dataset = input_pipeline.train_dataset(
        prepared, batch_size=args.batch_size, normaliser_px=1000.0, seed=0,
        augment=augment, num_epochs=1)
    time_passes(dataset, 1)  # Warm up: fills train_dataset's own cache.
    seconds, cpu_seconds, images = time_passes(dataset, args.passes)
    rates[name] = images / seconds
    baseline = next(iter(rates.values()))
    # Images per CPU-second counts the work whatever else shares the machine.
    print(f'{name}: {rates[name]:,.0f} img/s '
          f'({rates[name] / baseline:.2f}x baseline), '
          f'{images / cpu_seconds:,.0f} img per CPU-second, batch '
          f'{args.batch_size}')


if __name__ == '__main__':
  main()
