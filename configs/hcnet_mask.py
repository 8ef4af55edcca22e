"""hcnet_mask (a head mask; its ellipse by moments and the HC in the graph).

  python -m hc_jax.main --config=configs/hcnet_mask.py --config.fold=0

A small U-Net (hc_jax/nets/hcnet_mask.py, 308,985 parameters) at 128x192 (HC18's
800x540 aspect kept), the mask at half the input resolution with an 8-pixel
margin beyond the border. The filled reference ellipse is rendered in the
step by pixel coverage from the augmented ellipse; the loss is BCE + soft
Dice on the mask plus the mae of the moments' normalised HC
(hc_jax/nets/mask_head.py). AdamW 1e-3 (weight decay 1e-4), cosine schedule with 3
warm-up epochs, 50 epochs (about 30 minutes per fold on one CPU core). The
moments are taken under a soft window around a first pass (`moments='window'`),
so that stray blobs far from the head do not move them.
"""

import ml_collections

from configs import hcnet_label


def get_config():
  config = hcnet_label.get_config()
  config.model = 'hcnet_mask'
  config.image_size = 128
  config.image_width = 192
  config.num_epochs = 50
  config.warmup_epochs = 3
  config.weight_decay = 1e-4
  # hcnet_mask's fields (hc_jax/nets/hcnet_mask.py), each settable on the
  # command line.
  config.model_options = ml_collections.ConfigDict(dict(
      widths=(8, 16, 32, 64, 64), stride=2, margin=8, attention=False,
      moments='window', window_radius=1.4))
  config.mask_loss.bce = 1.0
  config.mask_loss.dice = 1.0
  config.mask_loss.hc = 1.0
  config.mask_loss.ellipse = 0.0
  return config
