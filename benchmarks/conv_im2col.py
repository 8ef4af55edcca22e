"""3x3 convolutions on this CPU: XLA's against im2col + one matrix product.

  python benchmarks/conv_im2col.py [--shapes=8x64x16x32,8x32x32x64]
      [--rounds=5] [--calls=10]

Times forward + both gradients (input and kernel) of a 'SAME' 3x3
convolution, N x H x H x C -> C_out, written two ways in the same run,
alternating: `lax.conv_general_dilated` (XLA's, what hc_jax's models use for
these layers) and im2col (the nine shifted windows concatenated, then one
`jnp.dot`, which XLA hands to its matrix-product library; autodiff gives the
backward pass). The default shapes are the "1M" CNN's second and third
convolutions at batch 8 and 32. Prints the median ms of each and the ratio
XLA / im2col (above 1: im2col faster). The two agree on values (checked).
"""

import argparse
import time

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np


def conv_xla(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def conv_im2col(x, kernel):
  n, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  columns = jnp.concatenate([padded[:, i:i + h, j:j + w, :]
                             for i in range(3) for j in range(3)], axis=-1)
  return jnp.dot(columns.reshape(-1, 9 * c),
                 kernel.reshape(9 * c, -1)).reshape(n, h, w, -1)


def forward_backward(conv):
  def loss(x, kernel, cotangent):
    return jnp.sum(conv(x, kernel) * cotangent)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def parse_shape(text: str) -> tuple[int, int, int, int]:
  parts = tuple(int(p) for p in text.split('x'))
  if len(parts) != 4 or min(parts) < 1:
    raise argparse.ArgumentTypeError(f'shape must be NxHxCxC_OUT, got {text}')
  return parts


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', default='8x64x16x32,8x32x32x64,'
                      '32x64x16x32,32x32x32x64')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--calls', type=int, default=10)
  args = parser.parse_args(argv)
  try:
    shapes = [parse_shape(s) for s in args.shapes.split(',')]
  except (ValueError, argparse.ArgumentTypeError) as error:
    parser.error(str(error))
  rng = np.random.default_rng(0)
  ways = {'xla': forward_backward(conv_xla),
          'im2col': forward_backward(conv_im2col)}
  print(f'{jax.devices()[0].device_kind}, jax {jax.__version__}')
  for n, h, c, c_out in shapes:
    x = jnp.asarray(rng.normal(size=(n, h, h, c)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, c, c_out)) * 0.1, jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(n, h, h, c_out)), jnp.float32)
    outputs = {name: f(x, kernel, cotangent) for name, f in ways.items()}
    for a, b in zip(jax.tree.leaves(outputs['xla']),
                    jax.tree.leaves(outputs['im2col'])):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(
          np.abs(a).max()))
    times = {name: [] for name in ways}
    for _ in range(args.rounds):
      for name, f in ways.items():
        jax.block_until_ready(f(x, kernel, cotangent))
        start = time.perf_counter()
        for _ in range(args.calls):
          out = f(x, kernel, cotangent)
        jax.block_until_ready(out)
        times[name].append((time.perf_counter() - start) / args.calls * 1e3)
    xla, im2col = np.median(times['xla']), np.median(times['im2col'])
    print(f'{n}x{h}x{h}x{c} -> {c_out}: xla {xla:.2f} ms, im2col '
          f'{im2col:.2f} ms, xla / im2col {xla / im2col:.2f}', flush=True)


if __name__ == '__main__':
  main()
