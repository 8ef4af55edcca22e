"""Images per second of hc_jax's full training step (forward, loss, gradient, Adam).

  python benchmarks/train_step.py --models=cnn_263k,cnn_1m --batch_sizes=8,32

Prints one line per model and batch size. Run it under different environments
(e.g. with and without GLIBC_TUNABLES) in the same session to compare: figures
vary ±20 % between processes on a 2-core CPU, so alternate and repeat.
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hc_jax import losses
from hc_jax import models
from hc_jax import train

SIZES = {'cnn_263k': 128, 'cnn_1m': 128, 'vgg16': 224, 'resnet50': 224}


def images_per_second(model_name: str, batch_size: int, seconds: float) -> float:
  """Times the jitted train step of `hc_jax.train` on random data."""
  size = SIZES[model_name]
  model = models.create_model(model_name)
  variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 1)),
                         train=False)
  state = train.TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      batch_stats=variables.get('batch_stats', {}), tx=optax.adam(1e-3))
  step = jax.jit(functools.partial(train.train_step, loss_fn=losses.mse,
                                   dropout_key=jax.random.key(1)),
                 donate_argnums=(0,))
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(batch_size, size, size, 1)),
                                jnp.float32),
           'target': jnp.asarray(rng.uniform(0.2, 1.0, batch_size), jnp.float32)}
  for _ in range(3):  # Compile and warm up.
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    state, metrics = step(state, batch)
    count += 1
  jax.block_until_ready(metrics)
  return count * batch_size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='cnn_263k,cnn_1m')
  parser.add_argument('--batch_sizes', default='8,32')
  parser.add_argument('--seconds', type=float, default=5.0)
  args = parser.parse_args()
  for name in args.models.split(','):
    for batch_size in map(int, args.batch_sizes.split(',')):
      rate = images_per_second(name, batch_size, args.seconds)
      print(f'hc_jax {name} {SIZES[name]}x{SIZES[name]} batch {batch_size}: '
            f'{rate:.1f} img/s', flush=True)


if __name__ == '__main__':
  main()
