"""python -m hc_jax.prepare: exports the prepared HC18 arrays of a config, for
a machine without TensorFlow (train there with
`--config.data.prepared=FILE.npz`). The preparation itself is
`hc_jax.data.cache`.
"""

import os
import sys

from hc_jax import cli
from hc_jax.data import cache as cache_lib


def main(argv=None) -> int:
  """Exports the prepared data of a config, for a machine without TensorFlow."""
  parser = cli.ArgumentParser(
      prog='python -m hc_jax.prepare', description=main.__doc__)
  parser.add_argument('--config', required=True, help='a config file')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--override', action='append', default=[],
                      metavar='KEY=VALUE', help='config field to change')
  args = parser.parse_args(argv)
  cli.quiet_logs()

  def run():
    from hc_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    config = cli.load_config(args.config, args.override)
    arrays, info = pipeline.prepared_arrays(config, workdir=args.out)
    height, width = info['image_hw']
    path = os.path.join(args.out, f'hc18_{height}x{width}_'
                                  f'{info["resize_mode"]}.npz')
    cache_lib.save(path, arrays, info)
    print(f'{path}: {len(arrays["images"])} scans; train elsewhere with '
          f'--config.data.prepared={path}')
    return 0

  return cli.run_main(run)


if __name__ == '__main__':
  sys.exit(main())
