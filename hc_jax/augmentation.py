"""Settings of the training augmentation, shared by both augmentation paths.

`hc_jax.preprocess` applies them in tf.data, `hc_jax.device_augment` in JAX on
the accelerator. This module imports neither TensorFlow nor JAX.
"""

import dataclasses
from typing import Any, Mapping, Optional, Tuple

# Smallest standard deviation a z-score divides by, so a blank frame gives
# zeros rather than NaN.
ZSCORE_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Settings of the training augmentation, on either path.

  Frozen and hashable, so it can be a static argument of `jax.jit`.

  Attributes:
    flip: horizontal flip with probability 0.5.
    max_translate_px: shift drawn uniformly in ±this per axis, in pixels.
    max_rotate_deg: rotation about the centre drawn uniformly in ±this.
    scale_range: None, or `(min_scale, max_scale)` of a zoom about the centre
      that multiplies HC.
  """
  flip: bool = True
  max_translate_px: float = 5.0
  max_rotate_deg: float = 10.0
  scale_range: Optional[Tuple[float, float]] = None

  def __post_init__(self):
    if self.max_translate_px < 0 or self.max_rotate_deg < 0:
      raise ValueError(f'Augmentation ranges must be >= 0: {self}.')
    if self.scale_range is not None:
      min_scale, max_scale = self.scale_range
      if not 0 < min_scale <= max_scale:
        raise ValueError(
            f'scale_range must satisfy 0 < min <= max, got {self.scale_range}.')
      object.__setattr__(self, 'scale_range',
                         (float(min_scale), float(max_scale)))

  @classmethod
  def from_dict(cls, fields: Optional[Mapping[str, Any]]) -> 'AugmentConfig':
    """From a dict of the fields (a config's `augment`); None: no augmentation.

    Raises:
      ValueError: for an unknown field or a bad range.
    """
    if fields is None:
      return NO_AUGMENT
    if hasattr(fields, 'to_dict'):  # An ml_collections.ConfigDict.
      fields = fields.to_dict()
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f'unknown augmentation settings {unknown}')
    return cls(**fields)

  @property
  def has_affine(self):
    """Whether any rotation, translation or zoom is drawn."""
    return (self.max_translate_px > 0 or self.max_rotate_deg > 0 or
            self.scale_range is not None)


NO_AUGMENT = AugmentConfig(flip=False, max_translate_px=0.0, max_rotate_deg=0.0)
