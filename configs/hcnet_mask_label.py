"""hcnet_mask_label: hcnet_mask's network, trained from HC values alone.

  python -m hc_jax.main --config=configs/hcnet_mask_label.py --config.fold=0

The network of configs/hcnet_mask.py (a small U-Net whose soft mask gives the
ellipse by its moments and the HC in the graph), trained with the configured
HC loss on the moments' HC as its only supervision: the mask terms (BCE,
Dice against the reference ellipse) are off, so the training images need no
`_Annotation.png` and a data set of scans + a CSV of HC values is enough.
What the network learns is not a filled head but a mask whose second
moments give the skull's ellipse. Loss mae, 50 epochs. The paper's other two
losses: `--config.loss=mse`, `--config.loss=huber`. As configs/hcnet_mask.py
otherwise.
"""

from configs import hcnet_mask


def get_config():
  config = hcnet_mask.get_config()
  config.model = 'hcnet_mask_label'  # hcnet_mask's network, its own name.
  config.loss = 'mae'
  config.mask_loss.bce = 0.0
  config.mask_loss.dice = 0.0
  config.mask_loss.hc = 1.0
  config.mask_loss.ellipse = 0.0
  config.mask_loss.shape = 0.0
  return config
