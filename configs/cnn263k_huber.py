"""cnn_263k trained with the huber loss at 128x128 (the paper's setting).

  python -m hc_jax.main --config=configs/cnn263k_huber.py --config.fold=0
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'cnn_263k'
  config.loss = 'huber'
  config.image_size = 128
  return config
