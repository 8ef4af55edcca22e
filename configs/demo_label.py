"""A small label-only hcnet on phantom HC18 scans, about a minute on a CPU.

  python -m hc_jax.main --config=configs/demo_label.py --workdir=runs/demo_label

A 64x64 input, 40 epochs (2 warm-up), the widths (8, 16, 32, 64, 64), on
200 phantom scans written into the workdir. That is `configs/hcnet_label.py`
with half its channels, a smaller input and fewer epochs, made small by the
helper of `configs/demo.py` (which itself goes on to 64x96 and 30 epochs).
"""

from configs import demo
from configs import hcnet_label


def get_config():
  return demo.small_on_phantoms(hcnet_label.get_config())
