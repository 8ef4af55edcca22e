"""HCNetMask: a small U-Net whose head mask gives the ellipse and the HC in the graph.

A fully convolutional encoder-decoder:

* encoder: one level per entry of `widths`, each two 3x3 convolutions
  (BatchNorm, ReLU), a 2x2/2 max pool between levels;
* bottleneck, at 1/2^(levels-1) of the input: two 3x3 convolutions at the
  last width, the second dilated by 2, with a global-mean context vector
  (Dense of the spatial mean) added, and optionally (`attention=True`) one
  multi-head self-attention block over the bottleneck's cells (with a
  learned 2D position embedding of the relative position, so any input size
  works);
* decoder: 2x nearest upsampling, a skip concatenation and two 3x3
  convolutions per level, up to 1/`stride` of the input; a 1x1 convolution to
  one head-mask logit per cell.

The input is padded (zeros, the z-scored mean) by `margin` input pixels on
every side, and then up to a multiple of 2^(levels-1), so any H x W works and
the mask extends `margin` pixels beyond the image: a head cut by the border
is drawn whole. The mask's cells keep exact input-pixel coordinates
(`mask_head.grid_coordinates`), so the ellipse is exact under any resize.

`__call__` returns `mask_head.geometry` of the logits: the logit map, the soft
mask's centroid and second moments, the ellipse in model-input pixels and
the quality signal. `mask_head.hc_px(outputs, resize)` is the HC in original
pixels. Registered as 'hcnet_mask' in `hc_jax.models.MODELS`, kind 'mask'.

With `refine_rays` > 0 (off by default) a boundary refinement follows the
mask (`hc_jax.nets.boundary`): from the mask's centre, `refine_rays` rays
each sample `refine_samples` points between 0.7 and 1.3 times the mask
ellipse's radius on the full-resolution features (the padded image and the
first encoder level); a small network along the rays (1D convolutions along
each ray, one circular convolution across neighbouring rays) gives a
soft-argmax radius per ray, and the polygon of those boundary points gives
the reported centre, moments and ellipse. The mask's own moments stay as
'center_coarse' and 'cov_coarse' (no gradient flows from the refinement
into them).
"""

from typing import Any, ClassVar, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp

from hc_jax.nets import boundary
from hc_jax.nets import kinds
from hc_jax.nets import layers as layers_lib
from hc_jax.nets import mask_head


# The logits' initial bias: sigmoid(-3) = 0.05.
LOGIT_PRIOR = -3.0
# Channels of the boundary refinement's convolutions along the rays.
REFINE_WIDTH = 16


class HCNetMaskError(ValueError):
  """A setting or an input the network cannot take."""


class _ConvBlock(nn.Module):
  """Two 3x3 convolutions, each BatchNorm + ReLU."""

  width: int
  layers: str
  dtype: Any
  dilation: int = 1

  @nn.compact
  def __call__(self, x, train):
    layers = layers_lib.Layers(self.layers, self.dtype)
    for i, dilation in enumerate((1, self.dilation)):
      x = layers.conv(self.width, use_bias=False,
                      kernel_dilation=(dilation, dilation), name=f'conv{i}')(x)
      x = nn.relu(layers.batch_norm(train, 0.99, 1e-3, name=f'bn{i}')(x))
    return x


class _Attention(nn.Module):
  """Pre-norm multi-head self-attention over the cells, residual."""

  heads: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    batch, rows, cols, width = x.shape
    tokens = x.reshape(batch, rows * cols, width).astype(jnp.float32)
    # Position: a small MLP of each cell's (row, col) in [-1, 1].
    yy, xx = jnp.meshgrid(jnp.linspace(-1, 1, rows), jnp.linspace(-1, 1, cols),
                          indexing='ij')
    pos = jnp.stack([yy, xx], -1).reshape(1, rows * cols, 2)
    pos = nn.Dense(width, name='position')(nn.tanh(
        nn.Dense(16, name='position_hidden')(pos)))
    h = nn.LayerNorm(name='norm')(tokens + pos)
    h = nn.MultiHeadDotProductAttention(num_heads=self.heads,
                                        name='attention')(h, h)
    return (tokens + h).reshape(batch, rows, cols, width).astype(x.dtype)


class _Boundary(nn.Module):
  """The boundary along rays from the mask's ellipse, and its polygon's moments.

  Attributes:
    rays: K, the rays (evenly spaced angles).
    samples: R, the radial positions on each ray.
    margin: input pixels of the feature canvas before the input's first.
    layers: 'plain' or 'fast'.
    dtype: compute dtype of the convolutions.
  """

  rays: int
  samples: int
  margin: int
  layers: str
  dtype: Any

  @nn.compact
  def __call__(self, features, center, cov):
    """Finds the boundary on each ray.

    Args:
      features: `[B, H, W, C]` on the padded canvas, one element per input
        pixel (the input's pixel (0, 0) at [margin, margin]).
      center: `[B, 2]` the rays' origin, model-input pixels.
      cov: `[B, 2, 2]` the first ellipse's moments.

    Returns:
      (radius `[B, K]` of the boundary on each ray, the polygon's centre
      `[B, 2]` and moments `[B, 2, 2]`, model-input pixels).
    """
    batch, height, width, channels = features.shape
    direction = boundary.directions(self.rays)  # [K, 2]
    radius = jnp.clip(boundary.ellipse_radius(cov, direction), 1.0,
                      float(max(height, width)))
    positions = boundary.radial_positions(radius, self.samples)  # [B, K, R]
    points = (center[:, None, None, :] +
              positions[..., None] * direction[:, None, :])
    # Input pixel centres are at integers (`mask_head.grid_coordinates`);
    # the canvas holds pixel (x, y) at [y + margin, x + margin].
    strip = boundary.bilinear(
        features, points.reshape(batch, -1, 2) + self.margin)
    strip = strip.reshape(batch, self.rays, self.samples, channels)
    where = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, self.samples),
                             (batch, self.rays, self.samples))
    x = jnp.concatenate([strip.astype(self.dtype),
                         where[..., None].astype(self.dtype)], -1)
    layers = layers_lib.Layers(self.layers, self.dtype)
    # [B, K, R, C] as an image: rays down, radial positions across.
    x = nn.relu(layers.conv(REFINE_WIDTH, (1, 5), padding=((0, 0), (2, 2)),
                            name='radial0')(x))
    # Neighbouring rays, around the circle.
    x = jnp.concatenate([x[:, -1:], x, x[:, :1]], 1)
    x = nn.relu(layers.conv(REFINE_WIDTH, (3, 1), padding='VALID',
                            name='across')(x))
    x = nn.relu(layers.conv(REFINE_WIDTH, (1, 5), padding=((0, 0), (4, 4)),
                            kernel_dilation=(1, 2), name='radial1')(x))
    # Small initial logits: the soft-argmax starts near the mean position,
    # the first ellipse itself.
    logits = layers.conv(1, (1, 1), dtype=jnp.float32,
                         kernel_init=nn.initializers.normal(1e-2),
                         name='logits')(x)[..., 0]
    weights = jax.nn.softmax(logits.astype(jnp.float32), -1)
    ray_radius = jnp.sum(weights * positions, -1)
    _, refined_center, refined_cov = boundary.polygon_moments(
        center[:, None, :] + ray_radius[..., None] * direction)
    return ray_radius, refined_center, refined_cov


class HCNetMask(nn.Module):
  """The dense HC model.

  Attributes:
    widths: channels of each encoder level (the last is the bottleneck's).
    stride: input pixels per mask cell, a power of two below
      2^(len(widths)-1) (2: the mask at half the input resolution).
    margin: input pixels of mask beyond each image border (a multiple of
      `stride`).
    attention: one self-attention block at the bottleneck.
    attention_heads: its heads.
    moments: 'plain' or 'window' (`mask_head.moments`).
    window_radius: the window's normalised radius for 'window'.
    refine_rays: rays of the boundary refinement (0: none, the mask's
      moments are the output).
    refine_samples: radial positions on each ray.
    layers: 'plain' or 'fast' (see `hc_jax.nets.layers`).
    dtype: compute dtype; the logits and the geometry stay float32.
  """

  output_kind: ClassVar[kinds.Kind] = kinds.MASK

  widths: Sequence[int] = (8, 16, 32, 64, 64)
  stride: int = 2
  margin: int = 8
  attention: bool = False
  attention_heads: int = 4
  moments: str = 'plain'
  window_radius: float = 1.4
  refine_rays: int = 0
  refine_samples: int = 32
  layers: str = 'plain'
  dtype: Any = jnp.float32

  def __post_init__(self):
    self._check_fields()
    super().__post_init__()

  def _check_fields(self):
    levels = len(self.widths)
    if levels < 2 or min(self.widths) < 1:
      raise HCNetMaskError(f'widths must be at least two positive channel '
                           f'counts, got {tuple(self.widths)}')
    if self.stride < 1 or self.stride & (self.stride - 1) or (
        self.stride >= 2 ** (levels - 1)):
      raise HCNetMaskError(f'stride must be a power of two below '
                           f'{2 ** (levels - 1)}, got {self.stride}')
    if self.margin < 0 or self.margin % self.stride:
      raise HCNetMaskError(f'margin must be a non-negative multiple of the '
                           f'stride {self.stride}, got {self.margin}')
    if not self.window_radius > 0:  # False for NaN.
      raise HCNetMaskError(f'window_radius must be positive, got '
                           f'{self.window_radius}')
    if self.moments not in mask_head.MOMENT_MODES:
      raise HCNetMaskError(f'moments must be one of '
                           f'{", ".join(mask_head.MOMENT_MODES)}, got '
                           f'{self.moments!r}')
    if self.refine_rays < 0 or 0 < self.refine_rays < 3:
      raise HCNetMaskError(f'refine_rays must be 0 (no refinement) or at '
                           f'least 3, got {self.refine_rays}')
    if self.refine_samples < 2:
      raise HCNetMaskError(f'refine_samples must be at least 2, got '
                           f'{self.refine_samples}')

  def smallest_input(self) -> int:
    """The smallest height and width it takes: the image itself (not its
    margin) must span at least two cells of the bottleneck, at
    1/2^(len(widths) - 1) of the input; a smaller input still runs, on
    little but the zero margin, and trains a useless mask (a 7x7 input
    gave a 915 mm MAE)."""
    return 2 ** len(self.widths)

  def _check(self, x):
    if x.ndim != 4:
      raise HCNetMaskError('expected images of shape [batch, height, width, '
                           f'1], got {x.shape}')

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    """Predicts the head mask and its geometry.

    Args:
      x: z-scored images `[batch, height, width, 1]`, any height and width.
      train: whether to use batch statistics.

    Returns:
      `mask_head.geometry`: 'logits' `[batch, rows, cols]` with rows =
      ceil(height / stride) + 2 margin / stride (likewise cols), 'center',
      'cov', 'ellipse_in' (model-input pixels), 'mass', 'quality'. With
      `refine_rays` > 0, 'center', 'cov' and 'ellipse_in' are the refined
      boundary's, the mask's are 'center_coarse' and 'cov_coarse', and
      'ray_radius' `[batch, refine_rays]` is the boundary's distance from
      'center_coarse' along each ray (`boundary.directions`).
    """
    self._check(x)
    levels = len(self.widths)
    height, width = x.shape[1:3]
    unit = 2 ** (levels - 1)
    m = self.margin
    pad_h = -(height + 2 * m) % unit
    pad_w = -(width + 2 * m) % unit
    x = jnp.pad(x, ((0, 0), (m, m + pad_h), (m, m + pad_w), (0, 0)))
    x = x.astype(self.dtype)
    canvas = x
    skips = []
    for i, channels in enumerate(self.widths[:-1]):
      x = _ConvBlock(channels, self.layers, self.dtype, name=f'down{i}')(
          x, train)
      skips.append(x)
      x = layers_lib.Layers(self.layers, self.dtype).max_pool(x)
    x = _ConvBlock(self.widths[-1], self.layers, self.dtype, dilation=2,
                   name='bottleneck')(x, train)
    context = nn.Dense(self.widths[-1], dtype=self.dtype, name='context')(
        jnp.mean(x, axis=(1, 2)))
    x = x + context[:, None, None, :]
    if self.attention:
      x = _Attention(self.attention_heads, self.dtype, name='attention')(x)
    level = levels - 1
    while 2 ** (level - 1) >= self.stride:
      level -= 1
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = jnp.concatenate([x, skips[level]], -1)
      x = _ConvBlock(self.widths[level], self.layers, self.dtype,
                     name=f'up{level}')(x, train)
    # The bias starts at LOGIT_PRIOR: the background, most of the canvas,
    # starts near 0 rather than at 0.5, which would put the moments' ellipse
    # over the whole canvas.
    logits = layers_lib.Layers(self.layers, jnp.float32).conv(
        1, (1, 1),
        dtype=jnp.float32,
        bias_init=nn.initializers.constant(LOGIT_PRIOR),
        name='logits')(x)[..., 0]
    cells = m // self.stride
    rows = -(-height // self.stride) + 2 * cells
    cols = -(-width // self.stride) + 2 * cells
    logits = logits[:, :rows, :cols]
    outputs = mask_head.geometry(logits, self.stride, cells, self.moments,
                                 self.window_radius)
    if not self.refine_rays:
      return outputs
    center = jax.lax.stop_gradient(outputs['center'])
    cov = jax.lax.stop_gradient(outputs['cov'])
    ray_radius, refined_center, refined_cov = _Boundary(
        self.refine_rays, self.refine_samples, m, self.layers, self.dtype,
        name='boundary')(jnp.concatenate([canvas, skips[0]], -1), center, cov)
    return {**outputs, 'center_coarse': outputs['center'],
            'cov_coarse': outputs['cov'], 'center': refined_center,
            'cov': refined_cov,
            'ellipse_in': mask_head.ellipse_from_moments(refined_center,
                                                         refined_cov),
            'ray_radius': ray_radius}


class HCNetMaskLabel(HCNetMask):
  """`HCNetMask` trained from HC values alone (configs/hcnet_mask_label.py).

  The same network and outputs; registered under its own name so that what
  depends on how it was trained follows it: its mask is not a filled head
  (its moments give the skull's ellipse), so the quality signal of
  `HCNetMask` (the mask's agreement with its own ellipse) says nothing here:
  its kind is `kinds.MASK_LABEL`, the mask kind without that signal.
  """

  output_kind: ClassVar[kinds.Kind] = kinds.MASK_LABEL
