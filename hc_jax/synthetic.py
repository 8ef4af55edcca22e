"""python -m hc_jax.synthetic: writes phantom HC18 data, ultrasound-like scans
of elliptical skulls laid out as HC18, so the pipeline runs end to end
without the data (`hc_jax.data.phantom_set`). It imports no TensorFlow or JAX,
and writes only into a new (or empty) directory.

  python -m hc_jax.synthetic --out /tmp/hc18_phantom --num_train 40 --num_test 10
"""

import os
import sys
from typing import Sequence

from hc_jax import cli
from hc_jax.data import phantom_set


def main(argv: Sequence[str] | None = None) -> int:
  """Writes a phantom HC18 directory; returns the exit status."""
  parser = cli.ArgumentParser(prog='python -m hc_jax.synthetic',
                              description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='Directory to write.')
  parser.add_argument('--num_train', type=int, default=20,
                      help='Training images.')
  parser.add_argument('--num_test', type=int, default=5, help='Test images.')
  parser.add_argument('--seed', type=int, default=0, help='Non-negative seed.')
  args = parser.parse_args(argv)
  for flag, value in (('--num_train', args.num_train),
                      ('--num_test', args.num_test), ('--seed', args.seed)):
    if value < 0:
      parser.error(f'{flag} must be >= 0, got {value}')
  if os.path.exists(args.out) and not (os.path.isdir(args.out)
                                       and not os.listdir(args.out)):
    parser.error(f'--out {args.out} exists and is not an empty directory; '
                 'nothing written (give a new directory)')

  def run():
    summary = phantom_set.write_hc18(args.out, args.num_train, args.num_test,
                                     args.seed)
    num_subjects = len({record['subject_id'] for record in summary['train']})
    print(f'Wrote {len(summary["train"])} training images of {num_subjects} '
          f'subjects and {len(summary["test"])} test images to '
          f'{summary["root"]}')

  return cli.run_main(run)


if __name__ == '__main__':
  sys.exit(main())
