"""The built-in demo: a small hcnet_mask on phantom HC18 scans, about 1 minute 45 s on a 2-core CPU.

  python -m hc_jax.main --config=configs/demo.py --workdir=runs/demo

Needs no data: it writes 200 phantom scans in the HC18 layout into the
workdir. The model is `configs/hcnet_mask.py` (the recommended model without
its boundary refinement: its widths, loss and schedule) made small in its
input and epochs. Here: a 64x96 input
(the phantoms' aspect), 30 epochs (2 warm-up), the widths (8, 16, 32, 64, 64).
`configs/demo_label.py` and `configs/demo_ellipse.py` make the label-only
`hcnet` and `hcnet_ellipse` small with the same helper but keep its square
64x64 input and 40 epochs.
"""

from configs import hcnet_mask


def small_on_phantoms(config):
  """Sets `config` to 200 phantom scans, a 64x64 input, 40 epochs (2 warm-up)
  and the widths (8, 16, 32, 64, 64), and returns it.

  `get_config` below then makes the demo's input 64x96 and trains it for 30
  epochs. `configs/demo_label.py` and `configs/demo_ellipse.py` keep what
  this sets.
  """
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
