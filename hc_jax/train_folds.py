"""Trains every fold of a model (and several losses) at once on one accelerator.

The TensorFlow-free path for a GPU: the prepared images of an export
(`hc_jax.fold_data`) stay on the device as one uint8 array, and each of M
members (a loss × a test fold) is one model. Their train states are stacked
along a leading member axis and ONE jitted step, `jax.vmap`ped over that axis,
trains them all (`hc_jax.member_steps`): it gathers each member's batch by
its own positions, augments it on the device (`hc_jax.device_augment`) and
applies `hc_jax.train.train_step`. With a batch of 8, one model leaves a GPU
mostly idle; fifteen at once (3 losses × 5 folds) fill it better and compile
once.

Per member, everything is as `hc_jax.train.train_and_evaluate` does for that
fold and loss: its own training images and shuffle order (from (seed, fold,
epoch)), `len(train) // batch_size` steps per epoch (a member with fewer steps
than the others sits the extra steps out, unchanged), the target normaliser
from its training images, a validation pass after every epoch, the parameters
of the epoch with the lowest validation MAE (mm) kept (selection never sees
the test fold), and the test fold scored with them. A member's results do not
depend on which other members train beside it. Members start from the
parameters `hc_jax.train` starts from with the same seed. Each leaves
`ROOT/<model>_<loss>/fold<k>/` with `config.json`, `folds.json`,
`metrics.jsonl`, `predictions_test.csv` and `results.json`, as a `hc_jax.train`
workdir does (but no checkpoints).

With `time_budget_s`, the first epoch is timed and the epochs cut to what
fits (results record `num_epochs` and `planned_epochs`); with a cosine
schedule, the cut ends training before the schedule does.

A member whose training loss turns NaN or infinite is frozen from that step
on (the others go on) and scored on its test fold with the epoch validation
had selected before; its results record `diverged_epoch`. Only when every
member has diverged does the run stop with `FloatingPointError`.
"""

import dataclasses
import functools
import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hc_jax import device_augment
from hc_jax import fold_data
from hc_jax import losses as losses_lib
from hc_jax import member_steps
from hc_jax import metrics as metrics_lib
from hc_jax import models
from hc_jax import train


AUTO = 'auto'
# What `members_per_call='auto'` chooses from, and how many steps (after each
# one's compiling step) it times.
AUTO_CANDIDATES = (0, 1)
AUTO_PROBE_STEPS = 3


@dataclasses.dataclass(frozen=True)
class FoldsConfig:
  """Settings of a fold-vmapped run; fields named as in `configs/default.py`.

  Attributes:
    model: a key of `models.MODELS`.
    losses: keys of `losses.LOSSES`; every loss is trained on every fold.
    folds: test folds to train (None: all of the assignment's).
    dtype: compute dtype of models that take one (ResNet50); others float32.
    image_size: 0 takes the export's; otherwise it must match it.
    augment: the training augmentation.
    time_budget_s: None, or seconds for the whole call; the epochs are cut
      to what fits once the first one is timed.
    members_per_call: how many members one vmapped call of the model holds:
      0 all of them; 1 one after another (`jax.lax.map`) inside the same
      jitted step; k chunks of k; 'auto' times 0 and 1 on the first steps of
      the first epoch and trains on with the faster (`AUTO_CANDIDATES`). vmap
      turns each convolution into a grouped one, whose backward pass is not
      always fast on a GPU (jax-ml/jax#13800). The choice changes only the
      speed, not the mathematics. See `member_steps.map_members`.
  """
  model: str = 'cnn_263k'
  losses: tuple[str, ...] = ('mse',)
  huber_delta: float = 0.5
  dtype: str = 'float32'
  folds: Optional[tuple[int, ...]] = None
  image_size: int = 0
  num_epochs: int = 250
  batch_size: int = 8
  eval_batch_size: int = 64
  learning_rate: float = 1e-3
  lr_schedule: str = 'constant'
  warmup_epochs: int = 0
  weight_decay: float = 0.0
  hc_normaliser_px: float = 0.0
  augment: device_augment.AugmentConfig = device_augment.AugmentConfig()
  seed: int = 0
  time_budget_s: Optional[float] = None
  members_per_call: int | str = 0

  def get(self, name: str, default: Any = None) -> Any:
    """`config.get` as on a ConfigDict, for `hc_jax.train`'s helpers."""
    return getattr(self, name, default)


def check_config(config: FoldsConfig, num_folds: int) -> None:
  """Raises ValueError with one clear line for a config that cannot run."""
  if config.model not in models.MODELS:
    raise ValueError(f'unknown model {config.model!r}; choose one of '
                     f'{", ".join(sorted(models.MODELS))}')
  if (not config.losses or len(set(config.losses)) != len(config.losses) or
      any(name not in losses_lib.LOSSES for name in config.losses)):
    raise ValueError(f'losses must be distinct names from '
                     f'{", ".join(sorted(losses_lib.LOSSES))}; got '
                     f'{list(config.losses)}')
  if config.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got "
                     f'{config.dtype!r}')
  if config.lr_schedule not in ('constant', 'cosine'):
    raise ValueError("lr_schedule must be 'constant' or 'cosine', got "
                     f'{config.lr_schedule!r}')
  if config.members_per_call != AUTO and not (
      isinstance(config.members_per_call, int) and
      config.members_per_call >= 0):
    raise ValueError(f"members_per_call must be an int >= 0 or '{AUTO}', "
                     f'got {config.members_per_call!r}')
  for name in ('batch_size', 'eval_batch_size', 'num_epochs'):
    if getattr(config, name) < 1:
      raise ValueError(f'{name} must be positive, got {getattr(config, name)}')
  if config.folds is not None and (not config.folds or any(
      not 0 <= fold < num_folds for fold in config.folds)):
    raise ValueError(f'folds must be in [0, {num_folds - 1}], got '
                     f'{config.folds}')


def require_accelerator(allow_cpu: bool = False) -> None:
  """Raises RuntimeError where JAX has only the CPU, unless `allow_cpu`.

  A broken CUDA set-up makes JAX warn and go on with the CPU, where a GPU
  script would spend its whole time budget on a few steps.
  """
  if jax.default_backend() == 'cpu' and not allow_cpu:
    raise RuntimeError(f'JAX found no GPU or TPU (backend cpu: '
                       f'{jax.devices()}); check the CUDA set-up, or pass '
                       '--allow_cpu to run on the CPU anyway')


def compute_dtype(config: FoldsConfig) -> str:
  """The dtype the model computes in: `config.dtype` where it takes one."""
  takes_dtype = 'dtype' in models.MODELS[config.model].__dataclass_fields__
  return config.dtype if takes_dtype else 'float32'


def _log(message: str) -> None:
  print(message, flush=True)


class FoldsTrainer:
  """The stacked state and the jitted steps of a fold-vmapped run."""

  def __init__(self, config: FoldsConfig, data: fold_data.FoldData,
               members: fold_data.Members):
    self.config, self.data, self.members = config, data, members
    # The initial parameters and dropout keys of `hc_jax.train` with this seed.
    init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    augment_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    tx = train.create_optimizer(config, int(members.steps.max()))
    state = train.create_train_state(config, train.create_model(config),
                                     init_key, tx)
    # One compiled call (eagerly, every leaf shape would compile its own).
    self.state = jax.jit(lambda state: jax.tree.map(
        lambda x: jnp.repeat(jnp.asarray(x)[None], len(members), axis=0),
        state))(state)
    self.images = jax.device_put(data.arrays['images'])
    self.hc_px = jax.device_put(data.arrays['hc_px'])
    self.member_arrays = {
        'fold': jnp.asarray(members.folds),
        'loss_id': jnp.asarray([config.losses.index(loss)
                                for loss, _ in members.pairs], jnp.int32),
        'normaliser_px': jnp.asarray(members.normaliser_px)}
    loss_fns = tuple(
        losses_lib.get_loss(name, **({'delta': config.huber_delta}
                                     if name == 'huber' else {}))
        for name in config.losses)
    per_call = config.members_per_call
    candidates = AUTO_CANDIDATES if per_call == AUTO else (per_call,)
    self._steps = {candidate: jax.jit(functools.partial(
        member_steps.members_train_step, loss_fns=loss_fns,
        augment=config.augment, dropout_key=dropout_key,
        augment_key=augment_key, members_per_call=candidate),
                                      donate_argnums=(0,))
                   for candidate in candidates}
    # Chosen in the first epoch when there are several.
    self.members_per_call = None if per_call == AUTO else per_call
    self.step_ms = {}  # Timed ms per step of each candidate (auto only).
    # The forward pass alone has no grouped-convolution gradient: vmapped
    # under 'auto'.
    self._predict = jax.jit(functools.partial(
        member_steps.members_predict,
        members_per_call=0 if per_call == AUTO else per_call))
    # The epoch in which each member's loss diverged (0: never); a diverged
    # member is frozen.
    self.diverged_epoch = np.zeros(len(members), int)
    self._select = jax.jit(lambda better, new, old: jax.tree.map(
        lambda n, o: jnp.where(
            better.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old),
                           donate_argnums=(2,))
    self.best = self.variables()

  def variables(self):
    """A copy of the current params and batch statistics."""
    return jax.tree.map(jnp.copy, {'params': self.state.params,
                                   'batch_stats': self.state.batch_stats})

  @property
  def alive(self) -> np.ndarray:
    """bool [M]: the members still training."""
    return self.diverged_epoch == 0

  def _choose_members_per_call(self, run, num_steps: int) -> int:
    """'auto': times each candidate on the first steps, keeps the faster.

    Each candidate takes one step that compiles it and `probe` timed ones;
    at least one step of the epoch is left for the chosen one.

    Returns:
      How many steps ran.
    """
    probe = min(AUTO_PROBE_STEPS, (num_steps - 1) // len(self._steps) - 1)
    if probe < 1:
      self.members_per_call = AUTO_CANDIDATES[0]
      _log(f'members_per_call=auto: {num_steps} steps are too few to time, '
           f'{self.members_per_call} taken')
      return 0
    i = 0
    for candidate, step in self._steps.items():
      jax.block_until_ready(run(step, i))  # Compiles.
      start = time.perf_counter()
      for i in range(i + 1, i + 1 + probe):
        loss = run(step, i)
      jax.block_until_ready(loss)
      i += 1
      self.step_ms[candidate] = (time.perf_counter() - start) / probe * 1e3
    self.members_per_call = min(self.step_ms, key=self.step_ms.get)
    _log('members_per_call=auto: ' + ', '.join(
        f'{c}: {ms:.1f} ms per step' for c, ms in self.step_ms.items()) +
         f' -> {self.members_per_call}')
    return i

  def train_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, float,
                                             int]:
    """Runs one epoch of every member still alive.

    Under `members_per_call='auto'`, the first epoch's first steps time each
    candidate (its first step compiles it) and the rest of the epoch, and the
    run, take the faster.

    Returns:
      `(losses, active, timed_from, untimed_steps)`: float [steps, M] step
      losses, bool [steps, M] which were taken, and when the last step that
      compiled finished (`time.perf_counter()`) with how many steps had run
      by then, so `(end - timed_from) / (steps - untimed_steps)` is the time
      of a compiled step.
    """
    index, active = self.members.epoch_batches(self.config.seed, epoch)
    active = active & self.alive[None]
    index_device, active_device = jnp.asarray(index), jnp.asarray(active)
    step_losses = []

    def run(step, i):
      self.state, loss = step(self.state, index_device, active_device, i,
                              epoch, self.member_arrays, self.images,
                              self.hc_px)
      step_losses.append(loss)
      return loss

    i = 0
    if self.members_per_call is None:  # 'auto', first epoch.
      i = self._choose_members_per_call(run, len(index))
    if i == 0:
      jax.block_until_ready(run(self._steps[self.members_per_call], i))
      i += 1
    timed_from, untimed_steps = time.perf_counter(), i
    step = self._steps[self.members_per_call]
    for i in range(i, len(index)):
      run(step, i)
    return (np.asarray(jax.device_get(step_losses)), active, timed_from,
            untimed_steps)

  def keep_best(self, improved: np.ndarray) -> None:
    """Keeps the current variables of the members that `improved`."""
    self.best = self._select(jnp.asarray(improved), {
        'params': self.state.params,
        'batch_stats': self.state.batch_stats}, self.best)

  def predict(self, part: str, best: bool = False):
    """HC (px) predicted by every member on its 'val' or 'test' images.

    Returns:
      `(index, mask, hc_px_pred)`: [M, L] export positions, whether real,
      and the predictions.
    """
    size = self.config.eval_batch_size
    index, mask = fold_data.padded_index(
        [split[part] for split in self.members.split], size)
    state = self.state.replace(**self.best) if best else self.state
    chunks = [self._predict(state, index[:, c:c + size], self.images)
              for c in range(0, index.shape[1], size)]
    predictions = np.concatenate(jax.device_get(chunks), axis=1)
    return index, mask, predictions * self.members.normaliser_px[:, None]

  def errors(self, predicted, m: int) -> dict[str, float]:
    """`metrics.hc_errors` of member m from `predict`'s output."""
    index, mask, hc_px_pred = predicted
    keep = index[m][mask[m]]
    return metrics_lib.hc_errors(self.data.arrays['hc_px'][keep],
                                 hc_px_pred[m][mask[m]],
                                 self.data.arrays['pixel_size_mm'][keep])


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')


def _write_json(path: str, value) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)


def train_and_evaluate(config: FoldsConfig, data: fold_data.FoldData,
                       root: str) -> list[dict[str, Any]]:
  """Trains every (loss, fold) member together; writes one workdir each.

  Args:
    config: a `FoldsConfig`.
    data: the export and its folds (`fold_data.load`).
    root: the members' workdirs go to `root/<model>_<loss>/fold<k>/`.

  Returns:
    One results dict per member (the contents of its results.json).

  Raises:
    ValueError: for a bad config or data that cannot fill a batch.
    FloatingPointError: on a NaN or inf training loss.
  """
  started = time.perf_counter()
  check_config(config, data.assignment.num_folds)
  if config.image_size not in (0, data.image_size):
    raise ValueError(f'image_size={config.image_size} but the export holds '
                     f'{data.image_size}x{data.image_size} images')
  config = dataclasses.replace(config, image_size=data.image_size)
  members = fold_data.Members(data, config.losses, config.folds,
                              config.batch_size, config.hc_normaliser_px)
  trainer = FoldsTrainer(config, data, members)
  workdirs = [os.path.join(root, f'{config.model}_{loss}', f'fold{fold}')
              for loss, fold in members.pairs]
  for workdir, (loss, fold) in zip(workdirs, members.pairs):
    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, 'config.json'), {
        **dataclasses.asdict(config), 'loss': loss, 'fold': fold,
        'num_folds': data.assignment.num_folds,
        'compute_dtype': compute_dtype(config), 'trainer': 'train_folds'})
    data.assignment.to_json(os.path.join(workdir, 'folds.json'))
    open(os.path.join(workdir, train.METRICS_FILE), 'w').close()
  _log(f'{config.model} ({compute_dtype(config)}), losses '
       f'{list(config.losses)}: {len(members)} members in one vmapped step, '
       f'{data.image_size}x{data.image_size}, batch {config.batch_size} each, '
       f'{int(members.steps.max())} steps per epoch, on '
       f'{jax.devices()[0].platform}')
  trainer.predict('val')  # Compiles the evaluation outside the timed epoch.
  trainer.keep_best(np.zeros(len(members), bool))  # And the selection.

  best_mae = np.full(len(members), np.inf)
  best_epoch = np.zeros(len(members), int)
  num_epochs, epoch_seconds, test_seconds, epoch = config.num_epochs, 0, 0, 0
  while epoch < num_epochs:
    epoch += 1
    epoch_start = time.perf_counter()
    step_losses, active, timed_from, untimed_steps = trainer.train_epoch(
        epoch)
    train_end = time.perf_counter()
    bad = ~np.isfinite(step_losses) & active
    for m in np.flatnonzero(bad.any(axis=0)):
      step = int(np.argmax(bad[:, m]))
      trainer.diverged_epoch[m] = epoch
      _log(f'{config.model} {members.pairs[m][0]} fold {members.pairs[m][1]}: '
           f'loss is {step_losses[step, m]} at step {step + 1} of epoch '
           f'{epoch}; this member is frozen and will be scored with epoch '
           f'{best_epoch[m]} (selected on validation before)')
    if not trainer.alive.any():
      raise FloatingPointError(
          f'{config.model}: the training loss of every member diverged (last '
          f'in epoch {epoch})')
    val = trainer.predict('val')
    val_errors = [trainer.errors(val, m) for m in range(len(members))]
    val_mae = np.asarray([e['mae_mm'] for e in val_errors])
    improved = (val_mae < best_mae) & trainer.alive
    best_mae = np.where(improved, val_mae, best_mae)
    best_epoch = np.where(improved, epoch, best_epoch)
    trainer.keep_best(improved)
    epoch_end = time.perf_counter()
    seconds = epoch_end - epoch_start
    for m, workdir in enumerate(workdirs):
      _append_jsonl(os.path.join(workdir, train.METRICS_FILE), {
          'epoch': epoch, 'step': int(epoch * members.steps[m]),
          'train_loss': (float(step_losses[active[:, m], m].mean())
                         if active[:, m].any() else None),
          'epoch_seconds': round(seconds, 2),
          **{f'val_{k}': v for k, v in val_errors[m].items()}})
    if epoch == 1:
      # The first step compiled: time the others, and the validation pass.
      steps = len(step_losses)
      step_seconds = ((train_end - timed_from) / (steps - untimed_steps)
                      if steps > untimed_steps else
                      (timed_from - epoch_start) / steps)
      val_seconds = epoch_end - train_end
      epoch_seconds = steps * step_seconds + val_seconds
      num_test = max(len(s['test']) for s in members.split)
      num_val = max(len(s['val']) for s in members.split)
      test_seconds = val_seconds * max(1.0, num_test / num_val) + 1.0
      if config.time_budget_s is not None:
        left = config.time_budget_s - (epoch_end - started) - test_seconds
        num_epochs = int(min(config.num_epochs,
                             1 + max(0, left // epoch_seconds)))
      compile_seconds = timed_from - epoch_start - untimed_steps * step_seconds
      _log(f'first epoch: compile {compile_seconds:.1f} s, '
           f'{step_seconds * 1e3:.1f} ms per step '
           f'({len(members) * config.batch_size / step_seconds:.0f} img/s), '
           f'validation {val_seconds:.2f} s: {epoch_seconds:.1f} s per epoch '
           f'-> {num_epochs} epochs' + (
               f' (of {config.num_epochs} asked)'
               if num_epochs < config.num_epochs else ''))
    else:
      epoch_seconds = max(epoch_seconds, seconds)
    losses_of_members = np.asarray([loss for loss, _ in members.pairs])
    per_loss = []
    for loss in config.losses:
      alive = (losses_of_members == loss) & trainer.alive
      per_loss.append(f'{loss} {val_mae[alive].mean():.2f}' if alive.any()
                      else f'{loss} diverged')
    _log(f'epoch {epoch}/{num_epochs} ({seconds:.1f} s): mean val MAE mm '
         f'{", ".join(per_loss)}; {int(improved.sum())}/{len(members)} '
         'improved')
    if (config.time_budget_s is not None and epoch < num_epochs and
        time.perf_counter() - started + epoch_seconds + test_seconds >
        config.time_budget_s):
      _log(f'stopping after epoch {epoch}: the next would pass the budget')
      num_epochs = epoch

  test = trainer.predict('test', best=True)
  arrays = data.arrays
  results = []
  for m, ((loss, fold), workdir) in enumerate(zip(members.pairs, workdirs)):
    index, mask, hc_px_pred = test
    keep = index[m][mask[m]]
    test_errors = {f'test_{k}': v for k, v in trainer.errors(test, m).items()}
    metrics_lib.write_predictions(
        os.path.join(workdir, train.PREDICTIONS_FILE),
        metrics_lib.prediction_rows(
            arrays['filename'][keep], arrays['subject_id'][keep],
            arrays['pixel_size_mm'][keep], arrays['hc_px'][keep],
            hc_px_pred[m][mask[m]]))
    result = {'model': config.model, 'loss': loss, 'fold': fold,
              'selected_epoch': int(best_epoch[m]),
              'normaliser_px': float(members.normaliser_px[m]),
              'val_mae_mm': float(best_mae[m]), 'num_epochs': num_epochs,
              'planned_epochs': config.num_epochs,
              'dtype': compute_dtype(config), 'trainer': 'train_folds',
              'num_members': len(members),
              'members_per_call': trainer.members_per_call,
              'diverged_epoch': int(trainer.diverged_epoch[m]) or None,
              'train_seconds': round(time.perf_counter() - started, 1),
              **test_errors}
    _write_json(os.path.join(workdir, train.RESULTS_FILE), result)
    _append_jsonl(os.path.join(workdir, train.METRICS_FILE), {
        'epoch': num_epochs, 'step': int(num_epochs * members.steps[m]),
        **test_errors})
    results.append(result)
  _log(f'{config.model}: {num_epochs} epochs in '
       f'{time.perf_counter() - started:.0f} s; test MAE mm per member: ' +
       ', '.join(f'{r["loss"]}/{r["fold"]} {r["test_mae_mm"]:.2f}'
                 for r in results))
  return results
