"""The demo's ellipse variant: a small hcnet_ellipse on phantom HC18 scans.

  python -m hc_jax.main --config=configs/demo_ellipse.py --workdir=runs/demo_ellipse

A 64x64 input, 40 epochs (2 warm-up), the widths (8, 16, 32, 64, 64), on 200
phantom scans written into the workdir (phantoms carry their reference
ellipses). That is `configs/hcnet_ellipse.py` made small by the helper of
`configs/demo.py` (which itself goes on to 64x96 and 30 epochs). Predicting
the run's phantom test scans also writes each scan's ellipse and draws it on
the overlays:

  python -m hc_jax.predict --workdir=runs/demo_ellipse \
      --images=runs/demo_ellipse/data/hc18_synthetic/test_set \
      --out=runs/demo_ellipse/test_set.csv --overlays=runs/demo_ellipse/overlays
"""

from configs import demo
from configs import hcnet_ellipse


def get_config():
  return demo.small_on_phantoms(hcnet_ellipse.get_config())
