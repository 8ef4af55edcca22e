"""The built-in demo: a small hcnet_ellipse on phantom HC18 scans, about a minute on a CPU.

  python -m hc_jax.main --config=configs/demo.py --workdir=runs/demo

Needs no data: it writes synthetic scans in the HC18 layout (each with its
reference ellipse) into the workdir. The model is the small version of the
recommended `configs/hcnet_ellipse.py` (half its channels, 64x64 input), so
`python -m hc_jax.predict --workdir=runs/demo ...` writes the ellipse too.
"""

from configs import hcnet_ellipse


def get_config():
  config = hcnet_ellipse.get_config()
  config.data.source = 'synthetic'
  config.data.num_synthetic = 200
  config.image_size = 64
  config.image_width = 0
  config.model_options.widths = (8, 16, 32, 64, 64)
  config.num_epochs = 40
  config.warmup_epochs = 2
  config.log_every_steps = 20
  return config
