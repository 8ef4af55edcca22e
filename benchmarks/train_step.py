"""Images per second of the full training step, hc_jax against Keras/TensorFlow.

  python benchmarks/train_step.py --models=cnn_263k,cnn_1m --batch_sizes=8,32
      [--seconds=5] [--min_steps=3] [--rounds=2] [--image_size=S|HxW]
      [--variants=keras,hc_jax,hc_jax+malloc]

Models: the paper's cnn_263k, cnn_1m, vgg16, resnet50 and hc_jax's own hcnet
and hcnet_ellipse (built with their config files' input size and
model_options, see `benchmarks/keras_models.py`).

One step is forward, MSE, gradient and Adam (lr 1e-3) on a fixed random batch
at the model's configured input size (`SIZES`; `--image_size` overrides it
for every model, as one side or HxW). hc_jax times the jitted
`hc_jax.training.step.train_step` (state donated) on a valid random batch (540x800
originals stretched to the input, random head ellipses and their HC), with no
augmentation; Keras times `train_on_batch` on the twin model from
`benchmarks/keras_models.py`, compiled with Adam(1e-3) and 'mse' (no XLA:
Keras' default on a CPU).

For hcnet_ellipse the two losses differ: hc_jax's step is its real one (the
six outputs decoded to an ellipse, the HC computed from it, MSE on the HC
plus the config's `ellipse_weight` x the shape term, `hc_jax.nets.ellipse_head`),
while Keras fits the six raw outputs to random targets with plain MSE. That
loss works on 6 numbers per image, so the step's cost is the convolutions'
either way, and the difference, if any, is charged to hc_jax.

Every figure comes from a fresh subprocess, so each framework runs under its
own allocator settings (`VARIANTS`: '+malloc' sets GLIBC_TUNABLES to
`MALLOC_TUNABLES`). On a 2-core CPU the same setting varies by ±20 % from
process to process, so the variants run alternately, in a rotated order, for
`--rounds` rounds. Each figure is printed as it comes; a summary gives the
median per variant and the ratio of the best hc_jax variant to the best Keras
variant.

Models at 224x224 (vgg16, resnet50) take seconds per step on a CPU: each
measurement runs for `--seconds` but at least `--min_steps` steps.

`--breakdown` instead times, in this process, hc_jax's forward pass (train
mode), forward + gradient, and the full step, to show where the time goes.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # Run as a script from anywhere.
  sys.path.insert(0, REPO)
BENCHMARKS = os.path.join(REPO, 'benchmarks')
if BENCHMARKS not in sys.path:
  sys.path.insert(0, BENCHMARKS)

import keras_models  # pylint: disable=wrong-import-position

# Input of each model: one side, or (height, width) (see keras_models.SIZES).
SIZES = keras_models.SIZES
# The HC normaliser of the hc_jax batch: HC18's largest training HC, in px.
NORMALISER_PX = 1786.5

# glibc malloc settings that keep XLA's large per-step buffers in the heap
# instead of a fresh mmap (and page faults) for each: one arena, no mmap, no
# trimming. Must be set before the process starts.
MALLOC_TUNABLES = ('glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
                   'glibc.malloc.trim_threshold=4000000000')

# Variant name -> (framework, extra environment). A value of None removes the
# variable. 'keras+xla' compiles the Keras step with XLA (jit_compile=True);
# 'hc_jax+mallopt' sets the same malloc options as '+malloc' from inside the
# process, with `mallopt`, before JAX runs; 'hc_jax_plain' is hc_jax without
# `hc_jax.nets.fast_layers` (models' `layers='plain'`).
VARIANTS = {
    'hc_jax': ('hc_jax', {'GLIBC_TUNABLES': None}),
    'hc_jax+malloc': ('hc_jax', {'GLIBC_TUNABLES': MALLOC_TUNABLES}),
    'hc_jax+mallopt': ('hc_jax_mallopt', {'GLIBC_TUNABLES': None}),
    'hc_jax_plain': ('hc_jax_plain', {'GLIBC_TUNABLES': None}),
    'hc_jax_plain+malloc': ('hc_jax_plain',
                            {'GLIBC_TUNABLES': MALLOC_TUNABLES}),
    'keras': ('keras', {'GLIBC_TUNABLES': None}),
    'keras+malloc': ('keras', {'GLIBC_TUNABLES': MALLOC_TUNABLES}),
    'keras+xla': ('keras_xla', {'GLIBC_TUNABLES': None}),
}
RESULT_PREFIX = 'RESULT '


def parse_size(text: str) -> tuple[int, int]:
  """'S' or 'HxW' -> (height, width), for `--image_size`."""
  parts = text.lower().split('x')
  if len(parts) > 2 or not all(part.isdigit() for part in parts):
    raise argparse.ArgumentTypeError(
        f'takes a side S or HxW, e.g. 128 or 128x192; got {text!r}')
  return int(parts[0]), int(parts[-1])


def _random_batch(batch_size: int, image_size, outputs: int = 1):
  """A fixed batch of random images `[B, H, W, 1]` and targets.

  Args:
    batch_size: images in the batch.
    image_size: the input's side, or (height, width).
    outputs: values per target.

  Returns:
    (float32 images, float32 targets `[B]` for one output, else
    `[B, outputs]`).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  height, width = keras_models.as_hw(image_size)
  images = rng.normal(size=(batch_size, height, width, 1))
  targets = rng.uniform(0.2, 1.0, (batch_size, outputs))
  if outputs == 1:
    targets = targets[:, 0]
  return images.astype(np.float32), targets.astype(np.float32)


def hc_jax_batch(batch_size: int, image_size) -> dict:
  """A valid random batch for `hc_jax.training.step.train_step`, any model.

  The images of `_random_batch`; HC18-sized (540x800) originals stretched to
  the input, random head ellipses in original pixels and their HC.

  Args:
    batch_size: images in the batch.
    image_size: the input's side, or (height, width).

  Returns:
    {'image', 'ellipse', 'hc_px', 'resize'} as NumPy arrays.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  # pylint: disable=import-outside-toplevel
  from hc_jax.data import cache as cache_lib
  from hc_jax.data import ellipse as ellipse_lib
  # pylint: enable=import-outside-toplevel
  images, _ = _random_batch(batch_size, image_size)
  rng = np.random.default_rng(1)
  semi_a = rng.uniform(90.0, 280.0, batch_size)
  semi_b = rng.uniform(0.7, 0.95, batch_size) * semi_a
  ellipse = np.stack([rng.uniform(300.0, 500.0, batch_size),
                      rng.uniform(200.0, 340.0, batch_size), semi_a, semi_b,
                      rng.uniform(0.0, math.pi, batch_size)], 1)
  hc_px = ellipse_lib.ramanujan_perimeter(semi_a, semi_b)
  resize = cache_lib.resize_geometry([[540, 800]] * batch_size,
                                     keras_models.as_hw(image_size), 'stretch')
  return {'image': images, 'ellipse': ellipse.astype(np.float32),
          'hc_px': hc_px.astype(np.float32),
          'resize': np.asarray(resize, np.float32)}


def _time_steps(step, seconds: float, min_steps: int,
                sync=lambda: None) -> tuple[int, float]:
  """Runs `step()` for at least `seconds` and `min_steps`; (steps, seconds).

  `sync()`, called once at the end, waits for the last step.
  """
  count, start = 0, time.perf_counter()
  while count < min_steps or time.perf_counter() - start < seconds:
    step()
    count += 1
  sync()
  return count, time.perf_counter() - start


def _loss_of(model_name: str):
  """The model kind's loss of `hc_jax.training.step.train_step` (None for kind 'hc'),
  with the config's settings for a model in `keras_models.CONFIGS`."""
  # pylint: disable=import-outside-toplevel
  import ml_collections
  from hc_jax import models
  from hc_jax.training import step as step_lib
  # pylint: enable=import-outside-toplevel
  if model_name in keras_models.CONFIGS:
    config = keras_models.load_config(model_name)
  else:
    config = ml_collections.ConfigDict({'model': model_name})
  if models.output_kind(config) == 'hc':
    return None
  return step_lib.output_functions(config)[0]


def hc_jax_state_step_batch(model_name: str, batch_size: int, size,
                            fast_layers: bool = True):
  """hc_jax's train state, its jitted MSE train step and a random batch.

  Args:
    model_name: a key of `SIZES`.
    batch_size: images per step.
    size: the input's side, or (height, width).
    fast_layers: `hc_jax.nets.fast_layers` ('fast') or the 'plain' layers.

  Returns:
    (state, step, batch): `step(state, batch) -> (state, loss)` is the jitted
    `hc_jax.training.step.train_step` with the state donated.
  """
  # pylint: disable=import-outside-toplevel
  import functools
  import jax
  import jax.numpy as jnp
  import optax
  from hc_jax import losses
  from hc_jax import models
  from hc_jax.data import augment
  from hc_jax.training import step as step_lib
  # pylint: enable=import-outside-toplevel
  height, width = keras_models.as_hw(size)
  model = keras_models.flax_model(model_name,
                                  layers='fast' if fast_layers else 'plain')
  variables = models.init_variables(model, jnp.zeros((1, height, width, 1)))
  state = step_lib.TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      batch_stats=variables.get('batch_stats', {}), tx=optax.adam(1e-3))
  # No augmentation (only the z-score, as in evaluation), so the step is the
  # model's.
  member = {'key': jax.random.key(1),
            'normaliser_px': jnp.float32(NORMALISER_PX)}
  step = jax.jit(functools.partial(
      step_lib.train_step, member=member, loss_fn=losses.mse,
      augment=augment.AugmentConfig(flip=False, max_translate_px=0.0,
                                    max_rotate_deg=0.0),
      loss_of=_loss_of(model_name)), donate_argnums=(0,))
  batch = jax.device_put(hc_jax_batch(batch_size, (height, width)))
  return state, step, batch


def _hc_jax_step(model_name: str, batch_size: int, size,
                 fast_layers: bool = True):
  """hc_jax's jitted train step on a random batch: (step fn, sync fn)."""
  import jax  # pylint: disable=import-outside-toplevel
  state, train_step, batch = hc_jax_state_step_batch(
      model_name, batch_size, size, fast_layers)
  holder = {'state': state, 'metrics': None}

  def step():
    previous = holder['metrics']
    holder['state'], holder['metrics'] = train_step(holder['state'], batch)
    # At most one step queued behind the running one (as in a training loop
    # that reads the loss), so a timing window ends when its steps do.
    jax.block_until_ready(previous)

  def last_loss():
    jax.block_until_ready(holder['metrics'])
    return float(holder['metrics'])

  return step, last_loss


def _keras_step(model_name: str, batch_size: int, size, jit_compile: bool):
  """Keras' `train_on_batch` on the twin model: (step fn, sync fn).

  The sync fn returns the last step's loss.
  """
  import keras  # pylint: disable=import-outside-toplevel
  model = keras_models.create_model(model_name, size)
  model.compile(optimizer=keras.optimizers.Adam(1e-3), loss='mse',
                jit_compile=jit_compile)
  if len(model.output.shape) == 4:  # A mask model: BCE on its logit map.
    import numpy as np  # pylint: disable=import-outside-toplevel
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    images, _ = _random_batch(batch_size, size)
    target = (np.random.default_rng(2).uniform(
        size=(batch_size,) + tuple(model.output.shape[1:])) > 0.7).astype(
            np.float32)
  else:
    outputs = int(model.output.shape[-1])
    images, target = _random_batch(batch_size, size, outputs)
    if outputs == 1:
      target = target[:, None]  # Keras' model outputs [batch, 1].
  holder = {'loss': None}

  def step():
    # train_on_batch returns the loss as a NumPy value, so each step is
    # synced.
    holder['loss'] = model.train_on_batch(images, target)

  return step, lambda: float(holder['loss'])


def _mallopt() -> None:
  """`MALLOC_TUNABLES` through glibc's `mallopt` (`hc_jax.cpu.tune_malloc`)."""
  from hc_jax import cpu  # pylint: disable=import-outside-toplevel
  if not cpu.tune_malloc():
    raise OSError('mallopt failed (not glibc?)')


def run_worker(framework: str, model_name: str, batch_size: int, size,
               seconds: float, min_steps: int) -> dict:
  """Times one framework on one model and batch size in this process.

  Args:
    framework: 'hc_jax', 'hc_jax_mallopt', 'hc_jax_plain', 'keras' or
      'keras_xla'.
    model_name: a key of `SIZES`.
    batch_size: images per step.
    size: the input's side, or (height, width).
    seconds: least timing window after warm-up.
    min_steps: least number of timed steps.

  Returns:
    {'img_per_s', 'steps', 'seconds', 'warmup_s', 'loss'} ('loss': the last
    step's).

  Raises:
    FloatingPointError: when the last loss is NaN or infinite (the figure
      would time a broken step).
  """
  start = time.perf_counter()
  if framework == 'hc_jax_mallopt':
    _mallopt()
    framework = 'hc_jax'
  if framework.startswith('hc_jax'):
    step, sync = _hc_jax_step(model_name, batch_size, size,
                              fast_layers=framework != 'hc_jax_plain')
  else:
    step, sync = _keras_step(model_name, batch_size, size,
                             jit_compile=framework == 'keras_xla')
  for _ in range(2):  # Compile (or trace) and warm up.
    step()
  sync()
  warmup_s = time.perf_counter() - start
  steps, elapsed = _time_steps(step, seconds, min_steps, sync)
  loss = sync()
  if not math.isfinite(loss):
    raise FloatingPointError(f'{framework} {model_name}: the loss is {loss} '
                             f'after {steps + 2} steps')
  return {'img_per_s': steps * batch_size / elapsed, 'steps': steps,
          'seconds': elapsed, 'warmup_s': warmup_s, 'loss': loss}


def run_in_subprocess(variant: str, model_name: str, batch_size: int,
                      size, seconds: float, min_steps: int) -> dict:
  """Runs `run_worker` for `variant` in a fresh Python with its environment."""
  framework, env_changes = VARIANTS[variant]
  env = dict(os.environ)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  for key, value in env_changes.items():
    if value is None:
      env.pop(key, None)
    else:
      env[key] = value
  command = [sys.executable, os.path.abspath(__file__), '--worker', framework,
             '--models', model_name, '--batch_sizes', str(batch_size),
             '--image_size', keras_models.hw_label(size),
             '--seconds', str(seconds), '--min_steps', str(min_steps)]
  result = subprocess.run(command, env=env, capture_output=True, text=True,
                          check=False)
  for line in result.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  raise RuntimeError(f'{variant} {model_name} batch {batch_size} failed '
                     f'(exit {result.returncode}):\n{result.stderr[-3000:]}')


def compare(model_names, batch_sizes, variants, seconds: float,
            min_steps: int, rounds: int, image_size=None) -> dict:
  """Runs every variant alternately, `rounds` times; prints and returns rates.

  Args:
    model_names: keys of `SIZES`.
    batch_sizes: images per step, each timed.
    variants: keys of `VARIANTS`.
    seconds: least timing window per measurement.
    min_steps: least number of timed steps per measurement.
    rounds: times each variant is measured.
    image_size: None for each model's `SIZES`, or one side or (height,
      width) for every model.

  Returns:
    {(model, 'HxW', batch_size): {variant: [img/s per round]}}.
  """
  sizes = {m: image_size or SIZES[m] for m in model_names}
  rates = {(m, keras_models.hw_label(sizes[m]), b): {v: [] for v in variants}
           for m in model_names for b in batch_sizes}
  for round_index in range(rounds):
    # Rotate the order each round so no variant always runs first.
    shift = round_index % len(variants)
    order = variants[shift:] + variants[:shift]
    for model_name in model_names:
      size, label = sizes[model_name], keras_models.hw_label(sizes[model_name])
      for batch_size in batch_sizes:
        for variant in order:
          result = run_in_subprocess(variant, model_name, batch_size, size,
                                     seconds, min_steps)
          rates[model_name, label, batch_size][variant].append(
              result['img_per_s'])
          print(f'round {round_index + 1} {variant:14s} {model_name} '
                f'{label} batch {batch_size}: '
                f'{result["img_per_s"]:8.2f} img/s ({result["steps"]} steps in '
                f'{result["seconds"]:.1f} s, warm-up '
                f'{result["warmup_s"]:.0f} s)',
                flush=True)
  return rates


def summarise(rates: dict) -> None:
  """Prints the median and range per variant, and hc_jax/Keras ratios."""
  print('\nSummary (median [min-max] img/s over rounds):')
  for (model_name, size, batch_size), by_variant in rates.items():
    medians = {v: statistics.median(r) for v, r in by_variant.items() if r}
    fmt = lambda x: f'{x:.1f}' if x >= 10 else f'{x:.2f}'
    cells = [f'{v} {fmt(medians[v])} [{fmt(min(r))}-{fmt(max(r))}]'
             for v, r in by_variant.items() if r]
    line = f'{model_name} {size} batch {batch_size}: ' + '; '.join(cells)
    jax_best = max((m for v, m in medians.items()
                    if VARIANTS[v][0].startswith('hc_jax')), default=None)
    keras_best = max((m for v, m in medians.items()
                      if VARIANTS[v][0].startswith('keras')), default=None)
    if jax_best and keras_best:
      line += f'; hc_jax/Keras (best of each) {jax_best / keras_best:.2f}'
    print(line, flush=True)


def breakdown(model_name: str, batch_size: int, size, seconds: float,
              min_steps: int) -> None:
  """Prints ms per step for hc_jax's forward, forward + gradient, full step.

  The forward pass and gradient are those of `hc_jax.training.step.train_step`'s loss
  (for an ellipse or mask model, its kind's loss).
  """
  # pylint: disable=import-outside-toplevel
  import jax
  from hc_jax import losses
  from hc_jax.data import normalise
  # pylint: enable=import-outside-toplevel
  state, _, batch = hc_jax_state_step_batch(model_name, batch_size, size)
  images = normalise.zscore_batch(batch['image'])
  target = batch['hc_px'] / NORMALISER_PX
  loss_of = _loss_of(model_name)

  def loss(params):
    predictions, _ = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, images,
        train=True, rngs={'dropout': jax.random.key(1)},
        mutable=['batch_stats'])
    if loss_of is not None:  # As in step_lib.train_step.
      return loss_of(predictions, batch['ellipse'], batch['resize'], target,
                     NORMALISER_PX, images.shape[1:3], losses.mse)
    return losses.mse(predictions, target)

  stages = {
      'forward': jax.jit(loss),
      'forward+gradient': jax.jit(jax.grad(loss)),
  }
  label = keras_models.hw_label(size)
  for name, fn in stages.items():
    jax.block_until_ready(fn(state.params))
    holder = {}
    steps, elapsed = _time_steps(
        lambda fn=fn: holder.update(out=fn(state.params)), seconds,
        min_steps, lambda: jax.block_until_ready(holder['out']))
    print(f'hc_jax {model_name} {label} batch {batch_size} {name}: '
          f'{1e3 * elapsed / steps:.1f} ms', flush=True)
  result = run_worker('hc_jax', model_name, batch_size, size, seconds,
                      min_steps)
  print(f'hc_jax {model_name} {label} batch {batch_size} full step: '
        f'{1e3 * batch_size / result["img_per_s"]:.1f} ms '
        f'({result["img_per_s"]:.1f} img/s)', flush=True)


def _csv(text: str, kind=str) -> list:
  return [kind(item) for item in text.split(',') if item]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='cnn_263k,cnn_1m')
  parser.add_argument('--batch_sizes', default='8,32')
  parser.add_argument('--seconds', type=float, default=5.0,
                      help='least timing window per measurement')
  parser.add_argument('--min_steps', type=int, default=3,
                      help='least number of timed steps per measurement')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--image_size', type=parse_size, default=None,
                      help='input S or HxW for every model (default: SIZES)')
  parser.add_argument('--variants', default='keras,hc_jax,hc_jax+malloc',
                      help=f'comma-separated, from: {", ".join(VARIANTS)}')
  parser.add_argument('--breakdown', action='store_true',
                      help='time hc_jax forward / gradient / step in-process')
  parser.add_argument('--worker', choices=sorted({v[0] for v in
                                                 VARIANTS.values()}),
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  model_names = _csv(args.models)
  batch_sizes = _csv(args.batch_sizes, int)
  variants = _csv(args.variants)
  for name in model_names:
    if name not in SIZES:
      parser.error(f'unknown model {name!r}; choose from {", ".join(SIZES)}')
  for variant in variants:
    if variant not in VARIANTS:
      parser.error(f'unknown variant {variant!r}; choose from '
                   f'{", ".join(VARIANTS)}')
  if (not batch_sizes or min(batch_sizes) < 1 or args.rounds < 1
      or (args.image_size is not None and min(args.image_size) < 32)):
    parser.error('batch sizes and --rounds must be positive, --image_size '
                 'at least 32 per side')
  if args.worker:
    result = run_worker(args.worker, model_names[0], batch_sizes[0],
                        args.image_size or SIZES[model_names[0]],
                        args.seconds, args.min_steps)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
  elif args.breakdown:
    for name in model_names:
      for batch_size in batch_sizes:
        breakdown(name, batch_size, args.image_size or SIZES[name],
                  args.seconds, args.min_steps)
  else:
    summarise(compare(model_names, batch_sizes, variants, args.seconds,
                      args.min_steps, args.rounds, args.image_size))


if __name__ == '__main__':
  main()
