"""Throughput of the training batches: tf.data against plain NumPy.

  python benchmarks/input_pipeline.py [--hc18_dir=DIR] [--image_size=128]
      [--batch_size=8] [--members=1] [--epochs=3] [--backends=numpy,tf]

Reads HC18 (the copy beside the checkout, $HC18_DIR or --hc18_dir; 300
phantom scans when none is found), prepares it once (`hc_jax.data.cache`,
cached), then times whole epochs of `hc_jax.data.RunData.train_batches` with
each backend: 'tf' gathers in a tf.data pipeline that prefetches in the
background, 'numpy' gathers in the loop. Both yield the same batches (uint8
images, targets and resize geometry of `--members` members, folds 0, 1, ...);
the augmentation runs later, on the accelerator, and is not timed here. The
first epoch of each backend is a warm-up and not counted. Prints batches and
images per second, images per CPU-second (which another job on the machine
disturbs less), and each backend's ratio to NumPy measured in the same run.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import default
from hc_jax.data import hc18
from hc_jax.data import phantom_set
from hc_jax.data import pipeline

BACKENDS = ('numpy', 'tf')


def time_epochs(run_data, backend: str, epochs: int
                ) -> tuple[float, float, int, int]:
  """Wall seconds, CPU seconds (all threads), batches and images of
  `epochs` epochs (from epoch 2; epoch 1 is the warm-up)."""
  for _ in run_data.train_batches(1, backend):
    pass
  batches = images = 0
  start, start_cpu = time.perf_counter(), time.process_time()
  for epoch in range(2, epochs + 2):
    for batch in run_data.train_batches(epoch, backend):
      batches += 1
      images += int(batch['image'].shape[0] * batch['image'].shape[1])
  return (time.perf_counter() - start, time.process_time() - start_cpu,
          batches, images)


def _fail(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--hc18_dir', default=hc18.default_dir())
  parser.add_argument('--cache_dir', default='',
                      help="prepared arrays ('' for ~/.cache/hc_jax)")
  parser.add_argument('--image_size', type=int, default=128)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--members', type=int, default=1,
                      help='members of the run (test folds 0, 1, ...)')
  parser.add_argument('--epochs', type=int, default=3,
                      help='timed epochs per backend')
  parser.add_argument('--backends', default='numpy,tf')
  args = parser.parse_args(argv)
  backends = [b for b in args.backends.split(',') if b]
  backends = sorted(set(backends), key=lambda b: (BACKENDS + (b,)).index(b))
  if not backends or any(b not in BACKENDS for b in backends):
    _fail(f'--backends takes {", ".join(BACKENDS)}; got {args.backends!r}')
  if not 1 <= args.members <= 5:
    _fail(f'--members must be 1 to 5 (one per test fold), got {args.members}')
  for name in ('image_size', 'batch_size', 'epochs'):
    if getattr(args, name) < 1:
      _fail(f'--{name} must be positive, got {getattr(args, name)}')
  scratch = tempfile.mkdtemp(prefix='input_pipeline_')
  source, cache_dir = args.hc18_dir, args.cache_dir
  if source is None:
    source = os.path.join(scratch, 'hc18')
    phantom_set.write_hc18(source, num_train=300, num_test=4)
    cache_dir = cache_dir or os.path.join(scratch, 'cache')
    print('HC18 not found: using 300 phantom scans')
  configs, workdirs = [], []
  for fold in range(args.members):
    config = default.get_config()
    config.data.hc18_dir, config.data.cache_dir = source, cache_dir
    config.image_size, config.batch_size = args.image_size, args.batch_size
    config.fold = fold
    configs.append(config)
    workdirs.append(os.path.join(scratch, f'fold{fold}'))
  start = time.perf_counter()
  try:
    run_data = pipeline.load(configs, workdirs)
  except ValueError as e:  # hc18.HC18Error and prepare.PreparedError too.
    _fail(str(e))
  print(f'{len(run_data.arrays["images"])} scans at {args.image_size}x'
        f'{args.image_size} ready in {time.perf_counter() - start:.1f} s; '
        f'{args.members} member(s), batch {args.batch_size}, '
        f'{int(run_data.steps.max())} steps per epoch', flush=True)
  rates = {}
  for backend in backends:
    seconds, cpu_seconds, batches, images = time_epochs(run_data, backend,
                                                        args.epochs)
    rates[backend] = batches / seconds
    ratio = (f', {rates[backend] / rates["numpy"]:.3g}x numpy'
             if 'numpy' in rates else '')
    print(f'{backend}: {rates[backend]:,.1f} batches/s '
          f'({images / seconds:,.0f} img/s, '
          f'{images / max(cpu_seconds, 1e-9):,.0f} img per CPU-second)'
          f'{ratio}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
