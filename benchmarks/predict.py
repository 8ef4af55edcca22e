"""Inference latency and throughput, end to end from PNG file to HC in mm.

  python benchmarks/predict.py [--models=cnn_263k,cnn_1m,vgg16,resnet50]
      [--hc18_dir=DIR] [--num_images=50] [--batch_size=32] [--num_batches=3]

For each image: read the PNG (`hc18.read_grayscale`), resize to the model's
input size and round to uint8 as the training cache does, z-score
(`resize.resize`, `resize.to_uint8`, `normalise.zscore_tf`, in one
`tf.function`), run the jitted model in evaluation mode (built with `inference.LAYERS`, as
`hc_jax.predict` builds it), and convert the output to millimetres with
the image's pixel size (target x normaliser x pixel size).

Weights are randomly initialised (speed does not depend on them), so the HC
values are meaningless; `NORMALISER_PX` stands in for a run's normaliser.
Images are HC18's test set (the copy beside the checkout, $HC18_DIR or
--hc18_dir), or phantom scans when none is found.

Prints, per model: latency per image at batch 1 (p50 and p95 over
--num_images images, after a warm-up) with the median time of each stage, and
throughput in images per second at --batch_size, end to end.
"""

import argparse
import functools
import os
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from hc_jax import models
from hc_jax.data import hc18
from hc_jax.data import normalise
from hc_jax.data import phantom_set
from hc_jax.data import resize as resize_lib
from hc_jax.evaluation import inference

# Input side of each model (the configs' image_size).
SIZES = {'cnn_263k': 128, 'cnn_1m': 128, 'vgg16': 224, 'resnet50': 224}
# Stands in for a trained run's normaliser (the largest training HC in px).
NORMALISER_PX = 1000.0
WARMUP_IMAGES = 3


def test_images(hc18_dir: str | None, scratch: str) -> list[hc18.Record]:
  """HC18's test records, or phantom ones written under `scratch`."""
  if hc18_dir is None:
    hc18_dir = os.path.join(scratch, 'hc18')
    phantom_set.write_hc18(hc18_dir, num_train=4, num_test=40, seed=0)
    print(f'HC18 not found: using 40 phantom test scans in {hc18_dir}')
  records, problems = hc18.scan_split(hc18_dir, 'test')
  if problems:
    raise hc18.HC18Error(hc18_dir, problems)
  if not records:
    raise ValueError(f'no test images in {hc18_dir}')
  return records


class Predictor:
  """PNG file(s) to HC in mm with one model and random weights."""

  def __init__(self, model_name: str, resize_mode: str = 'stretch'):
    self.image_size = SIZES[model_name]
    model = models.create_model(model_name, layers=inference.LAYERS)
    self.variables = models.init_variables(
        model, jnp.zeros((1, self.image_size, self.image_size, 1)))
    self.apply = jax.jit(functools.partial(model.apply, train=False))

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.uint8)])
    def prepare(image):
      image = resize_lib.resize(image[:, :, None], self.image_size,
                                resize_mode)
      return normalise.zscore_tf(resize_lib.to_uint8(image))

    self.prepare = prepare

  def read(self, record: hc18.Record) -> np.ndarray:
    image, _ = hc18.read_grayscale(record.image_path)
    return image

  def hc_mm(self, images: np.ndarray, records) -> np.ndarray:
    """Model input `[B, S, S, 1]` -> HC in mm per image, as NumPy."""
    predictions = np.asarray(self.apply(self.variables, images))
    pixel_size_mm = np.array([r.pixel_size_mm for r in records])
    return predictions * NORMALISER_PX * pixel_size_mm

  def one(self, record: hc18.Record) -> tuple[float, dict[str, float]]:
    """HC in mm of one image, and the seconds spent in each stage."""
    times = {}
    start = time.perf_counter()
    image = self.read(record)
    times['read'] = time.perf_counter() - start
    start = time.perf_counter()
    model_input = self.prepare(image).numpy()[None]
    times['preprocess'] = time.perf_counter() - start
    start = time.perf_counter()
    hc_mm = float(self.hc_mm(model_input, [record])[0])
    times['model'] = time.perf_counter() - start
    return hc_mm, times

  def batch(self, records, threaded: bool = True) -> np.ndarray:
    """HC in mm of a batch of images, end to end.

    `threaded` reads and resizes the files on all cores, as `hc_jax.evaluation.inference`
    does; False does it one after another (the baseline).
    """
    read_prepare = lambda record: self.prepare(self.read(record)).numpy()
    if threaded:
      prepared = inference.parallel_map(read_prepare, records)
      for item in prepared:
        if isinstance(item, Exception):
          raise item
    else:
      prepared = [read_prepare(record) for record in records]
    return self.hc_mm(np.stack(prepared), records)


def measure(model_name: str, records, num_images: int, batch_size: int,
            num_batches: int) -> dict[str, float]:
  """Latency at batch 1 and throughput at `batch_size` for one model.

  Returns:
    {'p50_ms', 'p95_ms', 'read_ms', 'preprocess_ms', 'model_ms', 'img_per_s'}
    (stage times are medians at batch 1).
  """
  predictor = Predictor(model_name)
  cycle = lambda n, offset=0: [records[(offset + i) % len(records)]
                               for i in range(n)]
  for record in cycle(WARMUP_IMAGES):  # Compile and warm up.
    predictor.one(record)
  totals, stages = [], {'read': [], 'preprocess': [], 'model': []}
  for record in cycle(num_images, WARMUP_IMAGES):
    start = time.perf_counter()
    hc_mm, times = predictor.one(record)
    totals.append(time.perf_counter() - start)
    if not np.isfinite(hc_mm):
      raise FloatingPointError(f'{model_name}: non-finite HC for '
                               f'{record.filename}')
    for stage, seconds in times.items():
      stages[stage].append(seconds)
  predictor.batch(cycle(batch_size))  # Compile the batch shape.
  seconds = {True: 0.0, False: 0.0}
  for i in range(num_batches):  # Threaded and serial alternately.
    for threaded in (True, False):
      start = time.perf_counter()
      predictor.batch(cycle(batch_size, i * batch_size), threaded=threaded)
      seconds[threaded] += time.perf_counter() - start
  result = {'p50_ms': 1e3 * np.percentile(totals, 50),
            'p95_ms': 1e3 * np.percentile(totals, 95),
            'img_per_s': num_batches * batch_size / seconds[True],
            'serial_img_per_s': num_batches * batch_size / seconds[False]}
  for stage, seconds in stages.items():
    result[f'{stage}_ms'] = 1e3 * np.median(seconds)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='cnn_263k,cnn_1m,vgg16,resnet50')
  parser.add_argument('--hc18_dir', default=hc18.default_dir())
  parser.add_argument('--num_images', type=int, default=50,
                      help='images timed one by one at batch 1')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--num_batches', type=int, default=3)
  args = parser.parse_args()
  model_names = [m for m in args.models.split(',') if m]
  for name in model_names:
    if name not in SIZES:
      parser.error(f'unknown model {name!r}; choose from {", ".join(SIZES)}')
  if min(args.num_images, args.batch_size, args.num_batches) < 1:
    parser.error('--num_images, --batch_size and --num_batches must be >= 1')
  tf.config.set_visible_devices([], 'GPU')
  with tempfile.TemporaryDirectory() as scratch:
    records = test_images(args.hc18_dir, scratch)
    for name in model_names:
      size = SIZES[name]
      r = measure(name, records, args.num_images, args.batch_size,
                  args.num_batches)
      print(f'{name} {size}x{size}: batch 1 latency p50 {r["p50_ms"]:.1f} ms, '
            f'p95 {r["p95_ms"]:.1f} ms (median read {r["read_ms"]:.1f}, '
            f'preprocess {r["preprocess_ms"]:.1f}, model + mm '
            f'{r["model_ms"]:.1f} ms); batch {args.batch_size}: '
            f'{r["img_per_s"]:.1f} img/s (files read on '
            f'{inference.available_cores()} '
            f'threads; {r["serial_img_per_s"]:.1f} one after another: '
            f'{r["img_per_s"] / r["serial_img_per_s"]:.2f}x)', flush=True)


if __name__ == '__main__':
  main()
