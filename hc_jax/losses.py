"""Regression losses for head circumference, with optional masking.

Pure `jax.numpy` functions of `(predictions, targets, mask=None)` that return a
scalar. The mask marks the real examples of a padded evaluation batch: the loss
is the mean over the entries where the mask is true (or 1). A float mask is
used as weights, `sum(mask * loss) / sum(mask)`; an all-zero mask gives 0, not
NaN. Masked-out entries cannot leak into the loss or its gradient, even when
they hold NaN or inf.

Losses are looked up by their config name in `LOSSES`; `get_loss` binds
settings such as Huber's `delta`, given as arguments or read from a config
(`config.huber_delta`, see `CONFIG_SETTINGS`).
"""

import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

LossFn = Callable[..., jax.Array]


def _masked_mean(
    per_example_fn: Callable[[jax.Array], jax.Array],
    predictions: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None,
) -> jax.Array:
  """Averages `per_example_fn(predictions - targets)` over unmasked entries.

  Args:
    per_example_fn: Elementwise loss of the residual, zero at zero.
    predictions: Model outputs, e.g. `[batch]`.
    targets: Targets broadcastable to `predictions`.
    mask: None, or bool/float weights broadcastable to the residual.

  Returns:
    The scalar (weighted) mean loss; 0 when the mask has no weight.
  """
  residuals = jnp.asarray(predictions) - jnp.asarray(targets)
  if mask is None:
    return jnp.mean(per_example_fn(residuals))
  weights = jnp.broadcast_to(
      jnp.asarray(mask, residuals.dtype), residuals.shape)
  # Zero the residual where masked (rather than only the loss), so that NaN or
  # inf in padded entries cannot reach the loss or, through 0 * NaN, its
  # gradient.
  residuals = jnp.where(weights != 0, residuals, 0)
  total_weight = jnp.sum(weights)
  weighted_sum = jnp.sum(weights * per_example_fn(residuals))
  return jnp.where(
      total_weight > 0,
      weighted_sum / jnp.where(total_weight > 0, total_weight, 1),
      jnp.zeros_like(weighted_sum))


def mae(
    predictions: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
  """Mean absolute error.

  Args:
    predictions: Model outputs, e.g. `[batch]`.
    targets: Targets, broadcastable to `predictions`.
    mask: Optional bool or 0/1 float mask; only true entries are averaged.

  Returns:
    Scalar mean of `|predictions - targets|`.
  """
  return _masked_mean(jnp.abs, predictions, targets, mask)


def mse(
    predictions: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
  """Mean squared error.

  Args:
    predictions: Model outputs, e.g. `[batch]`.
    targets: Targets, broadcastable to `predictions`.
    mask: Optional bool or 0/1 float mask; only true entries are averaged.

  Returns:
    Scalar mean of `(predictions - targets) ** 2`.
  """
  return _masked_mean(jnp.square, predictions, targets, mask)


def huber(
    predictions: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    delta: float = 0.5,
) -> jax.Array:
  """Mean Huber loss, the paper's loss (default delta 0.5).

  Per entry, with residual `r = predictions - targets`:
  `0.5 * r**2` if `|r| <= delta`, else `delta * (|r| - 0.5 * delta)`.
  The same as `optax.huber_loss(predictions, targets, delta).mean()`.

  Args:
    predictions: Model outputs, e.g. `[batch]`.
    targets: Targets, broadcastable to `predictions`.
    mask: Optional bool or 0/1 float mask; only true entries are averaged.
    delta: Where the loss turns from quadratic to linear; positive.

  Returns:
    Scalar mean Huber loss.
  """

  def per_example(residuals):
    # Written without a branch on |r| so the gradient is smooth and finite
    # everywhere, including at r == 0 and |r| == delta.
    abs_residuals = jnp.abs(residuals)
    quadratic = jnp.minimum(abs_residuals, delta)
    linear = abs_residuals - quadratic
    return 0.5 * quadratic**2 + delta * linear

  return _masked_mean(per_example, predictions, targets, mask)


LOSSES: dict[str, LossFn] = {
    'mae': mae,
    'mse': mse,
    'huber': huber,
}


# The config entries each loss reads in `get_loss(config)`: loss name ->
# {argument of the loss: config key}.
CONFIG_SETTINGS: dict[str, dict[str, str]] = {
    'huber': {'delta': 'huber_delta'},
}


def get_loss(config_or_name: Any, **kwargs) -> LossFn:
  """Returns the loss a config (or a name) asks for, with its settings bound.

  Given a config, the loss is `config.loss` and its settings come from the
  config entries listed in `CONFIG_SETTINGS` (e.g. `config.huber_delta` for
  'huber'); entries the config lacks keep the loss's defaults.

  Args:
    config_or_name: A key of `LOSSES`, e.g. 'huber', or a config: an
      `ml_collections.ConfigDict` or any object with a `loss` attribute and
      `.get(key, default)`.
    **kwargs: Settings of that loss, e.g. `delta=0.5` for 'huber'; they take
      precedence over the config's.

  Returns:
    A function `loss(predictions, targets, mask=None) -> scalar`.

  Raises:
    ValueError: If the name is not a key of `LOSSES`.
    TypeError: If `kwargs` holds a setting the loss does not take.
  """
  if isinstance(config_or_name, str):
    name = config_or_name
  else:
    name = config_or_name.loss
  if name not in LOSSES:
    raise ValueError(
        f'Unknown loss {name!r}; known losses: {", ".join(sorted(LOSSES))}.')
  if not isinstance(config_or_name, str):
    for setting, key in CONFIG_SETTINGS.get(name, {}).items():
      value = config_or_name.get(key, None)
      if value is not None:
        kwargs.setdefault(setting, value)
  loss_fn = LOSSES[name]
  if not kwargs:
    return loss_fn
  # Fail here, not at the first training step, on a misspelt setting.
  inspect.signature(loss_fn).bind_partial(None, None, **kwargs)
  return functools.partial(loss_fn, **kwargs)
