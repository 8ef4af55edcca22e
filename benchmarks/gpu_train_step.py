"""Training throughput on a GPU: one model, M stacked members, augmentation.

  python3 benchmarks/gpu_train_step.py [--data=export/hc18_224x224_stretch.npz]
      [--model=resnet50] [--image_size=224] [--dtypes=float32,bfloat16]
      [--batch_size=8] [--members=15] [--how=vmap,map] [--seconds=5]
      [--epochs=250] [--time_budget_s=inf] [--out=DIR] [--allow_cpu]

For each compute dtype, times in images per second:

* one model: `hc_jax.training.step.train_step` (augmentation, forward, loss,
  gradient, Adam) on batches of `--batch_size` images; the baseline;
* `--members` models stacked on a leading member axis in one jitted step,
  `hc_jax.training.step.members_train_step`, each on its own batch of `--batch_size`
  images, with `how='vmap'` (one vmap: grouped convolutions) and `how='map'`
  (the members one after another inside the step, `jax.lax.map`): what
  `python -m hc_jax.grid --stack` runs;
* the augmentation alone (`hc_jax.data.augment.augment_batch`) on
  members x batch_size images per call;

with each rate's ratio to the one-model baseline of the same dtype measured
in the same run, and what `--members` runs of `--epochs` epochs would take at
that rate (training steps only). The batches sit on the device already, so
the figures leave out gathering them on the host (see
benchmarks/input_pipeline.py). Images come from an export
(`python -m hc_jax.prepare`) when `--data` is given, else random uint8 with
plausible ellipses. Imports no TensorFlow. With `--out`, writes
`gpu_train_step.json` there, rewritten after every measurement (a run cut
short keeps what it measured). Stops at once where JAX has no accelerator,
unless --allow_cpu.
"""

import argparse
import functools
import json
import math
import os
import sys
import time

START = time.perf_counter()
# Run from a bare checkout too (a GPU machine without `pip install -e .`).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from configs import default  # pylint: disable=wrong-import-position
from hc_jax import losses  # pylint: disable=wrong-import-position
from hc_jax import models  # pylint: disable=wrong-import-position
from hc_jax.data import augment  # pylint: disable=wrong-import-position
from hc_jax.data import cache as cache_lib  # pylint: disable=wrong-import-position
from hc_jax.training import step as step_lib

HOWS = ('vmap', 'map')
DTYPES = ('float32', 'bfloat16')
# Training images of one fold's member when --data is not given: 900 scans,
# 4 of 5 folds, 90 % of those (the rest selects the epoch).
TRAIN_FRACTION = 0.8 * 0.9


def timed_rate(step, carry, images_per_call: int, seconds: float,
               warmup: int = 2) -> tuple[float, float]:
  """Calls `carry = step(carry, i)` for `seconds`; returns (img/s, compile s).

  The first call (compilation) and `warmup` more are not timed; at least one
  call is.
  """
  start = time.perf_counter()
  carry = jax.block_until_ready(step(carry, 0))
  compile_seconds = time.perf_counter() - start
  for i in range(warmup):
    carry = step(carry, i + 1)
  jax.block_until_ready(carry)
  calls, start = 0, time.perf_counter()
  while True:
    carry = step(carry, calls)
    calls += 1
    if calls % 5 == 0 or seconds <= 0:
      jax.block_until_ready(carry)
      if time.perf_counter() - start >= seconds:
        break
  return calls * images_per_call / (time.perf_counter() - start), (
      compile_seconds)


def duration(seconds: float) -> str:
  """'2 h 05 min', '12.5 min' or '42.0 s'."""
  if seconds >= 3600:
    return f'{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min'
  return f'{seconds / 60:.1f} min' if seconds >= 60 else f'{seconds:.1f} s'


def random_arrays(num_images: int, height: int, width: int,
                  seed: int = 0) -> dict[str, np.ndarray]:
  """Random uint8 images with plausible HC18 targets (540x800 originals)."""
  rng = np.random.default_rng(seed)
  original_hw = np.tile([[540, 800]], (num_images, 1)).astype(np.int32)
  a = rng.uniform(100, 250, num_images)
  b = a * rng.uniform(0.6, 0.9, num_images)
  ellipse = np.stack([rng.uniform(300, 500, num_images),
                      rng.uniform(200, 340, num_images), a, b,
                      rng.uniform(-math.pi / 2, math.pi / 2, num_images)], 1)
  h = ((a - b) / (a + b)) ** 2
  hc_px = math.pi * (a + b) * (1 + 3 * h / (10 + np.sqrt(4 - 3 * h)))
  return {'images': rng.integers(0, 256, (num_images, height, width, 1),
                                 np.uint8),
          'ellipse': ellipse.astype(np.float32),
          'hc_px': hc_px.astype(np.float32),
          'resize': cache_lib.resize_geometry(original_hw, (height, width),
                                              'stretch')}


def make_batch(arrays, shape: tuple[int, ...], seed: int = 0):
  """A training batch of `shape` (e.g. (B,) or (M, B)) drawn from `arrays`,
  on the device."""
  index = np.random.default_rng(seed).integers(0, len(arrays['images']), shape)
  return jax.device_put({
      'image': arrays['images'][index], 'ellipse': arrays['ellipse'][index],
      'hc_px': arrays['hc_px'][index], 'resize': arrays['resize'][index]})


def model_config(model: str, dtype: str, image_size: int):
  """configs/default.py with the benchmark's model, dtype and input size."""
  config = default.get_config()
  config.model, config.dtype, config.image_size = model, dtype, image_size
  return config


def initial_state(config, steps_per_epoch: int = 100):
  return step_lib.create_train_state(
      config, step_lib.create_model(config), jax.random.key(0),
      step_lib.create_optimizer(config, steps_per_epoch))


def single_model_rate(config, arrays, batch_size, seconds):
  """img/s of `step_lib.train_step` (augmentation included) of one model."""
  state = initial_state(config)
  batch = make_batch(arrays, (batch_size,))
  member = {'key': jax.random.key(1),
            'normaliser_px': jnp.asarray(1000.0, jnp.float32)}
  step = jax.jit(functools.partial(
      step_lib.train_step, loss_fn=losses.get_loss(config),
      augment=augment.AugmentConfig.from_dict(config.augment)),
                 donate_argnums=(0,))
  return timed_rate(lambda state, i: step(state, batch, member)[0], state,
                    batch_size, seconds)


def members_rate(config, arrays, members, batch_size, seconds, how):
  """img/s of `step_lib.members_train_step` of `members` stacked models."""
  one = initial_state(config)
  state = jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x)[None], members, 0),
                       one)
  batch = make_batch(arrays, (members, batch_size))
  batch['active'] = jnp.ones(members, bool)
  member_arrays = {'key': jax.random.split(jax.random.key(1), members),
                   'loss_id': jnp.zeros(members, jnp.int32),
                   'normaliser_px': jnp.full(members, 1000.0, jnp.float32)}
  step = jax.jit(functools.partial(
      step_lib.members_train_step, loss_fns=(losses.get_loss(config),),
      augment=augment.AugmentConfig.from_dict(config.augment), how=how),
                 donate_argnums=(0,))
  return timed_rate(lambda state, i: step(state, batch, member_arrays)[0],
                    state, members * batch_size, seconds)


def augment_rate(config, arrays, batch_size, seconds):
  """img/s of `augment.augment_batch` (warp, targets, z-score) alone."""
  batch = make_batch(arrays, (batch_size,))
  settings = augment.AugmentConfig.from_dict(config.augment)

  @jax.jit
  def run(key, i, batch):  # Arguments, not baked-in constants.
    return augment.augment_batch(
        jax.random.fold_in(key, i), batch['image'], batch['ellipse'],
        batch['hc_px'], batch['resize'], settings)

  key = jax.random.key(0)
  # The carry is the last output; each call draws new augmentations.
  return timed_rate(lambda _, i: run(key, i, batch), None, batch_size,
                    seconds)


def _fail(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', default='',
                      help='an .npz from python -m hc_jax.prepare (optional)')
  parser.add_argument('--model', default='resnet50')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--batch_size', type=int, default=8,
                      help='images per model and step (the paper: 8)')
  parser.add_argument('--members', type=int, default=15,
                      help='stacked models (15: 3 losses x 5 folds)')
  parser.add_argument('--how', default='vmap,map',
                      help='how the members are mapped: vmap, map or both')
  parser.add_argument('--seconds', type=float, default=5.0,
                      help='timed seconds per measurement')
  parser.add_argument('--epochs', type=int, default=250)
  parser.add_argument('--num_images', type=int, default=900,
                      help='random images when --data is not given')
  parser.add_argument('--time_budget_s', type=float, default=float('inf'),
                      help='skip the measurements that would start later')
  parser.add_argument('--out', default='', help='directory for the JSON')
  parser.add_argument('--allow_cpu', action='store_true',
                      help='measure even where JAX has no accelerator')
  args = parser.parse_args(argv)
  if args.model not in models.MODELS:
    _fail(f'unknown model {args.model!r}; choose one of '
          f'{", ".join(sorted(models.MODELS))}')
  args.dtypes = [d for d in args.dtypes.split(',') if d]
  args.how = [h for h in args.how.split(',') if h]
  for name, values, allowed in (('dtypes', args.dtypes, DTYPES),
                                ('how', args.how, HOWS)):
    bad = [v for v in values if v not in allowed]
    if bad or not values:
      _fail(f'--{name} takes {", ".join(allowed)}; got {bad or "nothing"}')
  for name in ('image_size', 'batch_size', 'members', 'num_images'):
    if getattr(args, name) < 1:
      _fail(f'--{name} must be positive, got {getattr(args, name)}')
  return args


def main(argv=None):
  args = _parse_args(argv)
  if jax.default_backend() == 'cpu' and not args.allow_cpu:
    _fail(f'JAX found no GPU or TPU ({jax.devices()}); check the CUDA set-up, '
          'or pass --allow_cpu to measure the CPU')
  if args.data:
    try:
      arrays, _ = cache_lib.load(args.data)
    except cache_lib.PreparedError as e:
      _fail(str(e))
    if arrays['images'].shape[1:3] != (args.image_size, args.image_size):
      _fail(f'{args.data} holds {arrays["images"].shape[1]}x'
            f'{arrays["images"].shape[2]} images, not --image_size='
            f'{args.image_size}')
  else:
    arrays = random_arrays(args.num_images, args.image_size, args.image_size)
  per_member = round(len(arrays['images']) * TRAIN_FRACTION, 1)
  device = jax.devices()[0].device_kind
  print(f'{device} ({jax.default_backend()}), jax {jax.__version__}; '
        f'{args.model} at {args.image_size}x{args.image_size}, batch '
        f'{args.batch_size} per model; a run of {args.epochs} epochs trains '
        f'each member on {args.epochs * per_member:,.0f} images', flush=True)
  rows, baseline = [], {}

  def write_json():
    if args.out:
      os.makedirs(args.out, exist_ok=True)
      path = os.path.join(args.out, 'gpu_train_step.json')
      with open(path + '.tmp', 'w') as f:
        settings = {**vars(args), 'time_budget_s': None if math.isinf(
            args.time_budget_s) else args.time_budget_s}
        json.dump({'device': device, 'backend': jax.default_backend(),
                   'jax': jax.__version__, 'settings': settings,
                   'train_images_per_member': per_member, 'rows': rows}, f,
                  indent=2)
      os.replace(path + '.tmp', path)

  def report(what, dtype, members, rate, compile_seconds):
    ratio = rate / baseline[dtype] if dtype in baseline else None
    run_seconds = (args.epochs * per_member * members / rate
                   if what != 'augment only' else None)
    rows.append({'what': what, 'dtype': dtype, 'members': members,
                 'batch_per_model': args.batch_size,
                 'images_per_second': rate, 'ratio_to_one_model': ratio,
                 'compile_seconds': compile_seconds,
                 'run_seconds': run_seconds})
    text = f'{what:<24} {dtype:>8} {rate:10.1f} img/s'
    if what == 'one model':
      text += '  baseline     '
    elif ratio is not None:
      text += f'  {ratio:5.2f}x one model'
    text += f'  (compile {compile_seconds:5.1f} s)'
    if run_seconds is not None:
      text += (f'  {members} run(s) of {args.epochs} epochs: '
               f'{duration(run_seconds)}')
    print(text, flush=True)
    write_json()

  for dtype in args.dtypes:
    config = model_config(args.model, dtype, args.image_size)
    measurements = [('one model', 1, functools.partial(
        single_model_rate, config, arrays, args.batch_size, args.seconds))]
    measurements += [(f'{args.members} members {how}', args.members,
                      functools.partial(members_rate, config, arrays,
                                        args.members, args.batch_size,
                                        args.seconds, how))
                     for how in args.how]
    for what, members, measure in measurements:
      if time.perf_counter() - START > args.time_budget_s:
        print(f'{what} {dtype}: skipped, past --time_budget_s='
              f'{args.time_budget_s:.0f}', flush=True)
        continue
      rate, compile_seconds = measure()
      if what == 'one model':
        baseline[dtype] = rate
      report(what, dtype, members, rate, compile_seconds)
  # The augmentation is float32 whatever the model computes in.
  if time.perf_counter() - START <= args.time_budget_s:
    config = model_config(args.model, 'float32', args.image_size)
    report('augment only', 'float32', args.members, *augment_rate(
        config, arrays, args.members * args.batch_size, args.seconds))
  return 0


if __name__ == '__main__':
  sys.exit(main())
