"""Images per second of the full training step, hc_jax against Keras/TensorFlow.

  python benchmarks/train_step.py --models=cnn_263k,cnn_1m --batch_sizes=8,32
      [--seconds=5] [--min_steps=3] [--rounds=2] [--image_size=S]
      [--variants=keras,hc_jax,hc_jax+malloc]

One step is forward, MSE, gradient and Adam (lr 1e-3) on a fixed random batch
at the model's configured input size (`SIZES`; `--image_size` overrides it).
hc_jax times the jitted `hc_jax.train.train_step` (state donated); Keras times
`train_on_batch` on the twin model from `benchmarks/keras_models.py`,
compiled with Adam(1e-3) and 'mse' (no XLA: Keras' default on a CPU).

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

# Input side of each model (the configs' image_size).
SIZES = {'cnn_263k': 128, 'cnn_1m': 128, 'vgg16': 224, 'resnet50': 224}

# glibc malloc settings that keep XLA's large per-step buffers in the heap
# instead of a fresh mmap (and page faults) for each: one arena, no mmap, no
# trimming. Must be set before the process starts.
MALLOC_TUNABLES = ('glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
                   'glibc.malloc.trim_threshold=4000000000')

# Variant name -> (framework, extra environment). A value of None removes the
# variable. 'keras+xla' compiles the Keras step with XLA (jit_compile=True);
# 'hc_jax+mallopt' sets the same malloc options as '+malloc' from inside the
# process, with `mallopt`, before JAX runs; 'hc_jax_plain' is hc_jax without
# `hc_jax.fast_layers` (models' `layers='plain'`).
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


def _random_batch(batch_size: int, image_size: int):
  """A fixed batch of random images `[B, S, S, 1]` and targets `[B]`."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch_size, image_size, image_size, 1))
  return (images.astype(np.float32),
          rng.uniform(0.2, 1.0, batch_size).astype(np.float32))


def _time_steps(step, seconds: float, min_steps: int,
                sync=lambda: None) -> tuple[int, float]:
  """Runs `step()` for at least `seconds` and `min_steps`; (steps, seconds)."""
  count, start = 0, time.perf_counter()
  while count < min_steps or time.perf_counter() - start < seconds:
    step()
    count += 1
  sync()
  return count, time.perf_counter() - start


def hc_jax_state_step_batch(model_name: str, batch_size: int, size: int,
                            fast_layers: bool = True):
  """hc_jax's train state, its jitted MSE train step and a random batch."""
  # pylint: disable=import-outside-toplevel
  import functools
  import jax
  import jax.numpy as jnp
  import optax
  from hc_jax import losses
  from hc_jax import models
  from hc_jax import train
  # pylint: enable=import-outside-toplevel
  model = models.create_model(model_name,
                              layers='fast' if fast_layers else 'plain')
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), jnp.zeros((1, size, size, 1)))
  state = train.TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      batch_stats=variables.get('batch_stats', {}), tx=optax.adam(1e-3))
  from hc_jax import augment  # pylint: disable=import-outside-toplevel
  # No augmentation (only the z-score, as in evaluation), so the step is the
  # model's; targets are hc_px / normaliser_px = target.
  member = {'key': jax.random.key(1), 'normaliser_px': jnp.float32(1.0)}
  step = jax.jit(functools.partial(
      train.train_step, member=member, loss_fn=losses.mse,
      augment=augment.AugmentConfig(flip=False, max_translate_px=0.0,
                                    max_rotate_deg=0.0)),
                 donate_argnums=(0,))
  images, target = _random_batch(batch_size, size)
  batch = {'image': jnp.asarray(images), 'hc_px': jnp.asarray(target),
           'ellipse': jnp.zeros((batch_size, 5), jnp.float32),
           'resize': jnp.zeros((batch_size, 4), jnp.float32)}
  return state, step, batch


def _hc_jax_step(model_name: str, batch_size: int, size: int,
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

  return step, lambda: jax.block_until_ready(holder['metrics'])


def _keras_step(model_name: str, batch_size: int, size: int,
                jit_compile: bool):
  """Keras' `train_on_batch` on the twin model: (step fn, sync fn)."""
  import keras  # pylint: disable=import-outside-toplevel
  import keras_models  # pylint: disable=import-outside-toplevel
  model = keras_models.create_model(model_name, size)
  model.compile(optimizer=keras.optimizers.Adam(1e-3), loss='mse',
                jit_compile=jit_compile)
  images, target = _random_batch(batch_size, size)
  target = target[:, None]  # Keras' model outputs [batch, 1].
  # train_on_batch returns the loss as a NumPy value, so each step is synced.
  return lambda: model.train_on_batch(images, target), lambda: None


def _mallopt() -> None:
  """`MALLOC_TUNABLES` through glibc's `mallopt` (`hc_jax.cpu.tune_malloc`)."""
  from hc_jax import cpu  # pylint: disable=import-outside-toplevel
  if not cpu.tune_malloc():
    raise OSError('mallopt failed (not glibc?)')


def run_worker(framework: str, model_name: str, batch_size: int, size: int,
               seconds: float, min_steps: int) -> dict:
  """Times one framework on one model and batch size in this process.

  Args:
    framework: 'hc_jax', 'hc_jax_mallopt', 'hc_jax_plain', 'keras' or
      'keras_xla'.
    model_name: a key of `SIZES`.
    batch_size: images per step.
    size: side of the square input images.
    seconds: least timing window after warm-up.
    min_steps: least number of timed steps.

  Returns:
    {'img_per_s', 'steps', 'seconds', 'warmup_s'}.
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
  return {'img_per_s': steps * batch_size / elapsed, 'steps': steps,
          'seconds': elapsed, 'warmup_s': warmup_s}


def run_in_subprocess(variant: str, model_name: str, batch_size: int,
                      size: int, seconds: float, min_steps: int) -> dict:
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
             '--image_size', str(size),
             '--seconds', str(seconds), '--min_steps', str(min_steps)]
  result = subprocess.run(command, env=env, capture_output=True, text=True,
                          check=False)
  for line in result.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  raise RuntimeError(f'{variant} {model_name} batch {batch_size} failed '
                     f'(exit {result.returncode}):\n{result.stderr[-3000:]}')


def compare(model_names, batch_sizes, variants, seconds: float,
            min_steps: int, rounds: int, image_size: int | None = None
            ) -> dict:
  """Runs every variant alternately, `rounds` times; prints and returns rates.

  Returns:
    {(model, size, batch_size): {variant: [img/s per round]}}.
  """
  rates = {(m, image_size or SIZES[m], b): {v: [] for v in variants}
           for m in model_names for b in batch_sizes}
  for round_index in range(rounds):
    # Rotate the order each round so no variant always runs first.
    shift = round_index % len(variants)
    order = variants[shift:] + variants[:shift]
    for model_name in model_names:
      size = image_size or SIZES[model_name]
      for batch_size in batch_sizes:
        for variant in order:
          result = run_in_subprocess(variant, model_name, batch_size, size,
                                     seconds, min_steps)
          rates[model_name, size, batch_size][variant].append(
              result['img_per_s'])
          print(f'round {round_index + 1} {variant:14s} {model_name} '
                f'{size}x{size} batch {batch_size}: '
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
    line = f'{model_name} {size}x{size} batch {batch_size}: ' + '; '.join(cells)
    jax_best = max((m for v, m in medians.items()
                    if VARIANTS[v][0].startswith('hc_jax')), default=None)
    keras_best = max((m for v, m in medians.items()
                      if VARIANTS[v][0].startswith('keras')), default=None)
    if jax_best and keras_best:
      line += f'; hc_jax/Keras (best of each) {jax_best / keras_best:.2f}'
    print(line, flush=True)


def breakdown(model_name: str, batch_size: int, size: int, seconds: float,
              min_steps: int) -> None:
  """Prints ms per step for hc_jax's forward, forward + gradient, full step."""
  # pylint: disable=import-outside-toplevel
  import functools
  import jax
  import jax.numpy as jnp
  from hc_jax import losses
  from hc_jax import models
  # pylint: enable=import-outside-toplevel
  model = models.create_model(model_name)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), jnp.zeros((1, size, size, 1)))
  images, target = map(jnp.asarray, _random_batch(batch_size, size))

  def loss(params):
    predictions, updates = model.apply(
        {**variables, 'params': params}, images, train=True,
        rngs={'dropout': jax.random.key(1)}, mutable=['batch_stats'])
    return losses.mse(predictions, target), updates

  stages = {
      'forward': jax.jit(lambda p: loss(p)[0]),
      'forward+gradient': jax.jit(jax.grad(lambda p: loss(p)[0])),
  }
  for name, fn in stages.items():
    jax.block_until_ready(fn(variables['params']))
    holder = {}
    steps, elapsed = _time_steps(
        lambda fn=fn: holder.update(out=fn(variables['params'])), seconds,
        min_steps, lambda: jax.block_until_ready(holder['out']))
    print(f'hc_jax {model_name} {size}x{size} batch {batch_size} {name}: '
          f'{1e3 * elapsed / steps:.1f} ms', flush=True)
  result = run_worker('hc_jax', model_name, batch_size, size, seconds,
                      min_steps)
  print(f'hc_jax {model_name} {size}x{size} batch {batch_size} full step: '
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
  parser.add_argument('--image_size', type=int, default=None,
                      help='input side for every model (default: SIZES)')
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
      or (args.image_size is not None and args.image_size < 32)):
    parser.error('batch sizes and --rounds must be positive, --image_size '
                 'at least 32')
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
