"""Tests for hc_jax.losses."""

import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from hc_jax import losses

# Residuals predictions - targets: -1.0, 0.25, 2.0, 0.0.
PREDICTIONS = jnp.array([1.0, 2.25, 5.0, 4.0])
TARGETS = jnp.array([2.0, 2.0, 3.0, 4.0])


def test_mae():
  # (1 + 0.25 + 2 + 0) / 4
  np.testing.assert_allclose(losses.mae(PREDICTIONS, TARGETS), 0.8125)


def test_mse():
  # (1 + 0.0625 + 4 + 0) / 4
  np.testing.assert_allclose(losses.mse(PREDICTIONS, TARGETS), 1.265625)


def test_huber_default_delta():
  # delta 0.5: |r| = 1 -> 0.5 * (1 - 0.25) = 0.375; 0.25 -> 0.5 * 0.0625
  # = 0.03125; 2 -> 0.5 * (2 - 0.25) = 0.875; 0 -> 0. Mean 1.28125 / 4.
  np.testing.assert_allclose(
      losses.huber(PREDICTIONS, TARGETS), 0.3203125, rtol=1e-6)


def test_huber_delta_one():
  # delta 1: 0.5, 0.03125, 1 * (2 - 0.5) = 1.5, 0. Mean 2.03125 / 4.
  np.testing.assert_allclose(
      losses.huber(PREDICTIONS, TARGETS, delta=1.0), 0.5078125, rtol=1e-6)


@pytest.mark.parametrize('delta', [0.1, 0.5, 1.0, 3.0])
def test_huber_matches_optax(delta):
  predictions = jax.random.normal(jax.random.key(0), (64,)) * 2
  targets = jax.random.normal(jax.random.key(1), (64,))
  np.testing.assert_allclose(
      losses.huber(predictions, targets, delta=delta),
      optax.huber_loss(predictions, targets, delta=delta).mean(),
      rtol=1e-6)


@pytest.mark.parametrize('name', ['mae', 'mse', 'huber'])
@pytest.mark.parametrize('mask_dtype', [jnp.bool_, jnp.float32, jnp.int32])
def test_masked_entries_do_not_matter(name, mask_dtype):
  loss_fn = losses.get_loss(name)
  mask = jnp.array([1, 1, 0, 1], mask_dtype)
  # Garbage, even NaN and inf, in masked-out entries must not leak.
  garbage_predictions = PREDICTIONS.at[2].set(jnp.nan)
  garbage_targets = TARGETS.at[2].set(jnp.inf)
  kept = jnp.array([0, 1, 3])
  expected = loss_fn(PREDICTIONS[kept], TARGETS[kept])
  np.testing.assert_allclose(
      loss_fn(garbage_predictions, garbage_targets, mask), expected, rtol=1e-6)
  gradient = jax.grad(loss_fn)(garbage_predictions, garbage_targets, mask)
  assert np.all(np.isfinite(gradient))
  assert gradient[2] == 0


@pytest.mark.parametrize('name', ['mae', 'mse', 'huber'])
def test_all_masked_returns_zero(name):
  loss_fn = losses.get_loss(name)
  mask = jnp.zeros(4, jnp.bool_)
  assert loss_fn(PREDICTIONS, TARGETS, mask) == 0
  gradient = jax.grad(loss_fn)(PREDICTIONS, TARGETS, mask)
  np.testing.assert_array_equal(gradient, np.zeros(4))


@pytest.mark.parametrize('name', ['mae', 'mse', 'huber'])
def test_all_ones_mask_equals_no_mask(name):
  loss_fn = losses.get_loss(name)
  np.testing.assert_allclose(
      loss_fn(PREDICTIONS, TARGETS, jnp.ones(4)),
      loss_fn(PREDICTIONS, TARGETS), rtol=1e-6)


@pytest.mark.parametrize('name', ['mae', 'mse', 'huber'])
def test_gradient_finite_at_zero_residual(name):
  loss_fn = losses.get_loss(name)
  gradient = jax.grad(loss_fn)(TARGETS, TARGETS)
  assert np.all(np.isfinite(gradient))
  if name != 'mae':  # Smooth losses have a zero gradient at the minimum.
    np.testing.assert_array_equal(gradient, np.zeros(4))


def test_huber_gradient():
  # d/dr: r for |r| <= delta, delta * sign(r) beyond; divided by the count.
  gradient = jax.grad(losses.huber)(PREDICTIONS, TARGETS)
  np.testing.assert_allclose(gradient, np.array([-0.5, 0.25, 0.5, 0.0]) / 4)


def test_losses_jit():
  mask = jnp.array([True, False, True, True])
  for name in losses.LOSSES:
    loss_fn = losses.get_loss(name)
    np.testing.assert_allclose(
        jax.jit(loss_fn)(PREDICTIONS, TARGETS, mask),
        loss_fn(PREDICTIONS, TARGETS, mask), rtol=1e-6)


def test_get_loss_binds_delta():
  loss_fn = losses.get_loss('huber', delta=1.0)
  np.testing.assert_allclose(loss_fn(PREDICTIONS, TARGETS), 0.5078125)
  assert losses.get_loss('mae') is losses.mae


def test_get_loss_rejects_unknown_setting():
  with pytest.raises(TypeError):
    losses.get_loss('mae', delta=1.0)


def test_unknown_loss_raises():
  with pytest.raises(ValueError, match='known losses: huber, mae, mse'):
    losses.get_loss('l1')


def _config(**entries):
  return ml_collections.ConfigDict(entries)


def test_get_loss_from_config_reads_huber_delta():
  # delta 1 gives 0.5078125 here, the default 0.5 gives 0.3203125.
  loss_fn = losses.get_loss(_config(loss='huber', huber_delta=1.0))
  np.testing.assert_allclose(loss_fn(PREDICTIONS, TARGETS), 0.5078125,
                             rtol=1e-6)


def test_get_loss_from_config_without_delta_uses_the_default():
  loss_fn = losses.get_loss(_config(loss='huber'))
  np.testing.assert_allclose(loss_fn(PREDICTIONS, TARGETS), 0.3203125,
                             rtol=1e-6)


def test_get_loss_arguments_override_the_config():
  loss_fn = losses.get_loss(_config(loss='huber', huber_delta=3.0), delta=1.0)
  np.testing.assert_allclose(loss_fn(PREDICTIONS, TARGETS), 0.5078125,
                             rtol=1e-6)


@pytest.mark.parametrize('name', ['mae', 'mse'])
def test_get_loss_from_config_ignores_other_losses_settings(name):
  # The default config has huber_delta whatever its loss.
  assert losses.get_loss(_config(loss=name, huber_delta=1.0)) is \
      losses.LOSSES[name]


def test_get_loss_from_config_unknown_loss_raises():
  with pytest.raises(ValueError, match='known losses: huber, mae, mse'):
    losses.get_loss(_config(loss='l1', huber_delta=1.0))


@pytest.fixture
def registry(monkeypatch):
  """losses.LOSSES and CONFIG_SETTINGS as they were after the test."""
  monkeypatch.setattr(losses, 'LOSSES', dict(losses.LOSSES))
  monkeypatch.setattr(losses, 'CONFIG_SETTINGS', dict(losses.CONFIG_SETTINGS))


def _quartic(predictions, targets, mask=None, scale=1.0):
  return losses.masked_mean(lambda r: scale * r**4, predictions, targets,
                            mask)


def test_register_as_a_call_and_as_a_decorator(registry):
  del registry
  assert losses.register('quartic', _quartic) is _quartic

  @losses.register('cube', settings={'scale': 'huber_delta'})
  def cube(predictions, targets, mask=None, scale=1.0):
    return losses.masked_mean(lambda r: scale * jnp.abs(r)**3, predictions,
                              targets, mask)

  assert losses.LOSSES['quartic'] is _quartic and losses.LOSSES['cube'] is cube
  # Residuals -1, 0.25, 2, 0: mean r^4 = (1 + 1/256 + 16) / 4.
  np.testing.assert_allclose(losses.get_loss('quartic')(PREDICTIONS, TARGETS),
                             (17 + 1 / 256) / 4, rtol=1e-6)
  # Its settings come from the config, as huber's delta does.
  loss_fn = losses.get_loss(_config(loss='cube', huber_delta=2.0))
  np.testing.assert_allclose(loss_fn(PREDICTIONS, TARGETS),
                             2 * (1 + 1 / 64 + 8) / 4, rtol=1e-6)
  # The mask works as for the built-in losses: NaN where masked is ignored.
  mask = jnp.array([True, False, True, True])
  np.testing.assert_allclose(
      _quartic(PREDICTIONS.at[1].set(jnp.nan), TARGETS, mask), 17 / 3)


def test_register_refuses_a_second_loss_under_a_name_unless_asked(registry):
  del registry
  losses.register('quartic', _quartic)
  losses.register('quartic', _quartic)  # The same function again: fine.
  with pytest.raises(ValueError, match="'mae' is registered already"):
    losses.register('mae', _quartic)
  assert losses.register('mae', _quartic, replace=True) is _quartic
  for name in ('', 'a b', None):
    with pytest.raises(ValueError, match='a loss name must be'):
      losses.register(name, _quartic)
  with pytest.raises(TypeError, match='must be callable'):
    losses.register('x', 3)
  with pytest.raises(TypeError, match=r'must take \(predictions, targets\)'):
    losses.register('x', lambda predictions: predictions)


def test_a_loss_registered_after_train_is_imported_passes_its_checks(
    registry, tiny_config):
  del registry
  # pylint: disable=import-outside-toplevel
  from hc_jax.training import config_check
  tiny_config.loss = 'quartic'
  with pytest.raises(ValueError, match=r'loss must be one of huber, mae, mse'
                     r' \(or a loss added with hc_jax.losses.register'):
    config_check.check_config(tiny_config)
  losses.register('quartic', _quartic)
  config_check.check_config(tiny_config)  # Read when checked, not at import.


def test_import_module_takes_a_file_or_a_module_and_fails_in_one_line(
    registry, tmp_path, monkeypatch):
  del registry
  # Gone from sys.modules after the test (setitem of a new key undoes so).
  monkeypatch.setitem(sys.modules, 'lab_losses', None)
  monkeypatch.setitem(sys.modules, 'broken_losses', None)
  path = tmp_path / 'lab_losses.py'
  path.write_text('from hc_jax import losses\n'
                  'losses.register("l4", lambda p, t, mask=None: '
                  'losses.masked_mean(lambda r: r**4, p, t, mask))\n')
  module = losses.import_module(str(path))
  assert module.__name__ == 'lab_losses' and 'l4' in losses.LOSSES
  assert losses.import_module(str(path)) is module  # Not run twice.
  monkeypatch.syspath_prepend(str(tmp_path))
  assert losses.import_module('lab_losses') is module
  with pytest.raises(ValueError, match=r'^losses module no/such.py: no such '
                     'file$'):
    losses.import_module('no/such.py')
  with pytest.raises(ValueError, match='^losses module no_such_module: '
                     'ModuleNotFoundError'):
    losses.import_module('no_such_module')
  broken = tmp_path / 'broken_losses.py'
  broken.write_text('import jax.numpy as jnp\n1 / 0\n')
  with pytest.raises(ValueError, match=r'^losses module .*broken_losses.py: '
                     'ZeroDivisionError: division by zero$'):
    losses.import_module(str(broken))
  assert 'broken_losses' not in sys.modules
