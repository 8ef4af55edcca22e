"""Where the time of hc_jax's training step goes, per compiled XLA operation.

  python benchmarks/profile_step.py --model=cnn_1m --batch_size=32
      [--steps=10] [--top=25] [--image_size=S|HxW] [--plain_layers]

Runs the jitted `hc_jax.training.step.train_step` (forward, MSE, gradient, Adam) under
`jax.profiler.trace`, sums the time of each XLA operation (a fusion, a
convolution, a matrix product: what XLA:CPU runs as one thunk) over the
traced steps, and prints the costliest per step with what each one computes:
its output shape and the operations fused into it. A convolution whose output
is a kernel shape (e.g. `f32[16,3,3,32]`) is a kernel gradient.

Run it under the allocator settings of the figures you want to explain
(e.g. with GLIBC_TUNABLES, see docs/benchmarks.md).
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
if BENCHMARKS not in sys.path:  # Run as a script from anywhere.
  sys.path.insert(0, BENCHMARKS)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

import train_step as train_step_bench  # pylint: disable=wrong-import-position

SIZES = train_step_bench.SIZES
_INSTRUCTION = re.compile(r'\s+(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(')
_BORING = {'parameter', 'constant', 'bitcast', 'broadcast', 'reshape', 'tuple',
           'get-tuple-element'}


def _operations(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (output shape, 'op1 op2x3 ...')} of compiled HLO.

  For a fusion the description lists the operations it fuses.
  """
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header:
      current = bodies.setdefault(header.group(1), [])
    elif current is not None:
      current.append(line)
  described = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode = match.groups()
    called = re.search(r'calls=%?([\w.\-]+)', line)
    counts = collections.Counter()
    for inner in bodies.get(called.group(1), []) if called else []:
      inner_match = _INSTRUCTION.match(inner)
      if inner_match and inner_match.group(3) not in _BORING:
        counts[inner_match.group(3)] += 1
    fused = ' '.join(op + (f'x{n}' if n > 1 else '')
                     for op, n in counts.most_common(5))
    described[name] = (shape, fused or opcode)
  return described


def profile(model_name: str, batch_size: int, size: int, steps: int,
            fast_layers: bool) -> tuple[float, list[tuple]]:
  """Traces `steps` training steps.

  Returns:
    (ms per step, [(ms per step, operation, output shape, what it does)]),
    costliest operation first.
  """
  state, step, batch = train_step_bench.hc_jax_state_step_batch(
      model_name, batch_size, size, fast_layers)
  described = _operations(step.lower(state, batch).compile().as_text())
  for _ in range(2):  # Compile and warm up.
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      step_ms = 1e3 * (time.perf_counter() - start) / steps
    trace_file, = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'),
                            recursive=True)
    with gzip.open(trace_file) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  total_us = collections.Counter()
  for event in events:
    if event.get('ph') == 'X' and event.get('name') in described:
      total_us[event['name']] += event.get('dur', 0)
  rows = [(us / steps / 1e3, name, *described[name])
          for name, us in total_us.most_common()]
  return step_ms, rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='cnn_1m', choices=sorted(SIZES))
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument('--image_size', type=train_step_bench.parse_size,
                      default=None,
                      help='S or HxW (default: the model\'s, SIZES)')
  parser.add_argument('--plain_layers', action='store_true',
                      help="without hc_jax.nets.fast_layers (layers='plain')")
  args = parser.parse_args()
  if min(args.batch_size, args.steps, args.top) < 1:
    parser.error('--batch_size, --steps and --top must be positive')
  size = args.image_size or SIZES[args.model]
  step_ms, rows = profile(args.model, args.batch_size, size, args.steps,
                          not args.plain_layers)
  listed_ms = sum(row[0] for row in rows)
  label = train_step_bench.keras_models.hw_label(size)
  print(f'{args.model} {label} batch '
        f'{args.batch_size}: {step_ms:.1f} ms per step (traced), '
        f'{listed_ms:.1f} ms in {len(rows)} XLA operations')
  for ms, name, shape, fused in rows[:args.top]:
    print(f'{ms:8.2f} ms {100 * ms / listed_ms:5.1f} %  {name:28s} '
          f'{shape[:34]:34s} {fused}')


if __name__ == '__main__':
  main()
