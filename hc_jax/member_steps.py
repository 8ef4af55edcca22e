"""Jitted steps of stacked models: M members (a loss × a fold) at once.

Pure functions over a `hc_jax.train.TrainState` whose every leaf has a
leading member axis, for `hc_jax.train_folds` and the GPU benchmarks. A
training step gathers each member's batch from the uint8 images kept on the
device (by that member's positions), augments it there
(`hc_jax.device_augment`) and applies `hc_jax.train.train_step`; members map
either in one `jax.vmap` (each convolution becomes a grouped one) or one after
another with `jax.lax.map` inside the same jitted step (`members_per_call`).
"""

import functools

import jax
import jax.numpy as jnp

from hc_jax import device_augment
from hc_jax import targets
from hc_jax import train


def map_members(fn, xs, members_per_call: int = 0):
  """`fn` over the leading (member) axis of the pytree `xs`, stacked.

  Args:
    fn: function of one member's slice of `xs`.
    xs: pytree of arrays with a leading member axis.
    members_per_call: 0 vmaps all members at once; 1 runs them one after
      another (`jax.lax.map`); k vmaps chunks of k.

  Returns:
    `fn`'s outputs stacked along a leading member axis.
  """
  if members_per_call == 0:
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=(
      None if members_per_call == 1 else members_per_call))


def _member_train_step(state, index, active, fold, loss_id, normaliser_px,
                       images, hc_px, step_key, *, loss_fns, augment,
                       dropout_key):
  """One member's step on its batch `index`; unchanged where not `active`."""
  image, hc_scale = device_augment.augment_batch(
      jax.random.fold_in(step_key, fold), images[index], augment)
  target = targets.hc_target(hc_px[index] * hc_scale, normaliser_px)
  if len(loss_fns) == 1:
    loss_fn = loss_fns[0]
  else:
    loss_fn = lambda pred, true: jax.lax.switch(loss_id, loss_fns, pred, true)
  new_state, step_metrics = train.train_step(
      state, {'image': image, 'target': target}, loss_fn=loss_fn,
      dropout_key=dropout_key)
  new_state = jax.tree.map(lambda new, old: jnp.where(active, new, old),
                           new_state, state)
  return new_state, step_metrics['loss']


def members_train_step(state, epoch_index, epoch_active, step_in_epoch, epoch,
                       members, images, hc_px, *, loss_fns, augment,
                       dropout_key, augment_key, members_per_call=0):
  """One step of every member: vmapped gather, augmentation and update.

  Args:
    state: `train.TrainState` stacked over members.
    epoch_index: int32 [steps, M, B], the epoch's batches (export positions).
    epoch_active: bool [steps, M], whether a member takes each step.
    step_in_epoch: which row of the epoch arrays.
    epoch: the epoch, from 1.
    members: {'fold': int32 [M], 'loss_id': int32 [M], 'normaliser_px':
      float32 [M]}.
    images: uint8 [N, S, S, 1], every image of the export.
    hc_px: float32 [N].
    loss_fns: the losses, indexed by 'loss_id'.
    augment: a `device_augment.AugmentConfig`.
    dropout_key: as in `train.train_step` (folded with each member's step).
    augment_key: folded with the epoch, the step in it and the member's fold,
      so a member's augmentation does not depend on the other members.
    members_per_call: see `map_members`.

  Returns:
    `(state, loss)`, loss float32 [M].
  """
  member_step = functools.partial(_member_train_step, loss_fns=loss_fns,
                                  augment=augment, dropout_key=dropout_key)
  step_key = jax.random.fold_in(jax.random.fold_in(augment_key, epoch),
                                step_in_epoch)
  return map_members(
      lambda xs: member_step(*xs, images, hc_px, step_key),
      (state, epoch_index[step_in_epoch], epoch_active[step_in_epoch],
       members['fold'], members['loss_id'], members['normaliser_px']),
      members_per_call)


def members_predict(state, columns, images, members_per_call=0):
  """Normalised predictions of every member on its own images.

  Args:
    state: stacked `train.TrainState`.
    columns: int32 [M, E], export positions of each member's images.
    images: uint8 [N, S, S, 1].
    members_per_call: see `map_members`.

  Returns:
    float32 [M, E].
  """
  return map_members(lambda xs: train.eval_step(
      xs[0], device_augment.zscore_batch(images[xs[1]])), (state, columns),
                     members_per_call)
