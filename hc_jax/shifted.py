"""Writes a shifted copy of HC18: "another machine" (gain curve, blur, zoomed
out with a border, JPEG artefacts) or re-framed (zoomed in or out, cut to
the sector); hc_jax/data/shift.py says exactly what changes.

  python -m hc_jax.shifted --out=hc18_other_machine [--hc18_dir=DIR]
  python -m hc_jax.shifted --how=reframed --out=hc18_reframed

The copy is in the HC18 layout (training set only, no annotations), for
measuring a model's transfer (`python -m hc_jax.cv_score
--runs=hc_jax/shipped/hcnet_mask.npz --hc18_dir=hc18_other_machine`) and
fine-tuning on a few of its scans (docs/results.md, "Fine-tuning").
"""

import argparse
import sys
import time

from hc_jax import cli
from hc_jax import log
from hc_jax.data import hc18
from hc_jax.data import shift


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m hc_jax.shifted', description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True,
                      help='a new directory for the copy')
  parser.add_argument('--how', choices=('other_machine', 'reframed'),
                      default='other_machine',
                      help='another machine (gain, blur, zoomed out, JPEG) or '
                      're-framed (zoom in/out, cut to the sector); '
                      'hc_jax/data/shift.py')
  parser.add_argument('--hc18_dir', default='',
                      help='HC18 in the Zenodo layout (default: $HC18_DIR or '
                      '../shared/hc18)')
  args = parser.parse_args(argv)

  def run():
    root = args.hc18_dir or hc18.default_dir()
    if not root:
      raise ValueError('HC18 not found: pass --hc18_dir=DIR or set HC18_DIR')
    started = time.time()
    count = shift.write(root, args.out, args.how)
    log.status(f'wrote {count} shifted scans to {args.out} in '
               f'{time.time() - started:.0f} s')
    return 0

  return cli.run_main(run)


if __name__ == '__main__':
  sys.exit(main())
