"""One member's training step: the unbatched step against it vmapped over a
member axis of size one.

  taskset -c 1 python benchmarks/one_member_step.py [--seconds=10] [--rounds=3]
      [--config=hcnet_mask_refine]

(`--config` names a mask model's file in configs/, e.g. hcnet_mask or demo.)

The trainer keeps its members' states stacked on a leading axis, also for
the single member of every `python -m hc_jax.main` run. This times, in one
process and in turn for `--rounds` rounds, two ways of jitting that one
member's step (state donated): 'unbatched', the member axis's only entry
taken inside the jit and `train_step` called on it; and 'vmap', `train_step`
under `jax.vmap` over the axis of size one. Both on the config's network and
loss at its input size, batch 8 of random scans with the default
augmentation, `hc_jax.cpu.tune_malloc` on. It prints each round, the median
ms/step of each and their ratio, and the largest difference between the
two ways' losses over the same steps.
"""

import argparse
import functools
import importlib
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # Run as a script from anywhere.
  sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from refine_step import make_step  # pylint: disable=wrong-import-position


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--config', default='hcnet_mask_refine')
  args = parser.parse_args(argv)
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  from hc_jax import cpu
  from hc_jax import losses
  from hc_jax.data import augment
  from hc_jax.training import step as step_lib
  cpu.tune_malloc()
  config = importlib.import_module(f'configs.{args.config}').get_config()
  _, state, batch, member = make_step(config)
  loss_of, _ = step_lib.output_functions(config)
  plain = functools.partial(step_lib.train_step,
                            loss_fn=losses.get_loss(config.loss),
                            augment=augment.AugmentConfig(), loss_of=loss_of)

  def unbatched(state, batch, member):
    state, batch, member = jax.tree.map(lambda x: x[0], (state, batch, member))
    return jax.tree.map(lambda x: x[None], plain(state, batch, member))

  stack = lambda tree: jax.tree.map(lambda x: jax.numpy.asarray(x)[None], tree)
  steps = {'unbatched': jax.jit(unbatched, donate_argnums=(0,)),
           'vmap': jax.jit(jax.vmap(plain), donate_argnums=(0,))}
  runs, losses_seen = {}, {}
  for name, step in steps.items():
    run_state = jax.device_put(stack(state), may_alias=False)
    seen = []
    for _ in range(5):  # Compiles, then the same five steps for both.
      run_state, loss = step(run_state, stack(batch), stack(member))
      seen.append(float(loss[0]))
    runs[name], losses_seen[name] = run_state, seen
  times = {name: [] for name in steps}
  for round_ in range(args.rounds):
    for name, step in steps.items():
      run_state, count = runs[name], 0
      stacked_batch, stacked_member = stack(batch), stack(member)
      jax.block_until_ready(run_state)
      start = time.perf_counter()
      while not count or time.perf_counter() - start < args.seconds:
        run_state, loss = step(run_state, stacked_batch, stacked_member)
        jax.block_until_ready(loss)
        count += 1
      ms = (time.perf_counter() - start) / count * 1e3
      runs[name] = run_state
      times[name].append(ms)
      print(f'round {round_ + 1} {name}: {ms:.1f} ms/step', flush=True)
  base = statistics.median(times['unbatched'])
  print(f'\n{args.config}, batch 8 at {config.image_size}x'
        f'{config.image_width or config.image_size}, median of {args.rounds} '
        'rounds:')
  for name in steps:
    ms = statistics.median(times[name])
    print(f'  {name}: {ms:.1f} ms/step, {ms / base:.3f}x unbatched')
  gap = np.max(np.abs(np.subtract(losses_seen['vmap'],
                                  losses_seen['unbatched'])))
  print(f'  largest loss difference over the first 5 steps: {gap:.3g} '
        f'(losses {losses_seen["unbatched"][0]:.4g} ... '
        f'{losses_seen["unbatched"][-1]:.4g})')


if __name__ == '__main__':
  main()
