"""resnet50 trained with the huber loss at 224x224 (the paper's setting).

  python -m hc_jax.main --config=configs/resnet_huber.py --config.fold=0
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'resnet50'
  config.loss = 'huber'
  config.image_size = 224
  return config
