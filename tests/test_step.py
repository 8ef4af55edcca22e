"""The pure training step on one small batch, in about a second.

As flax's examples' train_test.py: a broken `train_step`, optimiser, kind
loss or member masking fails here, before any end-to-end test trains.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from hc_jax.data import augment
from hc_jax.training import step as step_lib

SIZE = 32


def _config(model, **options):
  config = default.get_config()
  config.model = model
  config.model_options.update(options)
  config.layers = 'plain'
  config.image_size, config.image_width = SIZE, 0
  config.learning_rate = 1e-2
  return config


def _batch(num=4):
  """Bright discs of four sizes on a dark ground, with their ellipses."""
  yy, xx = np.mgrid[:SIZE, :SIZE]
  radii = np.float32([5, 7, 9, 11])[:num]
  images = np.stack([(np.hypot(xx - 15.5, yy - 15.5) < r) * 200 + 20
                     for r in radii]).astype(np.uint8)[..., None]
  ellipses = np.stack([np.float32([15.5, 15.5, r, r, 0]) for r in radii])
  return {'image': images, 'ellipse': ellipses,
          'hc_px': (2 * np.pi * radii).astype(np.float32),
          'resize': np.tile(np.float32([1, 1, 0, 0]), (num, 1))}


def _state_and_step(config):
  model = step_lib.create_model(config)
  state = step_lib.create_train_state(
      config, model, jax.random.key(0),
      step_lib.create_optimizer(config, steps_per_epoch=10))
  loss_of, _ = step_lib.output_functions(config)
  member = {'key': jax.random.key(1), 'normaliser_px': jnp.float32(80.0)}
  step = jax.jit(functools.partial(
      step_lib.train_step, member=member,
      loss_fn=lambda p, t: jnp.mean((p - t) ** 2), augment=augment.NO_AUGMENT,
      loss_of=loss_of), donate_argnums=(0,))
  return state, step


@pytest.mark.parametrize('model,options', [
    ('hcnet', {'widths': (4, 8), 'head': 'gap'}),
    ('hcnet_mask', {'widths': (4, 8, 8), 'margin': 2}),
])
def test_train_step_fits_one_batch(model, options):
  """Finite losses that fall on a repeated batch, the step counted, the
  BatchNorm statistics updated."""
  state, step = _state_and_step(_config(model, **options))
  batch = _batch()
  stats_before = jax.tree.map(np.array, state.batch_stats)
  losses = []
  for _ in range(6):
    state, loss = step(state, batch)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert int(state.step) == 6
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(stats_before), jax.tree.leaves(state.batch_stats)))


def test_an_inactive_member_is_left_unchanged():
  """`members_train_step` over two members, the second inactive this step."""
  config = _config('hcnet', widths=(4, 8), head='gap')
  model = step_lib.create_model(config)
  tx = step_lib.create_optimizer(config, steps_per_epoch=10)
  states = [step_lib.create_train_state(config, model, jax.random.key(k), tx)
            for k in (0, 1)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *states)
  batch = jax.tree.map(lambda x: np.stack([x, x]), _batch())
  batch['active'] = np.array([True, False])
  members = {'key': jnp.stack([jax.random.key(2), jax.random.key(3)]),
             'loss_id': jnp.zeros(2, jnp.int32),
             'normaliser_px': jnp.float32([80.0, 80.0])}
  step = jax.jit(functools.partial(
      step_lib.members_train_step,
      loss_fns=(lambda p, t: jnp.mean((p - t) ** 2),),
      augment=augment.NO_AUGMENT, how='vmap'))
  new, loss = step(stacked, batch, members)
  assert loss.shape == (2,) and np.all(np.isfinite(loss))
  for before, after in zip(jax.tree.leaves(states[1].params),
                           jax.tree.leaves(new.params)):
    np.testing.assert_array_equal(after[1], before)
  assert any(not np.array_equal(after[0], before) for before, after in zip(
      jax.tree.leaves(states[0].params), jax.tree.leaves(new.params)))
  np.testing.assert_array_equal(new.step, [1, 0])
