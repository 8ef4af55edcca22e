"""Milliseconds per training step of hcnet_mask without and with the refinement.

  taskset -c 1 python benchmarks/refine_step.py [--seconds=10] [--rounds=3]
      [--rays=64] [--samples=32]

Times the jitted `hc_jax.training.step.train_step` (state donated) as training
runs it for configs/hcnet_mask.py and configs/hcnet_mask_refine.py (the
same network with the boundary refinement, `--rays` x `--samples`): the
default augmentation on the device, the mask loss of each config (the
refined one with its ray term), gradient and Adam (lr 1e-3), batch 8 at
128x192, on a fixed random batch, both in this process with the CPU layers
and `hc_jax.cpu.tune_malloc`. The two are timed in turn for `--rounds`
rounds; the median of each is reported with their ratio.
"""

import argparse
import functools
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # Run as a script from anywhere.
  sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hcnet_step import time_steps  # pylint: disable=wrong-import-position

BATCH_SIZE = 8


def make_step(config):
  """A jitted step, its state, batch and member for a mask config."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from hc_jax import losses
  from hc_jax import models
  from hc_jax.data import augment
  from hc_jax.training import step as step_lib
  height, width = config.image_size, config.image_width
  model = models.from_config(config)
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
  loss_of, _ = step_lib.output_functions(config)
  step = jax.jit(functools.partial(
      step_lib.train_step, loss_fn=losses.get_loss(config.loss),
      augment=augment.AugmentConfig(), loss_of=loss_of), donate_argnums=(0,))
  return step, state, jax.device_put(batch), member


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--rays', type=int, default=64)
  parser.add_argument('--samples', type=int, default=32)
  args = parser.parse_args(argv)
  # pylint: disable=import-outside-toplevel
  from configs import hcnet_mask
  from configs import hcnet_mask_refine
  from hc_jax import cpu
  cpu.tune_malloc()
  refined = hcnet_mask_refine.get_config()
  refined.model_options.refine_rays = args.rays
  refined.model_options.refine_samples = args.samples
  configs = {'hcnet_mask': hcnet_mask.get_config(),
             f'refine {args.rays}x{args.samples}': refined}
  runs = {}
  for name, config in configs.items():
    step, state, batch, member = make_step(config)
    for _ in range(3):  # Compile and warm up.
      state, _ = step(state, batch, member)
    runs[name] = [step, state, batch, member]
  times = {name: [] for name in configs}
  for round_ in range(args.rounds):
    for name in configs:
      step, state, batch, member = runs[name]
      ms, runs[name][1] = time_steps(step, state, batch, member, args.seconds)
      times[name].append(ms)
      print(f'round {round_ + 1} {name}: {ms:.1f} ms/step', flush=True)
  base = statistics.median(times['hcnet_mask'])
  print(f'\nmedian of {args.rounds} rounds, batch {BATCH_SIZE} at 128x192:')
  for name in configs:
    ms = statistics.median(times[name])
    print(f'  {name}: {ms:.1f} ms/step, {ms / base:.2f}x hcnet_mask')


if __name__ == '__main__':
  main()
