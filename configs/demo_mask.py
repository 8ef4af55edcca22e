"""The dense model's demo: a small hcnet_mask on phantom HC18 scans.

  python -m hc_jax.main --config=configs/demo_mask.py --workdir=runs/demo_mask

Needs no data: it writes synthetic scans in the HC18 layout into the workdir
(as `configs/demo.py`). The small version of `configs/hcnet_mask.py`: half its
channels, 64x96 input, 30 epochs on 200 phantoms.
"""

from configs import demo
from configs import hcnet_mask


def get_config():
  config = demo.small_on_phantoms(hcnet_mask.get_config())
  config.image_width = 96
  config.model_options.widths = (4, 8, 16, 32, 32)
  config.num_epochs = 30
  return config
