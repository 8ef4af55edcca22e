"""python -m hc_jax.plausibility: how well predict's statuses single out bad
predictions, on the cross-validation test folds of a grid.

  python -m hc_jax.plausibility --root=runs/grid [--hc18_dir=DIR]

Prints a markdown table, one row per configuration of the grid; what it
counts is `hc_jax.evaluation.plausibility`.
"""

import os
import sys
from typing import Sequence

from hc_jax import cli
from hc_jax.data import hc18
from hc_jax.evaluation import cv_table
from hc_jax.evaluation import plausibility


def main(argv: Sequence[str] | None = None) -> int:
  """Prints the table of a grid's statuses against its errors."""
  parser = cli.ArgumentParser(prog='python -m hc_jax.plausibility',
                              description=__doc__.splitlines()[0])
  parser.add_argument('--root', required=True, help='a grid directory')
  parser.add_argument('--hc18_dir', default=None,
                      help='HC18 copy (default: $HC18_DIR or ../shared/hc18)')
  args = parser.parse_args(argv)

  def run():
    if not os.path.isdir(args.root):
      raise ValueError(f'--root {args.root} is not a directory')
    root = args.hc18_dir or hc18.default_dir()
    if not root:
      raise ValueError('HC18 not found: pass --hc18_dir=DIR or set HC18_DIR')
    cli.quiet_logs()  # After the checks: a mistake is one line at once.
    images_dir = os.path.join(root, hc18.SPLITS['train'][0])
    rows = [plausibility.config_row(config_dir, images_dir)
            for config_dir in cv_table.config_dirs(args.root)]
    print(plausibility.format_markdown(rows))
    return 0

  return cli.run_main(run)


if __name__ == '__main__':
  sys.exit(main())
