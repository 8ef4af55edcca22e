"""Regression losses for head circumference, with optional masking.

Pure `jax.numpy` functions of `(predictions, targets, mask=None)` that return a
scalar. The mask marks the real examples of a padded evaluation batch: the loss
is the mean over the entries where the mask is true (or 1). A float mask is
used as weights, `sum(mask * loss) / sum(mask)`; an all-zero mask gives 0, not
NaN. Masked-out entries cannot leak into the loss or its gradient, even when
they hold NaN or inf.

Losses are looked up by their config name in `LOSSES` when a run starts
(`config.loss`), so a loss added with `register` trains as the built-in ones
do: from a script that registers it before calling
`train.train_and_evaluate`, or from `python -m hc_jax.main` and
`python -m hc_jax.grid` with `--losses_module=FILE_OR_MODULE`, which imports
the module that registers it. `masked_mean` builds a loss from an elementwise
function of the residual with the masking above:

  from hc_jax import losses

  @losses.register('log_cosh')
  def log_cosh(predictions, targets, mask=None):
    return losses.masked_mean(
        lambda r: jnp.logaddexp(r, -r) - jnp.log(2.0), predictions, targets,
        mask)

`get_loss` binds settings such as Huber's `delta`, given as arguments or read
from a config (`config.huber_delta`, see `CONFIG_SETTINGS`).
"""

import functools
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

from hc_jax import log

LossFn = Callable[..., jax.Array]


def masked_mean(
    per_example_fn: Callable[[jax.Array], jax.Array],
    predictions: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None,
) -> jax.Array:
  """Averages `per_example_fn(predictions - targets)` over unmasked entries.

  The building block of every loss here, for losses of one's own
  (`register`): masked-out entries reach neither the value nor the gradient,
  even when they hold NaN or inf, and a mask without weight gives 0.

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
  return masked_mean(jnp.abs, predictions, targets, mask)


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
  return masked_mean(jnp.square, predictions, targets, mask)


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

  return masked_mean(per_example, predictions, targets, mask)


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


def register(name: str, fn: LossFn | None = None, *,
             settings: dict[str, str] | None = None,
             replace: bool = False):
  """Adds a loss to `LOSSES`, so that `config.loss=name` trains with it.

  Use it as a call, `losses.register('log_cosh', log_cosh)`, or as a
  decorator, `@losses.register('log_cosh')`. The loss is looked up when a
  run's config is checked and when it trains, so registering after
  `hc_jax.training.train` was imported works. A run records only the name in
  its config.json: resuming it, scoring it again or growing a grid over it
  needs the same loss registered again (`--losses_module`).

  Args:
    name: the loss's config name, e.g. 'log_cosh'.
    fn: `loss(predictions, targets, mask=None, **settings) -> scalar`, pure
      `jax.numpy` (it runs inside the jitted step; training calls it with
      predictions and targets only, `mask` is for evaluation-style use);
      None to return a decorator.
    settings: the config entries the loss reads, {argument: config key},
      as `CONFIG_SETTINGS` (the keys must be fields of the config).
    replace: allow replacing a loss already registered under `name` by
      another function (registering the same function again is always
      allowed, e.g. when its module is imported twice).

  Returns:
    `fn`, or with `fn` None a decorator that registers its function and
    returns it.

  Raises:
    ValueError: for a name that is not a non-empty identifier-like string,
      or that names another loss already (unless `replace`).
    TypeError: when `fn` is not callable or cannot be called as
      `fn(predictions, targets)` (training calls it so).
  """
  if not isinstance(name, str) or not name or not name.replace(
      '_', 'a').replace('-', 'a').isalnum():
    raise ValueError(f'a loss name must be a non-empty string of letters, '
                     f'digits, _ and -, got {name!r}')
  if fn is None:
    return functools.partial(register, name, settings=settings,
                             replace=replace)
  if not callable(fn):
    raise TypeError(f'loss {name!r} must be callable, got {fn!r}')
  try:
    inspect.signature(fn).bind(None, None)
  except TypeError:
    raise TypeError(f'loss {name!r} must take (predictions, targets), '
                    f'{fn!r} does not') from None
  except ValueError:  # No signature to inspect (a builtin); trust it.
    pass
  if LOSSES.get(name, fn) is not fn and not replace:
    raise ValueError(f'a loss {name!r} is registered already; pass '
                     'replace=True to replace it')
  LOSSES[name] = fn
  if settings:
    CONFIG_SETTINGS[name] = dict(settings)
  else:
    CONFIG_SETTINGS.pop(name, None)
  return fn


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
        f'Unknown loss {name!r}; known losses: {", ".join(sorted(LOSSES))} '
        '(losses.register adds one).')
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


def import_module(spec: str):
  """Imports a module that registers losses (`--losses_module`).

  Args:
    spec: a Python file (`my_losses.py`, `path/to/my_losses.py`; imported as
      the module `my_losses`) or an importable module (`mylab.losses`).

  Returns:
    The module.

  Raises:
    ValueError: one line, for a file or module that is not there or fails
      while it is imported (its error named).
  """
  if not (spec.endswith('.py') or os.sep in spec):
    try:
      return importlib.import_module(spec)
    except Exception as e:  # pylint: disable=broad-except  # The user's code.
      raise ValueError(f'losses module {spec}: {log.error_line(e)}') from None
  if not os.path.isfile(spec):
    raise ValueError(f'losses module {spec}: no such file')
  name = os.path.splitext(os.path.basename(spec))[0]
  loaded = sys.modules.get(name)
  if loaded is not None and os.path.realpath(
      getattr(loaded, '__file__', None) or '') == os.path.realpath(spec):
    return loaded  # Imported already (by another flag or the user's code).
  module_spec = importlib.util.spec_from_file_location(name, spec)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  # The user's code.
    del sys.modules[name]
    raise ValueError(f'losses module {spec}: {log.error_line(e)}') from None
  return module
