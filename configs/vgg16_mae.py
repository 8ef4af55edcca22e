"""vgg16 trained with the mae loss at 224x224 (the paper's setting).

  python -m hc_jax.main --config=configs/vgg16_mae.py --config.fold=0
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'vgg16'
  config.loss = 'mae'
  config.image_size = 224
  return config
