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


def test_the_eta_counts_finished_work_and_whole_epochs():
  """The progress line's rate and ETA, from a fake clock: the compilation
  is no work, and once an epoch's wall time is known (validation and
  checkpoints in it) the ETA is the epochs left at that time."""
  from hc_jax.training import trainer  # pylint: disable=import-outside-toplevel
  # 10 steps of 2 s finished after the compiled step first returned; 81
  # steps per epoch, 50 epochs: 4039 steps left at 0.5 steps/s.
  rate, left = trainer.estimate(11, 4050, 81, 10, 20.0, None)
  assert rate == 0.5 and left == 4039 / 0.5
  # After an epoch of 200 s (162 s of steps + validation): 4039 / 81 epochs.
  _, left = trainer.estimate(81, 4050, 81, 80, 162.0, 200.0)
  assert abs(left - 49 * 200.0) < 1e-6


def test_the_first_progress_line_comes_after_a_few_steps(capsys):
  """A progress line FIRST_LOG_STEPS steps after the compiled step
  returned, not LOG_EVERY_SECONDS after the start, and timed after the
  queued steps have finished."""
  import types  # pylint: disable=import-outside-toplevel
  from hc_jax.training import trainer  # pylint: disable=import-outside-toplevel
  now = [1000.0]
  clock = lambda: now[0]  # pylint: disable=unnecessary-lambda-assignment
  fake = types.SimpleNamespace(
      data=types.SimpleNamespace(steps=np.asarray([81]), batch_size=8),
      configs=[None], start_epoch=0, resume_step=0, num_epochs=50,
      rate_start=None, last_log=now[0], epoch_seconds=[], compiled=True)

  class Loss:  # A queued step: reading it waits 2 s on the fake clock.
    def mean(self):
      return self

    def __float__(self):
      now[0] += 2.0
      return 0.5

  for i in range(trainer.FIRST_LOG_STEPS + 1):
    trainer.Trainer._progress(fake, 1, i, Loss(), clock=clock)
  out = capsys.readouterr()
  lines = [l for l in (out.out + out.err).splitlines() if 'ETA' in l]
  assert len(lines) == 1 and 'step 4/81' in lines[0], lines
  # 3 steps finished in the 2 s the last one's loss took: 1.5 steps/s.
  assert '12 img/s' in lines[0], lines
