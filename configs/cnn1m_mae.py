"""cnn_1m trained with the mae loss at 128x128 (the paper's setting).

  python -m hc_jax.main --config=configs/cnn1m_mae.py --config.fold=0
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'cnn_1m'
  config.loss = 'mae'
  config.image_size = 128
  return config
