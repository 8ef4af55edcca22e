"""hcnet_mask with a boundary refinement: the skull placed along rays at full resolution.

The recommended model (shipped as hc_jax/shipped/hcnet_mask_refine.npz).

  python -m hc_jax.main --config=configs/hcnet_mask_refine.py --config.fold=0

The network of configs/hcnet_mask.py (a small U-Net whose soft mask, at half
the input resolution, gives a first ellipse by its moments) followed by a
boundary refinement (hc_jax/nets/boundary.py): 64 rays from the mask's
centre each sample 32 points between 0.7 and 1.3 times the first ellipse's
radius on the full-resolution features (the padded image and the first
encoder level); 1D convolutions along the rays and one across neighbouring
rays give a soft-argmax boundary radius per ray, and the polygon of the 64
boundary points gives the ellipse and the HC in the graph. The mask trains
on BCE + soft Dice as before; the HC loss (mae) trains the refined HC, and
a ray term (`mask_loss.rays`) the distance of each ray's boundary to where
the ray leaves the reference ellipse. As configs/hcnet_mask.py otherwise.
"""

from configs import hcnet_mask


def get_config():
  config = hcnet_mask.get_config()
  config.model_options.refine_rays = 64
  config.model_options.refine_samples = 32
  config.mask_loss.rays = 1.0
  return config
