"""The built-in demo: a small hcnet on phantom HC18 scans, about a minute on a CPU.

  python -m hc_jax.main --config=configs/demo.py --workdir=runs/demo

Needs no data: it writes synthetic scans in the HC18 layout into the workdir.
The model is the small version of the recommended `configs/hcnet_label.py`
(half its channels, 64x64 input, 40 epochs). `configs/demo_ellipse.py` is
the same for the ellipse variant, `configs/hcnet_ellipse.py`.
"""

from configs import hcnet_label


def small_on_phantoms(config):
  """`config` at half its channels and 64x64, on 200 phantoms, 40 epochs."""
  config.data.source = 'synthetic'
  config.data.num_synthetic = 200
  config.image_size = 64
  config.image_width = 0
  config.model_options.widths = (8, 16, 32, 64, 64)
  config.num_epochs = 40
  config.warmup_epochs = 2
  config.log_every_steps = 20
  return config


def get_config():
  return small_on_phantoms(hcnet_label.get_config())
