"""The pure training step: the train state, the optimiser, the
model's outputs and losses, one jitted step over a leading member
axis, and the members' predictions.

`hc_jax.training.train` runs it over epochs (through
`hc_jax.training.trainer`); nothing here reads or writes files.
"""

import functools
from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hc_jax import log
from hc_jax import models
from hc_jax.data import augment as augment_lib
from hc_jax.data import cache as cache_lib
from hc_jax.data import normalise


P = jax.sharding.PartitionSpec


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_model(config) -> Any:
  """The Flax model a config names (`models.from_config`)."""
  return models.from_config(config)


def create_optimizer(config, steps_per_epoch: int
                     ) -> optax.GradientTransformation:
  """Adam (AdamW with weight decay), with a constant or cosine schedule."""
  if config.lr_schedule == 'cosine':
    total = config.num_epochs * steps_per_epoch
    warmup = min(config.warmup_epochs * steps_per_epoch, total - 1)
    learning_rate = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, max(warmup, 1), max(total, 2))
  else:
    learning_rate = config.learning_rate
  if config.weight_decay > 0:
    return optax.adamw(learning_rate, weight_decay=config.weight_decay)
  return optax.adam(learning_rate)


def create_train_state(config, model, key, tx) -> TrainState:
  height, width = cache_lib.input_shape(config)
  image = jnp.zeros((1, height, width, 1), jnp.float32)
  variables = models.init_variables(model, image, key)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}), tx=tx)


def output_functions(config):
  """`(loss_of, hc_of)` of the output kind the config's model declares.

  `loss_of(outputs, ellipses, resize, target, normaliser_px, image_hw,
  loss_fn)` is a batch's loss; `hc_of(outputs, resize, normaliser_px,
  image_hw)` its normalised HC `[B]`. Both come from the model class's kind
  (`models.kind_of`, `hc_jax.nets.kinds`), never from the output's shape.
  """
  kind = models.kind_of(config)
  model = models.from_config(config)
  return kind.loss_of(model, config), kind.hc_of(model)


def check_outlines(config, filenames, ellipses) -> None:
  """Raises ValueError (one line) when a config whose loss needs the
  reference ellipse (an annotation outline; the model's kind says,
  `Kind.needs_outlines`) trains on images without any; warns when some lack
  one (they add the HC term only). Regressors and a label-only mask model
  need HC values only."""
  what = models.kind_of(config).needs_outlines(config)
  if not what:
    return
  missing = [str(f) for f, e in zip(filenames, ellipses)
             if not np.all(np.isfinite(e))]
  if len(missing) == len(filenames):
    raise ValueError(
        f'this config trains {config.model}, {what}: it needs the reference '
        'outline (an _Annotation.png, or the annotation column of a folder '
        f'data set) of its training images, and none of the {len(filenames)} '
        'has one; train from HC values alone with '
        'configs/hcnet_mask_label.py')
  if missing:
    log.warn(f'{len(missing)} of {len(filenames)} training images have no '
             f'reference outline (e.g. {missing[0]}): they train the HC term '
             'only')


def train_step(state: TrainState, batch, member, *, loss_fn, augment,
               loss_of=None):
  """One optimiser step of one member on its batch.

  Args:
    state: the member's `TrainState`.
    batch: {'image': uint8 [B, H, W, 1], 'ellipse': [B, 5], 'hc_px': [B],
      'resize': [B, 4]}.
    member: {'key': the member's key, 'normaliser_px': scalar}.
    loss_fn: `(predictions, targets) -> loss`.
    augment: an `augment.AugmentConfig`.
    loss_of: the model kind's loss (`output_functions(config)[0]`); None:
      `loss_fn` of the outputs, as the kind 'hc'.

  Returns:
    `(state, loss)`.
  """
  augment_key, dropout_key = jax.random.split(
      jax.random.fold_in(member['key'], state.step))
  images, ellipses, hc_px = augment_lib.augment_batch(
      augment_key, batch['image'], batch['ellipse'], batch['hc_px'],
      batch['resize'], augment)
  target = hc_px / member['normaliser_px']

  def compute_loss(params):
    predictions, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, images,
        train=True, rngs={'dropout': dropout_key}, mutable=['batch_stats'])
    if loss_of is None:
      return loss_fn(predictions, target), updates
    return loss_of(predictions, ellipses, batch['resize'], target,
                   member['normaliser_px'], images.shape[1:3],
                   loss_fn), updates

  (loss, updates), grads = jax.value_and_grad(compute_loss, has_aux=True)(
      state.params)
  return state.apply_gradients(grads=grads,
                               batch_stats=updates['batch_stats']), loss


def map_members(fn, xs, how: str = 'vmap'):
  """`fn` over the leading (member) axis of the pytree `xs`, stacked.

  One member runs unbatched (the plain step); several run in one `jax.vmap`
  ('vmap': each convolution becomes a grouped one) or one after another
  (`jax.lax.map`, 'map'). The choice changes the speed, not the values.
  """
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    out = fn(jax.tree.map(lambda x: x[0], xs))
    return jax.tree.map(lambda x: x[None], out)
  return jax.vmap(fn)(xs) if how == 'vmap' else jax.lax.map(fn, xs)


def one_member_step(*, loss_fn, augment, loss_of=None):
  """The step of a run of one member (every `python -m hc_jax.main` run),
  to jit: `train_step` under `jax.vmap` over the member axis of size one on
  which the trainer keeps its states. As fast as the unbatched step
  (`benchmarks/one_member_step.py`), and one call from the trainer's loop
  to `train_step`."""
  return jax.vmap(functools.partial(train_step, loss_fn=loss_fn,
                                    augment=augment, loss_of=loss_of))


def members_train_step(state, batch, members, *, loss_fns, augment, how,
                       loss_of=None):
  """One step of every member; a member whose `batch['active']` is False is
  left unchanged (it has fewer steps this epoch, or it diverged)."""

  def one(xs):
    member_state, member_batch, member = xs
    if len(loss_fns) == 1:
      loss_fn = loss_fns[0]
    else:
      loss_fn = lambda p, t: jax.lax.switch(member['loss_id'], loss_fns, p, t)
    new_state, loss = train_step(member_state, member_batch, member,
                                 loss_fn=loss_fn, augment=augment,
                                 loss_of=loss_of)
    new_state = jax.tree.map(
        lambda new, old: jnp.where(member_batch['active'], new, old),
        new_state, member_state)
    return new_state, loss

  return map_members(one, (state, batch, members), how)


def members_predict(state, images, how: str = 'vmap', resize=None,
                    normaliser_px=None, hc_of=None):
  """Normalised predictions [M, E] of every member on its z-scored images.

  The model's kind gives its HC through `hc_of`
  (`output_functions(config)[1]`; None: the outputs are the normalised HC),
  which needs each image's `resize` [M, E, 4] and each member's
  `normaliser_px` [M].
  """

  def one(xs):
    member_state, member_images = xs[0], xs[1]
    outputs = member_state.apply_fn(
        {'params': member_state.params,
         'batch_stats': member_state.batch_stats},
        normalise.zscore_batch(member_images), train=False)
    if hc_of is None:
      return outputs
    if len(xs) < 4:
      raise ValueError('this model needs resize and normaliser_px to '
                       'predict the HC')
    return hc_of(outputs, xs[2], xs[3], member_images.shape[1:3])

  if resize is None:
    return map_members(one, (state, images), how)
  return map_members(one, (state, images, resize, normaliser_px), how)
