"""Milliseconds per training step of hcnet and hcnet_ellipse against cnn_1m.

  taskset -c 1 python benchmarks/hcnet_step.py [--seconds=10] [--rounds=3]

Times the jitted `hc_jax.training.step.train_step` (state donated) as training runs
it: the default augmentation (flip, ±5 px shift, ±10° rotation) on the
device, MAE, gradient and Adam (lr 1e-3), batch 8, on a fixed random batch;
hcnet and hcnet_ellipse at their configs' 128x128, cnn_1m at the same size,
all in this process with the CPU layers and `hc_jax.cpu.tune_malloc`. The
models are timed in turn for `--rounds` rounds; the median is reported with
its ratio to cnn_1m, and the minutes the training steps of one 100-epoch fold
take, hcnet's budget (651 training images: 81 steps of 8 per epoch;
evaluation not counted; the paper's CNNs train for 250 epochs).
"""

import argparse
import functools
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # Run as a script from anywhere.
  sys.path.insert(0, REPO)

# Model name -> (height, width) of its input.
MODELS = {'cnn_1m': (128, 128), 'hcnet': (128, 128),
          'hcnet_ellipse': (128, 128)}
BATCH_SIZE = 8
FOLD_STEPS = 100 * (651 // BATCH_SIZE)


def make_step(name, height, width):
  """A jitted step, its state and batch for model `name`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from hc_jax.data import augment
  from hc_jax import losses
  from hc_jax import models
  import ml_collections  # pylint: disable=import-outside-toplevel
  from hc_jax.training import step as step_lib
  model = models.create_model(name, layers='auto')
  variables = models.init_variables(model, jnp.zeros((1, height, width, 1)))
  state = step_lib.TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      batch_stats=variables['batch_stats'], tx=optax.adam(1e-3))
  rng = np.random.default_rng(0)
  scale = np.array([width / 800, height / 540], np.float32)
  batch = {
      'image': rng.integers(0, 256, (BATCH_SIZE, height, width, 1), np.uint8),
      'ellipse': np.tile(np.array([400, 270, 150, 110, 0.4], np.float32),
                         (BATCH_SIZE, 1)),
      'hc_px': np.full(BATCH_SIZE, 820.0, np.float32),
      'resize': np.tile(np.concatenate([scale, 0.5 * scale - 0.5]),
                        (BATCH_SIZE, 1)).astype(np.float32)}
  member = {'key': jax.random.key(1), 'normaliser_px': jnp.float32(1786.5)}
  # The model kind's loss (hcnet_ellipse: the HC of its ellipse, and the
  # shape term at configs/hcnet_ellipse.py's weight); None for an HC
  # regressor.
  loss_of, _ = step_lib.output_functions(ml_collections.ConfigDict(
      {'model': name, 'model_options': {}, 'ellipse_weight': 0.3}))
  step = jax.jit(functools.partial(
      step_lib.train_step, loss_fn=losses.get_loss('mae'),
      augment=augment.AugmentConfig(), loss_of=loss_of), donate_argnums=(0,))
  batch = jax.device_put(batch)
  return step, state, batch, member


def time_steps(step, state, batch, member, seconds):
  """Runs `step` for about `seconds`; returns (ms per step, state)."""
  import jax  # pylint: disable=import-outside-toplevel
  steps, start = 0, time.perf_counter()
  while True:
    state, loss = step(state, batch, member)
    steps += 1
    if steps % 5 == 0:
      jax.block_until_ready(loss)
      elapsed = time.perf_counter() - start
      if elapsed >= seconds:
        return 1e3 * elapsed / steps, state


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--models', default=','.join(MODELS))
  args = parser.parse_args(argv)
  from hc_jax import cpu  # pylint: disable=import-outside-toplevel
  cpu.tune_malloc()
  names = args.models.split(',')
  runs = {}
  for name in names:
    step, state, batch, member = make_step(name, *MODELS[name])
    for _ in range(3):  # Compile and warm up.
      state, _ = step(state, batch, member)
    runs[name] = [step, state, batch, member]
  times = {name: [] for name in names}
  for round_ in range(args.rounds):
    for name in names:
      step, state, batch, member = runs[name]
      ms, runs[name][1] = time_steps(step, state, batch, member, args.seconds)
      times[name].append(ms)
      print(f'round {round_ + 1} {name}: {ms:.1f} ms/step', flush=True)
  base = statistics.median(times['cnn_1m']) if 'cnn_1m' in times else None
  print(f'\nmedian of {args.rounds} rounds, batch {BATCH_SIZE}, '
        f'{FOLD_STEPS} steps per 100-epoch fold:')
  for name in names:
    ms = statistics.median(times[name])
    ratio = f', {ms / base:.2f}x cnn_1m' if base else ''
    height, width = MODELS[name]
    print(f'  {name} {height}x{width}: {ms:.1f} ms/step{ratio}, '
          f'{ms * FOLD_STEPS / 6e4:.1f} min per fold (train steps)')


if __name__ == '__main__':
  main()
