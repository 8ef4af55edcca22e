"""The built-in demo: the 263K CNN on phantom HC18 scans, about a minute on a CPU.

  python -m hc_jax.main --config=configs/demo.py --workdir=runs/demo

Needs no data: it writes synthetic scans in the HC18 layout into the workdir.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'synthetic'
  config.data.num_synthetic = 200
  config.image_size = 64
  config.num_epochs = 40
  config.log_every_steps = 20
  return config
