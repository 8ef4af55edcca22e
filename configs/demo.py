"""The built-in demo: a small hcnet_mask on phantom HC18 scans, about 1 minute 45 s on a 2-core CPU.

  python -m hc_jax.main --config=configs/demo.py --workdir=runs/demo

Needs no data: it writes synthetic scans in the HC18 layout into the workdir.
The model is the small version of the recommended `configs/hcnet_mask.py`
(the dense model at 64x96, 30 epochs, on 200 phantoms).
`configs/demo_label.py` and `configs/demo_ellipse.py` are the same for the
label-only `hcnet` and for `hcnet_ellipse`.
"""

from configs import hcnet_mask


def small_on_phantoms(config):
  """`config` at 64x64 on 200 phantom scans, 40 epochs (2 warm-up), with the
  widths (8, 16, 32, 64, 64); `get_config` makes it 64x96, 30 epochs."""
  config.data.source = 'synthetic'
  config.data.num_synthetic = 200
  config.image_size = 64
  config.image_width = 0
  config.model_options.widths = (8, 16, 32, 64, 64)
  config.num_epochs = 40
  config.warmup_epochs = 2
  return config


def get_config():
  config = small_on_phantoms(hcnet_mask.get_config())
  config.image_width = 96  # The 540x800 phantoms' aspect, as the full config.
  config.num_epochs = 30
  return config
