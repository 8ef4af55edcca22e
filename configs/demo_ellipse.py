"""The demo's ellipse variant: a small hcnet_ellipse on phantom HC18 scans.

  python -m hc_jax.main --config=configs/demo_ellipse.py --workdir=runs/demo_ellipse

As `configs/demo.py`, for `configs/hcnet_ellipse.py` (phantoms carry their
reference ellipses): `python -m hc_jax.predict --workdir=runs/demo_ellipse`
also writes each scan's ellipse and draws it on the overlays.
"""

from configs import demo
from configs import hcnet_ellipse


def get_config():
  return demo.small_on_phantoms(hcnet_ellipse.get_config())
