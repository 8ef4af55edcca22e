"""Training throughput on a GPU: one model, fold-vmapped models, the input.

  python3 benchmarks/gpu_train_step.py [--data=export/hc18_224.npz]
      [--model=resnet50] [--image_size=224] [--dtypes=float32,bfloat16]
      [--batch_sizes=8,64] [--members=5] [--member_batch_size=8]
      [--members_per_call=0,1] [--seconds=5] [--epochs=250]
      [--time_budget_s=inf] [--out=DIR]

For each compute dtype, times in images per second:

* `hc_jax.train.train_step` of one model on ready batches (the model alone);
* `hc_jax.member_steps.members_train_step`: `--members` models (5 = the
  folds) in one jitted step of `--member_batch_size` images each, with the
  on-device gather and augmentation included (what `benchmarks/gpu_grid.py`
  runs),
  vmapped together (members_per_call 0: grouped convolutions) and one after
  another (1: `jax.lax.map`, plain convolutions);
* the on-device input pipeline alone: gather + augment + z-score of
  members × member_batch_size images per call;

and prints what one 5-fold run of `--epochs` epochs would take at those rates
(training steps only: epochs × training images of all folds / rate). Images
come from the export when `--data` is given, else random uint8. Imports no
TensorFlow. With `--out`, also writes `gpu_train_step.json` there, rewritten
after every measurement (a run cut short keeps what it measured). Stops at
once where JAX has no accelerator, unless --allow_cpu.
"""

import argparse
import functools
import json
import os
import sys
import time

START = time.perf_counter()
# Run from a bare checkout too (a GPU machine without `pip install -e .`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

from hc_jax import device_augment
from hc_jax import losses
from hc_jax import member_steps
from hc_jax import models
from hc_jax import numpy_data
from hc_jax import train
from hc_jax import train_folds

NUM_FOLDS = 5
VAL_FRACTION = 0.1


def timed_rate(step, carry, images_per_call: int, seconds: float,
               warmup: int = 2) -> tuple[float, float]:
  """Calls `carry = step(carry, i)` for `seconds`; returns (img/s, compile s).

  The first call (compilation) and `warmup` more are not timed.
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


def initial_state(model_name: str, dtype: str, image_size: int):
  config = train_folds.FoldsConfig(model=model_name, dtype=dtype,
                                   image_size=image_size)
  return train.create_train_state(config, train.create_model(config),
                                  jax.random.key(0), optax.adam(1e-3))


def single_model_rate(model_name, dtype, image_size, batch_size, seconds):
  """img/s of `train.train_step` on one ready batch."""
  state = initial_state(model_name, dtype, image_size)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(
      size=(batch_size, image_size, image_size, 1)), jnp.float32),
           'target': jnp.asarray(rng.uniform(0.2, 1.0, batch_size),
                                 jnp.float32)}
  step = jax.jit(functools.partial(train.train_step, loss_fn=losses.mse,
                                   dropout_key=jax.random.key(1)),
                 donate_argnums=(0,))
  return timed_rate(lambda state, i: step(state, batch)[0], state, batch_size,
                    seconds)


def members_rate(model_name, dtype, images, members, batch_size, seconds,
                 members_per_call=0):
  """img/s of the fold-vmapped step, gather and augmentation included."""
  state = initial_state(model_name, dtype, images.shape[1])
  state = jax.tree.map(
      lambda x: jnp.repeat(jnp.asarray(x)[None], members, axis=0), state)
  rng = np.random.default_rng(0)
  index = jnp.asarray(rng.integers(0, len(images), (1, members, batch_size)),
                      jnp.int32)
  active = jnp.ones((1, members), bool)
  hc_px = jnp.asarray(rng.uniform(400, 1000, len(images)), jnp.float32)
  member_arrays = {'fold': jnp.arange(members, dtype=jnp.int32),
                   'loss_id': jnp.zeros(members, jnp.int32),
                   'normaliser_px': jnp.full(members, 1000.0, jnp.float32)}
  step = jax.jit(functools.partial(
      member_steps.members_train_step, loss_fns=(losses.mse,),
      augment=device_augment.AugmentConfig(), dropout_key=jax.random.key(1),
      augment_key=jax.random.key(2), members_per_call=members_per_call),
                 donate_argnums=(0,))
  return timed_rate(
      lambda state, i: step(state, index, active, 0, i, member_arrays, images,
                            hc_px)[0], state, members * batch_size, seconds)


def input_rate(images, batch_size, seconds):
  """img/s of gather + augment + z-score on the device."""
  rng = np.random.default_rng(0)
  index = jnp.asarray(rng.integers(0, len(images), batch_size), jnp.int32)

  @jax.jit
  def augment(key, i, images, index):  # Arguments, not baked-in constants.
    batch, _ = device_augment.augment_batch(
        jax.random.fold_in(key, i), images[index],
        device_augment.AugmentConfig())
    return batch

  key = jax.random.key(0)
  # The carry is the last batch; each call draws new augmentations.
  return timed_rate(lambda _, i: augment(key, i, images, index), None,
                    batch_size, seconds)


def train_images_per_fold(data_path: str, num_images: int) -> float:
  """Mean training images of a fold: from the export's folds, or estimated."""
  folds_path = data_path[:-len('.npz')] + '.folds.json' if data_path else ''
  if folds_path and os.path.isfile(folds_path):
    from hc_jax import folds as folds_lib  # pylint: disable=g-import-not-at-top
    assignment = folds_lib.FoldAssignment.from_json(folds_path)
    return float(np.mean([len(assignment.split(k)['train'])
                          for k in range(assignment.num_folds)]))
  return num_images * (1 - 1 / NUM_FOLDS) * (1 - VAL_FRACTION)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', default='', help='an export .npz (optional)')
  parser.add_argument('--model', default='resnet50')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--batch_sizes', default='8,64')
  parser.add_argument('--members', type=int, default=NUM_FOLDS)
  parser.add_argument('--member_batch_size', type=int, default=8)
  parser.add_argument('--members_per_call', default='0,1',
                      help='0: all members in one vmap; 1: one after another '
                      'inside the step (jax.lax.map); k: chunks of k')
  parser.add_argument('--seconds', type=float, default=5.0)
  parser.add_argument('--epochs', type=int, default=250)
  parser.add_argument('--num_images', type=int, default=900,
                      help='training-set size when --data is not given')
  parser.add_argument('--time_budget_s', type=float, default=float('inf'),
                      help='skip the measurements that would start later')
  parser.add_argument('--out', default='')
  parser.add_argument('--allow_cpu', action='store_true',
                      help='measure even where JAX has no accelerator')
  args = parser.parse_args(argv)
  try:
    train_folds.require_accelerator(args.allow_cpu)
  except RuntimeError as error:
    sys.exit(f'gpu_train_step: {error}')
  if args.model not in models.MODELS:
    sys.exit(f'gpu_train_step: unknown model {args.model!r}; choose one of '
             f'{", ".join(sorted(models.MODELS))}')
  if args.data:
    images = numpy_data.load_numpy(args.data)['images']
    if images.shape[1] != args.image_size:
      sys.exit(f'gpu_train_step: {args.data} holds {images.shape[1]}px '
               f'images, not --image_size={args.image_size}')
  else:
    images = np.random.default_rng(0).integers(
        0, 256, (args.num_images, args.image_size, args.image_size, 1),
        np.uint8)
  images = jax.device_put(images)
  per_fold = train_images_per_fold(args.data, args.num_images)
  run_images = args.epochs * NUM_FOLDS * per_fold
  device = jax.devices()[0].device_kind
  print(f'{device}, jax {jax.__version__}; {args.model} at '
        f'{args.image_size}x{args.image_size}; a {NUM_FOLDS}-fold run of '
        f'{args.epochs} epochs trains on {run_images:,.0f} images '
        f'({per_fold:.0f} per fold and epoch)', flush=True)
  takes_dtype = 'dtype' in models.MODELS[args.model].__dataclass_fields__
  rows = []

  def write_json():
    if args.out:
      os.makedirs(args.out, exist_ok=True)
      with open(os.path.join(args.out, 'gpu_train_step.json'), 'w') as f:
        json.dump({'device': device, 'jax': jax.__version__,
                   'settings': vars(args), 'train_images_per_fold': per_fold,
                   'rows': rows}, f, indent=2)

  def report(label, rate, compile_seconds, dtype='', run=True):
    run_seconds = run_images / rate
    rows.append({'what': label, 'dtype': dtype, 'images_per_second': rate,
                 'compile_seconds': compile_seconds,
                 'run_seconds': run_seconds if run else None})
    print(f'{label:<44} {dtype:>8} {rate:9.1f} img/s  (compile '
          f'{compile_seconds:5.1f} s)' + (
              f'  5-fold run: {duration(run_seconds)}' if run else ''),
          flush=True)
    write_json()

  batch = args.members * args.member_batch_size
  rate, compiled = input_rate(images, batch, args.seconds)
  report(f'input only: gather+augment+zscore, {batch}/call', rate, compiled,
         run=False)
  measurements = []  # (label, dtype, thunk returning (rate, compile s)).
  for dtype in args.dtypes.split(','):
    if dtype not in ('float32', 'bfloat16'):
      sys.exit(f'gpu_train_step: dtype must be float32 or bfloat16, got '
               f'{dtype!r}')
    if dtype != 'float32' and not takes_dtype:
      print(f'{args.model} has no compute dtype setting: {dtype} skipped')
      continue
    for batch_size in map(int, args.batch_sizes.split(',')):
      measurements.append((f'one model, batch {batch_size}', dtype,
                           functools.partial(
                               single_model_rate, args.model, dtype,
                               args.image_size, batch_size, args.seconds)))
    for per_call in map(int, args.members_per_call.split(',')):
      how = {0: 'vmapped', 1: 'in turn'}.get(per_call, f'vmapped by {per_call}')
      measurements.append((
          f'{args.members} models {how} x batch {args.member_batch_size} '
          '(+input)', dtype, functools.partial(
              members_rate, args.model, dtype, images, args.members,
              args.member_batch_size, args.seconds, per_call)))
  for label, dtype, measure in measurements:
    if time.perf_counter() - START > args.time_budget_s:
      print(f'{label} {dtype}: skipped, past --time_budget_s='
            f'{args.time_budget_s:.0f}', flush=True)
      continue
    report(label, *measure(), dtype)  # Rewrites the JSON.


if __name__ == '__main__':
  main()
