"""Training and evaluation of one fold: `train_and_evaluate(config, workdir)`.

Data parallel with `jax.jit` over a 1-D device mesh: the batch is split over
the 'data' axis and the state is replicated, so the same code runs on one CPU,
one GPU or a TPU slice. Each epoch ends with an evaluation on the validation
part (carved from the training folds) and a checkpoint; at the end the
checkpoint that the validation part selected is scored on the test fold.

A run killed and started again with the same command resumes from its last
epoch and ends with the same metrics as an uninterrupted run: each epoch's
batches and augmentations are drawn from (seed, epoch), and dropout keys are
folded from the step.
"""

import functools
import json
import os
import sys
import time
from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hc_jax import checkpoint
from hc_jax import data as data_lib
from hc_jax import losses
from hc_jax import metrics as metrics_lib
from hc_jax import models
from hc_jax import targets

P = jax.sharding.PartitionSpec
METRICS_FILE = 'metrics.jsonl'
RESULTS_FILE = 'results.json'
PREDICTIONS_FILE = 'predictions_test.csv'
LOG_EVERY_SECONDS = 30.0


class TrainState(train_state.TrainState):
  batch_stats: Any


def check_config(config) -> None:
  """Raises ValueError with one clear line for a config that cannot run."""
  if config.model not in models.MODELS:
    raise ValueError(f'unknown model {config.model!r}; choose one of '
                     f'{", ".join(sorted(models.MODELS))}')
  if config.loss not in losses.LOSSES:
    raise ValueError(f'unknown loss {config.loss!r}; choose one of '
                     f'{", ".join(sorted(losses.LOSSES))}')
  if not 0 <= config.fold < config.num_folds:
    raise ValueError(f'fold must be in [0, {config.num_folds - 1}], got '
                     f'{config.fold}')
  if config.resize_mode not in targets.RESIZE_MODES:
    raise ValueError(f'unknown resize_mode {config.resize_mode!r}; choose one '
                     f'of {", ".join(targets.RESIZE_MODES)}')
  if config.lr_schedule not in ('constant', 'cosine'):
    raise ValueError("lr_schedule must be 'constant' or 'cosine', got "
                     f'{config.lr_schedule!r}')
  if config.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {config.dtype!r}")
  if config.get('checkpoint_every_seconds', 0.0) < 0:
    raise ValueError('checkpoint_every_seconds must be >= 0, got '
                     f'{config.checkpoint_every_seconds}')
  for name in ('batch_size', 'eval_batch_size', 'num_epochs', 'image_size'):
    if config[name] < 1:
      raise ValueError(f'{name} must be positive, got {config[name]}')
  num_devices = jax.device_count()
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % num_devices:
      raise ValueError(f'{name}={config[name]} is not divisible by the '
                       f'{num_devices} devices')


def create_model(config) -> Any:
  kwargs = {}
  fields = models.MODELS[config.model].__dataclass_fields__
  if 'dtype' in fields:
    kwargs['dtype'] = jnp.dtype(config.dtype)
  if 'keras_v1' in fields and config.get('init_from'):
    kwargs['keras_v1'] = True  # Keras' weights need its stride placement.
  if 'fast_layers' in fields:
    # hc_jax.fast_layers are tuned for XLA:CPU (same values and gradients);
    # on a GPU or TPU the plain layers go to cuDNN / the TPU's convolutions.
    kwargs['fast_layers'] = jax.default_backend() == 'cpu'
  return models.create_model(config.model, **kwargs)


def create_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
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
  image = jnp.zeros((1, config.image_size, config.image_size, 1), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(key, image)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}), tx=tx)


def train_step(state: TrainState, batch, *, loss_fn, dropout_key):
  """One optimiser step on a global batch; returns (state, {'loss'})."""
  key = jax.random.fold_in(dropout_key, state.step)

  def compute_loss(params):
    predictions, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
        train=True, rngs={'dropout': key}, mutable=['batch_stats'])
    return loss_fn(predictions, batch['target']), updates

  (loss, updates), grads = jax.value_and_grad(compute_loss, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads,
                                batch_stats=updates['batch_stats'])
  return state, {'loss': loss}


def eval_step(state: TrainState, images):
  """Predicted targets (normalised HC) for a batch, with running statistics."""
  return state.apply_fn({'params': state.params,
                         'batch_stats': state.batch_stats}, images, train=False)


class Trainer:
  """Jitted steps over a 1-D data-parallel mesh."""

  def __init__(self, config, dropout_key):
    self.mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
    self.replicated = jax.sharding.NamedSharding(self.mesh, P())
    self.batch_sharded = jax.sharding.NamedSharding(self.mesh, P('data'))
    loss_fn = losses.get_loss(config.loss, **(
        {'delta': config.huber_delta} if config.loss == 'huber' else {}))
    self.train_step = jax.jit(
        functools.partial(train_step, loss_fn=loss_fn, dropout_key=dropout_key),
        out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))
    self.eval_step = jax.jit(eval_step, out_shardings=self.replicated)

  def replicate(self, tree):
    return jax.device_put(tree, self.replicated)

  def shard(self, array):
    return jax.make_array_from_process_local_data(self.batch_sharded, array)

  def predict(self, state, batches, normaliser_px):
    """Predicted and true HC (px) over every real image of the batches."""
    columns = {k: [] for k in ('filename', 'pixel_size_mm', 'hc_px_true',
                               'hc_px_pred')}
    for batch in batches:
      keep = batch['mask'] > 0
      predictions = np.asarray(self.eval_step(state, self.shard(batch['image'])))
      columns['filename'] += [f.decode() for f in batch['filename'][keep]]
      columns['pixel_size_mm'].append(batch['pixel_size_mm'][keep])
      columns['hc_px_true'].append(batch['hc_px'][keep])
      columns['hc_px_pred'].append(targets.hc_px_from_target(
          predictions[keep], normaliser_px))
    for key in ('pixel_size_mm', 'hc_px_true', 'hc_px_pred'):
      columns[key] = np.concatenate(columns[key]).astype(np.float64)
    return columns


def _log(message: str) -> None:
  print(message, flush=True)


def _eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains one fold, selects on validation, scores the test fold.

  Args:
    config: a config from `configs/` (an ml_collections.ConfigDict).
    workdir: where the run leaves config.json, folds.json, metrics.jsonl,
      TensorBoard events, checkpoints, the test predictions and results.json;
      an existing workdir of the same run is resumed.

  Returns:
    The results: validation metrics of the selected epoch and test-fold
    metrics ('test_mae_mm', ...).

  Raises:
    ValueError: for a bad config.
    FloatingPointError: on a NaN or inf loss (the last good checkpoint stays).
  """
  check_config(config)
  if config.get('tune_malloc', False) and jax.default_backend() == 'cpu':
    from hc_jax import cpu  # pylint: disable=import-outside-toplevel
    cpu.tune_malloc()
  os.makedirs(workdir, exist_ok=True)
  data_lib.save_json(os.path.join(workdir, 'config.json'), config.to_dict())
  data = data_lib.load(config, workdir)
  num_train = len(data.split['train'])
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'{num_train} training images make no batch of '
                     f'{config.batch_size}')
  total_steps = steps_per_epoch * config.num_epochs
  _log(f'{config.model} + {config.loss}, fold {config.fold}: '
       f'{num_train} train / {len(data.split["val"])} val / '
       f'{len(data.split["test"])} test images, {steps_per_epoch} steps per '
       f'epoch, {jax.device_count()} {jax.devices()[0].platform} device(s)')

  key = jax.random.key(config.seed)
  init_key, dropout_key = jax.random.split(key)
  trainer = Trainer(config, dropout_key)
  model = create_model(config)
  state = create_train_state(config, model, init_key,
                             create_optimizer(config, steps_per_epoch))
  if config.get('init_from'):
    from hc_jax import pretrained  # pylint: disable=import-outside-toplevel
    state = pretrained.load_into(state, config.init_from, config.model)
    _log(f'initialised from {config.init_from}')
  _log(f'{models.count_params(state.params):,} parameters')
  checkpoints = checkpoint.Checkpoints(workdir)
  state, progress = checkpoints.restore_latest(state)
  start_epoch = progress.get('epoch', 0)
  checkpoints.drop_after(start_epoch)
  best = progress.get('best', {'val_mae_mm': float('inf'), 'epoch': 0})
  if start_epoch:
    _log(f'resuming after epoch {start_epoch} (step {int(state.step)})')
  state = trainer.replicate(state)
  writer = checkpoint.MetricWriter(workdir, resume_epoch=start_epoch)

  started = last_log = last_save = time.time()
  for epoch in range(start_epoch + 1, config.num_epochs + 1):
    epoch_start = time.time()
    losses_this_epoch = []
    for i, batch in enumerate(data.train_epoch(epoch)):
      state, step_metrics = trainer.train_step(
          state, {'image': trainer.shard(batch['image']),
                  'target': trainer.shard(batch['target'])})
      losses_this_epoch.append(step_metrics['loss'])
      step = (epoch - 1) * steps_per_epoch + i + 1
      # A progress line every log_every_steps, and at least every 30 s so a
      # slow model on a CPU shows its ETA early.
      if (step % config.log_every_steps == 0 or
          time.time() - last_log > LOG_EVERY_SECONDS):
        loss = float(step_metrics['loss'])  # Waits for the step.
        last_log = time.time()
        rate = config.batch_size * (step - start_epoch * steps_per_epoch) / (
            last_log - started)
        _log(f'epoch {epoch}/{config.num_epochs} step {step}/{total_steps} '
             f'loss {loss:.4g} {rate:.3g} img/s '
             f'ETA {_eta((total_steps - step) * config.batch_size / rate)}')
    epoch_losses = np.asarray(jax.device_get(losses_this_epoch))
    bad = np.flatnonzero(~np.isfinite(epoch_losses))
    if bad.size:
      step = (epoch - 1) * steps_per_epoch + int(bad[0]) + 1
      raise FloatingPointError(
          f'loss is {epoch_losses[bad[0]]} at step {step} (epoch {epoch}); '
          f'stopped without saving, the last good checkpoint is in '
          f'{checkpoints.directory}')
    val = trainer.predict(state, data.eval_batches('val'), data.normaliser_px)
    val_errors = metrics_lib.hc_errors(val['hc_px_true'], val['hc_px_pred'],
                                       val['pixel_size_mm'])
    is_best = val_errors['mae_mm'] < best['val_mae_mm']
    if is_best:
      best = {'val_mae_mm': val_errors['mae_mm'], 'epoch': epoch}
    record = {'epoch': epoch, 'step': int(state.step),
              'train_loss': float(epoch_losses.mean()),
              'epoch_seconds': round(time.time() - epoch_start, 2),
              **{f'val_{k}': v for k, v in val_errors.items()}}
    writer.write(record)
    save_latest = (epoch == config.num_epochs or time.time() - last_save >=
                   config.get('checkpoint_every_seconds', 0.0))
    checkpoints.save(epoch, state, {'epoch': epoch, 'best': best},
                     is_best=is_best, latest=save_latest)
    if save_latest:
      last_save = time.time()
    _log(f'epoch {epoch}: train loss {record["train_loss"]:.4g}, val '
         f'{metrics_lib.format_errors(val_errors)}'
         f'{" *" if is_best else ""} ({record["epoch_seconds"]:.1f} s)')
  checkpoints.wait()

  # Score the test fold with the checkpoint the validation part selected.
  state = trainer.replicate(checkpoints.restore_best(state, best['epoch']))
  test = trainer.predict(state, data.eval_batches('test'), data.normaliser_px)
  test_errors = metrics_lib.hc_errors(test['hc_px_true'], test['hc_px_pred'],
                                      test['pixel_size_mm'])
  subject_of = {image.filename: image.subject_id for image in data.folds.images}
  subjects = [subject_of[f] for f in test['filename']]
  metrics_lib.write_predictions(
      os.path.join(workdir, PREDICTIONS_FILE),
      metrics_lib.prediction_rows(test['filename'], subjects,
                                  test['pixel_size_mm'], test['hc_px_true'],
                                  test['hc_px_pred']))
  results = {'model': config.model, 'loss': config.loss, 'fold': config.fold,
             'selected_epoch': best['epoch'],
             'normaliser_px': data.normaliser_px,
             'val_mae_mm': best['val_mae_mm'],
             **{f'test_{k}': v for k, v in test_errors.items()}}
  data_lib.save_json(os.path.join(workdir, RESULTS_FILE), results)
  writer.write({'epoch': config.num_epochs, 'step': int(state.step),
                **{f'test_{k}': v for k, v in test_errors.items()}})
  writer.close()
  _log(f'test fold {config.fold} (epoch {best["epoch"]} selected on '
       f'validation): {metrics_lib.format_errors(test_errors)}')
  return results
