"""A small label-only hcnet on phantom HC18 scans, about a minute on a CPU.

  python -m hc_jax.main --config=configs/demo_label.py --workdir=runs/demo_label

`configs/hcnet_label.py` with half its channels at 64x64, for 40 epochs on
200 phantoms written into the workdir (as `configs/demo.py`).
"""

from configs import demo
from configs import hcnet_label


def get_config():
  return demo.small_on_phantoms(hcnet_label.get_config())
