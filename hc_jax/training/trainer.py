"""The training loop behind `train.train_and_evaluate` and `train_members`.

A `Trainer` holds a run of M members (see `hc_jax.training.train`): their data
(`hc_jax.data`), the stacked train state, one `checkpoint.Checkpoints` and
one `metric_log.MetricWriter` per member workdir. Each epoch it trains every
member still alive, scores each on its validation part, keeps the best epoch
per member, and at the end scores each member's test fold with the
checkpoint its validation part selected.

Ctrl-C or SIGTERM (`interrupt.StopRequest`) stops the run after the step in
flight: the host dispatches at most one step ahead of the one running, so it
waits for one or two steps, saves where it is (the `interrupted` checkpoint
in the middle of an epoch, a latest one between epochs) and raises
`interrupt.Interrupted`, whose one line says what was kept. The same command
then resumes at that step with the same batches, keys and optimiser state,
and ends as an uninterrupted run.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from hc_jax import log
from hc_jax import losses
from hc_jax import metrics as metrics_lib
from hc_jax import models
from hc_jax import workdir as workdir_lib
from hc_jax.data import augment as augment_lib
from hc_jax.data import cache as cache_lib
from hc_jax.data import normalise
from hc_jax.data import pipeline as data_lib
from hc_jax.nets import kinds
from hc_jax.nets import layers as layers_lib
from hc_jax.training import checkpoint
from hc_jax.training import finetune
from hc_jax.training import interrupt
from hc_jax.training import metric_log
from hc_jax.training import step as step_lib

P = jax.sharding.PartitionSpec
LOG_EVERY_SECONDS = 30.0
AUTO_PROBE_STEPS = 3
GPU_MODELS = ('resnet50', 'vgg16')




def _read_diverged(workdir: str) -> int:
  """The epoch in which a member's loss diverged, or 0."""
  path = os.path.join(workdir, workdir_lib.DIVERGED_FILE)
  if not os.path.isfile(path):
    return 0
  with open(path) as f:
    return int(json.load(f)['epoch'])


# A first progress line after this many finished steps past the compilation.
FIRST_LOG_STEPS = 3


def estimate(done: int, total: int, steps_per_epoch: int,
             rate_steps: int, rate_seconds: float,
             epoch_seconds: float | None) -> tuple[float, float]:
  """(steps per second, seconds left) of a run from finished work only.

  Args:
    done, total: steps finished and planned in this call of the run.
    steps_per_epoch: its steps per epoch.
    rate_steps, rate_seconds: steps finished since the compiled step first
      returned, and the seconds they took (the compilation is not work).
    epoch_seconds: the mean wall time of a whole epoch (steps, validation
      and checkpoints) once one has finished without compiling, else None.

  Returns:
    The rate, and the time left: the remaining epochs at `epoch_seconds`
    when known (so validation counts), else the remaining steps at the rate.
  """
  rate = rate_steps / max(rate_seconds, 1e-9)
  left_steps = max(total - done, 0)
  if epoch_seconds:
    return rate, left_steps / steps_per_epoch * epoch_seconds
  return rate, left_steps / max(rate, 1e-9)


def _eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Trainer:
  """The state and loop of one call of `train.train_and_evaluate` or
  `train.train_members`; `run` is the epoch loop, and calls the jitted
  step, the validation, the checkpoints and the test scoring."""

  def __init__(self, configs, workdirs):
    self.configs, self.workdirs = list(configs), list(workdirs)
    self.config = config = configs[0]
    self.started = time.time()
    self.mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
    self.replicated = jax.sharding.NamedSharding(self.mesh, P())
    self.batch_sharding = jax.sharding.NamedSharding(self.mesh, P(None, 'data'))
    self.data = data_lib.load(configs, workdirs, jax.process_index(),
                              jax.process_count())
    self.rescore_only = all(
        c.get('rescore', False) and
        os.path.isfile(os.path.join(w, workdir_lib.RESULTS_FILE))
        for c, w in zip(configs, workdirs))
    self._check_same_data()
    for member, split in zip(configs, self.data.split):
      rows = np.concatenate([split['train'], split['val']])
      step_lib.check_outlines(member, self.data.arrays['filename'][rows],
                              self.data.arrays['ellipse'][rows])
    loss_keys = [(c.loss, c.huber_delta if c.loss == 'huber' else None)
                 for c in configs]
    unique = list(dict.fromkeys(loss_keys))
    self.loss_fns = tuple(losses.get_loss(configs[loss_keys.index(k)])
                          for k in unique)
    loss_id = [unique.index(k) for k in loss_keys]
    keys = [jax.random.split(jax.random.key(c.seed)) for c in configs]
    self.members = jax.device_put({
        'key': jnp.stack([k[1] for k in keys]),
        'loss_id': jnp.asarray(loss_id, jnp.int32),
        'normaliser_px': jnp.asarray(self.data.normaliser_px)},
                                  self.replicated)
    self.num_epochs = config.num_epochs
    model = step_lib.create_model(config)
    tx = step_lib.create_optimizer(config, int(self.data.steps.max()))
    self.init_states = [step_lib.create_train_state(config, model, k[0], tx)
                        for k in keys]
    if config.get('init_from') and finetune.is_shipped(config.init_from):
      self.init_states = [finetune.load_into(s, config)
                          for s in self.init_states]
      log.info(f'initialised from {config.init_from}')
    elif config.get('init_from'):
      from hc_jax.nets import pretrained  # pylint: disable=import-outside-toplevel
      self.init_states = [pretrained.load_into(s, config.init_from,
                                               config.model)
                          for s in self.init_states]
      log.info(f'initialised from {config.init_from}')
    self.augment = augment_lib.AugmentConfig.from_dict(config.augment)
    how = config.members_per_call
    self.candidates = ('vmap', 'map') if how == 'auto' else (how,)
    self.how = None if how == 'auto' and len(
        configs) > 1 else self.candidates[0]
    loss_of, hc_of = step_lib.output_functions(config)
    if len(configs) == 1:
      self.steps = {self.how: jax.jit(step_lib.one_member_step(
          loss_fn=self.loss_fns[0], augment=self.augment, loss_of=loss_of),
                                      donate_argnums=(0,))}
    else:
      self.steps = {c: jax.jit(functools.partial(
          step_lib.members_train_step, loss_fns=self.loss_fns,
          augment=self.augment, how=c, loss_of=loss_of), donate_argnums=(0,))
                    for c in self.candidates}
    self.predict_fn = jax.jit(functools.partial(
        step_lib.members_predict, how='vmap', hc_of=hc_of),
                              out_shardings=self.replicated)

  def _check_same_data(self) -> None:
    """Raises ValueError when a workdir's run trained on other data than the
    data found now (its config.json records the source's digests)."""
    for workdir in self.workdirs:
      saved = workdir_lib.read_run_config(workdir) or {}
      for key in ('source_digest', 'content_digest'):
        before, now = saved.get(key), self.data.info.get(key)
        if before and now and before != now:
          raise ValueError(
              f'{workdir} was trained on other data ({key} {before} there, '
              f'{now} in {self.data.info.get("source")}); point '
              'data.hc18_dir at the copy it trained on, or use another '
              'workdir')

  def _write_run_files(self) -> None:
    """config.json and folds.json of every member (once nothing refuses the
    run any more)."""
    for member, workdir in zip(self.configs, self.workdirs):
      os.makedirs(workdir, exist_ok=True)
      data_lib.save_json(os.path.join(workdir, workdir_lib.CONFIG_FILE), {
          **member.to_dict(),
          **{key: self.data.info.get(key)
             for key in ('source_digest', 'content_digest')},
          'layers_resolved': layers_lib.resolve(member.get('layers', 'auto'))})
      self.data.assignment.to_json(os.path.join(workdir,
                                                workdir_lib.FOLDS_FILE))

  def _describe(self) -> str:
    c, d = self.config, self.data
    height, width = cache_lib.input_shape(c)
    parts = ', '.join(f'fold {x.fold} {x.loss}' + (
        f' seed {x.seed}' if x.seed != c.seed else '') for x in self.configs)
    return (f'{c.model} ({parts}): {len(d.split[0]["train"])} train / '
            f'{len(d.split[0]["val"])} val / {len(d.split[0]["test"])} test '
            f'images at {height}x{width} ({c.resize_mode}), '
            f'{int(d.steps.max())} steps per epoch, {jax.device_count()} '
            f'{jax.devices()[0].platform} device(s)')

  def _shard(self, array):
    """A global array from this process's rows of [M, rows, ...] batches."""
    if array.ndim < 2:
      return jax.device_put(array, self.replicated)
    global_shape = ((array.shape[0], array.shape[1] * jax.process_count()) +
                    array.shape[2:])
    return jax.make_array_from_process_local_data(
        self.batch_sharding, array, global_shape)

  def _restore(self):
    """Restores every member's latest checkpoint; returns the stacked state."""
    self.checkpoints = [checkpoint.Checkpoints(w) for w in self.workdirs]
    restored = [ck.restore_latest(s) for ck, s in
                zip(self.checkpoints, self.init_states)]
    # A member that diverged is frozen for good (diverged.json in its
    # workdir); the others resume from the epoch they all reached.
    self.diverged = np.asarray([_read_diverged(w) for w in self.workdirs])
    epochs = [p.get('epoch', 0) for _, p in restored]
    alive = [e for e, d in zip(epochs, self.diverged) if not d]
    start = min(alive) if alive else min(epochs)
    for m, (ck, epoch) in enumerate(zip(self.checkpoints, epochs)):
      if epoch > start:  # Killed between the members' saves.
        restored[m] = ck.restore_latest(self.init_states[m], max_epoch=start)
    # Where the run stopped in an epoch (Ctrl-C): the steps done, and their
    # losses [steps, M], which the epoch's metrics line and NaN check need.
    self.resume_step, self.resume_losses = 0, None
    self.latest_epoch = start  # The epoch of the newest latest checkpoint.
    partial = self._restore_interrupted(start)
    if partial is not None:
      restored = partial
      start = int(partial[0][1]['epoch'])
      self.resume_step = int(partial[0][1]['step'])
      self.resume_losses = np.asarray(
          [p['losses'] for _, p in partial], np.float32).T
    self.start_epoch = start
    self.best = [p.get('best', {'val_mae_mm': float('inf'), 'epoch': 0})
                 for _, p in restored]
    for ck in self.checkpoints:
      ck.drop_after(start)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *[s for s, _ in restored])
    return jax.device_put(stacked, self.replicated)

  def _restore_interrupted(self, start):
    """Every member's (state, progress) of the checkpoint saved when the run
    was interrupted in an epoch, when they all have one at the same step,
    after the latest checkpoints (epoch `start`); else None, and those
    checkpoints are deleted."""
    found = [ck.restore_interrupted(s)
             for ck, s in zip(self.checkpoints, self.init_states)]
    points = {None if f is None else (f[1].get('epoch'), f[1].get('step'))
              for f in found}
    if len(points) == 1 and None not in points and min(points)[0] >= start:
      return found
    if len(points) > 1:  # Killed between the members' saves, or damaged.
      log.warn('the members were not all saved at the same step when the '
               f'run was interrupted; resuming after epoch {start} instead')
    for ck in self.checkpoints:
      ck.drop_interrupted()
    return None

  def _member_state(self, state, m):
    return jax.tree.map(lambda x: x[m], state)

  def _predict(self, state, part, stop=None):
    """Predicted HC (px) of every member on its 'val' or 'test' images; None
    when `stop` (a `StopRequest`) is requested before the last batch."""
    size = self.config.eval_batch_size
    index, mask = self.data.eval_index(part, size)
    images = self.data.arrays['images']
    resize = self.data.arrays['resize']  # An ellipse model's HC needs it.
    rows = data_lib.process_slice(size, jax.process_index(),
                                  jax.process_count())
    out = []
    for c in range(0, index.shape[1], size):
      if stop is not None and stop.requested:
        return None
      chunk = index[:, c:c + size][:, rows]
      out.append(self.predict_fn(
          state, self._shard(images[chunk]),
          resize=self._shard(resize[chunk].astype(np.float32)),
          normaliser_px=self.members['normaliser_px']))
    predictions = np.concatenate(jax.device_get(out), axis=1)
    return index, mask, predictions * self.data.normaliser_px[:, None]

  def _errors(self, predicted, m):
    index, mask, hc_px_pred = predicted
    keep = index[m][mask[m]]
    arrays = self.data.arrays
    return metrics_lib.hc_errors(arrays['hc_px'][keep], hc_px_pred[m][mask[m]],
                                 arrays['pixel_size_mm'][keep])

  def _probe(self, state, batch):
    """'auto': times vmap and lax.map on the same batch, keeps the faster.
    Each is compiled once, as the step that training then calls; the timed
    steps run on a copy of the state (which they consume) and are not kept:
    the state goes on from before them."""
    times = {}
    for how in self.candidates:
      step = self.steps[how]
      copy = jax.device_put(state, self.replicated, may_alias=False)
      out = step(copy, batch, self.members)  # Compiles.
      jax.block_until_ready(out)
      start = time.perf_counter()
      for _ in range(AUTO_PROBE_STEPS):
        out = step(out[0], batch, self.members)
      jax.block_until_ready(out)
      times[how] = (time.perf_counter() - start) / AUTO_PROBE_STEPS
    self.how = min(times, key=times.get)
    self.step_ms = {k: round(v * 1e3, 2) for k, v in times.items()}
    log.info('members_per_call=auto: ' + ', '.join(
        f'{k} {v} ms per step' for k, v in self.step_ms.items()) +
         f' -> {self.how}')
    return state

  def _progress(self, epoch, i, loss, clock=time.time):
    """Logs the compilation when the first step returns, then the loss,
    speed and time left every `LOG_EVERY_SECONDS`."""
    if not self.compiled:
      jax.block_until_ready(loss)
      self.compiled, self.compiled_epoch = True, epoch
      self.compile_seconds = time.time() - self.compile_started
      log.info(f'compiled in {self.compile_seconds:.0f} s')
    steps = int(self.data.steps.max())
    done = (epoch - 1 - self.start_epoch) * steps + i + 1 - self.resume_step
    if self.rate_start is None:  # The compiled step's first return.
      self.rate_start = (done, clock())
      return
    first = done - self.rate_start[0] == FIRST_LOG_STEPS
    if not first and clock() - self.last_log < LOG_EVERY_SECONDS:
      return
    value = float(loss.mean())  # Waits for the queued steps: finished work.
    now = self.last_log = clock()
    total = (self.num_epochs - self.start_epoch) * steps - self.resume_step
    epoch_seconds = (sum(self.epoch_seconds) / len(self.epoch_seconds)
                     if self.epoch_seconds else None)
    rate, left = estimate(done, total, steps, done - self.rate_start[0],
                          now - self.rate_start[1], epoch_seconds)
    log.info(f'epoch {epoch}/{self.num_epochs} step {i + 1}/{steps} loss '
             f'{value:.4g} '
             f'{rate * self.data.batch_size * len(self.configs):.3g} img/s ETA '
             f'{_eta(left)}')

  def run(self):
    """Trains the epochs left (resumed where the workdirs stopped), each
    followed by validation and checkpoints, then scores the test folds;
    returns the members' results."""
    state = self._restore()
    self._write_run_files()
    self._announce()
    writers = [metric_log.MetricWriter(w, resume_epoch=self.start_epoch)
               for w in self.workdirs]
    self.compiled, self.compiled_epoch = False, None
    self.compile_seconds = 0.0
    self.compile_started = self.last_log = time.time()
    self.rate_start = None  # (steps done, time) when the compiled step returned.
    self.epoch_seconds = []  # Wall time of each whole epoch (no compiling).
    if self.start_epoch < self.num_epochs:
      log.info('compiling the training step...')
    last_save = time.time()
    epoch = self.start_epoch
    pipeline = self.config.data.get('pipeline', 'auto')
    # One process stops alone (several would wait for each other's step).
    with interrupt.StopRequest(jax.process_count() == 1) as self.stop:
      while epoch < self.num_epochs:
        epoch += 1
        epoch_start = time.time()
        compiled_before = self.compiled
        # The epoch's steps, from the step where the run resumed in its first.
        start = self.resume_step if epoch == self.start_epoch + 1 else 0
        alive = self.diverged == 0
        step_losses = list(self.resume_losses) if start else []
        active = [a & alive for a in self.data.epoch_index(epoch)[1][:start]]
        previous = None
        for i, batch in enumerate(
            self.data.train_batches(epoch, pipeline, start=start), start):
          if self.stop.requested:
            jax.block_until_ready(state)
            self._stop(state, epoch, i, np.asarray(jax.device_get(step_losses)))
          active.append(batch.pop('active') & alive)
          batch = {k: self._shard(v) for k, v in batch.items()}
          batch['active'] = jax.device_put(active[-1], self.replicated)
          if self.how is None:  # 'auto' with several members: time both.
            state = self._probe(state, batch)
          state, loss = self.steps[self.how](state, batch, self.members)
          # At most this step waits behind the one running: a stop request is
          # answered within a step or two, not after a queue of them.
          if previous is not None:
            jax.block_until_ready(previous)
          previous = loss
          step_losses.append(loss)
          self._progress(epoch, i, loss)
        step_losses = np.asarray(jax.device_get(step_losses))
        active = np.asarray(active)
        val = self._predict(state, 'val', self.stop)
        if val is None:  # Stopped after the epoch's steps, before its scores.
          self._stop(state, epoch, len(step_losses), step_losses)
        self._check_divergence(epoch, step_losses, active)
        if self._validate_and_save(state, val, epoch, epoch_start, step_losses,
                                   active, writers, last_save):
          last_save, self.latest_epoch = time.time(), epoch
        # Each whole epoch's wall time, the first without its compilation.
        if not (epoch == self.start_epoch + 1 and self.resume_step):
          self.epoch_seconds.append(time.time() - epoch_start - (
              0.0 if compiled_before else self.compile_seconds))
        self._check_budget(epoch, epoch_start)
      if self.stop.requested:  # While the last epoch was scored and saved.
        self._stop(state, epoch + 1, 0, None)
    for ck in self.checkpoints:
      ck.wait()
    return self._score_test(state, writers)

  def _stop(self, state, epoch, done, step_losses):
    """Saves where a run stopped by a signal is (`done` steps into `epoch`),
    unless its checkpoints hold it already, and raises
    `interrupt.Interrupted` saying what is kept."""
    steps = int(self.data.steps.max())
    again = ('run the same command to score its test fold'
             if epoch > self.num_epochs else 'run the same command to resume')
    if epoch == self.start_epoch + 1 and done == self.resume_step:
      # Nothing trained since the run started.
      if done:
        message = (f'interrupted in epoch {epoch} at step {done}/{steps}, '
                   f'where it resumed: it is kept; {again}')
      elif self.start_epoch:
        message = (f'interrupted before epoch {epoch}: epoch '
                   f'{self.start_epoch} is kept; {again}')
      else:
        message = ('interrupted before the first step: nothing to save; run '
                   'the same command to start')
      raise self.stop.error(message)
    for m, ck in enumerate(self.checkpoints):
      member = self._member_state(state, m)
      if done == 0 and self.latest_epoch < epoch - 1 and not self.diverged[m]:
        ck.save(epoch - 1, member, {'epoch': epoch - 1, 'best': self.best[m]},
                is_best=False)
      elif done:
        ck.save_interrupted((epoch - 1) * steps + done, member, {
            'epoch': epoch - 1, 'step': done, 'best': self.best[m],
            'losses': step_losses[:, m].tolist()})
      ck.wait()
    raise self.stop.error(
        f'interrupted in epoch {epoch} at step {done}/{steps}: saved; {again}'
        if done else f'interrupted after epoch {epoch - 1}: saved; {again}')

  def _announce(self) -> None:
    """Logs what is trained, and from where."""
    config = self.config
    log.info(self._describe())
    log.info(f'{models.count_params(self.init_states[0].params):,} parameters '
         'per member')
    if self.resume_step:
      log.info(f'resuming in epoch {self.start_epoch + 1} at step '
               f'{self.resume_step}/{int(self.data.steps.max())}')
    elif self.start_epoch:
      log.info(f'resuming after epoch {self.start_epoch}')
    else:
      log.info('starting: nothing to resume')
    if (config.model in GPU_MODELS and jax.default_backend() == 'cpu' and
        self.start_epoch < self.num_epochs):
      log.info(
          f'{config.model} on a CPU is GPU work: it compiles in under a minute, '
          'then about a day for 250 epochs (see the README)')

  def _check_divergence(self, epoch, step_losses, active) -> None:
    """Freezes the members whose loss went non-finite in `epoch`.

    Raises:
      FloatingPointError: when every member has diverged.
    """
    data = self.data
    bad = ~np.isfinite(step_losses) & active
    news = []
    for m in np.flatnonzero(bad.any(axis=0)):
      self.diverged[m] = epoch
      step = int(np.argmax(bad[:, m])) + 1
      news.append(f'loss is {step_losses[step - 1, m]} at step '
                  f'{(epoch - 1) * data.steps[m] + step} (epoch {epoch})')
      log.info(f'{self.workdirs[m]}: {news[-1]}; frozen, scored with epoch '
           f'{self.best[m]["epoch"]} (selected on validation before)')
    if (self.diverged > 0).all():
      raise FloatingPointError(
          f'{news[-1]}: the training loss diverged; stopped without '
          f'saving, the last good checkpoints are in '
          f'{", ".join(ck.directory for ck in self.checkpoints)}')
    for m in np.flatnonzero(self.diverged == epoch):
      data_lib.save_json(
          os.path.join(self.workdirs[m], workdir_lib.DIVERGED_FILE),
          {'epoch': epoch})

  def _validate_and_save(self, state, val, epoch, epoch_start, step_losses,
                         active, writers, last_save) -> bool:
    """Scores the live members on validation (`val`, their predictions),
    logs the epoch and saves their checkpoints; returns whether the resume
    checkpoints were saved too."""
    config, data = self.config, self.data
    val_errors = [self._errors(val, m) for m in range(len(self.configs))]
    save_latest = (epoch == self.num_epochs or time.time() - last_save >=
                   config.checkpoint_every_seconds)
    for m, writer in enumerate(writers):
      if self.diverged[m]:
        continue
      errors = val_errors[m]
      is_best = errors['mae_mm'] < self.best[m]['val_mae_mm']
      if is_best:
        self.best[m] = {'val_mae_mm': errors['mae_mm'], 'epoch': epoch}
      mask = active[:, m]
      writer.write({
          'epoch': epoch, 'step': int(epoch * data.steps[m]),
          'train_loss': float(step_losses[mask, m].mean()),
          'epoch_seconds': round(time.time() - epoch_start, 2),
          **{f'val_{k}': v for k, v in errors.items()}})
      self.checkpoints[m].save(
          epoch, self._member_state(state, m),
          {'epoch': epoch, 'best': self.best[m]}, is_best=is_best,
          latest=save_latest)
      if len(self.configs) == 1:
        log.info(f'epoch {epoch}: val {metrics_lib.format_errors(errors)}'
             f'{" *" if is_best else ""} '
             f'({time.time() - epoch_start:.1f} s)')
    if len(self.configs) > 1:
      log.info(
          f'epoch {epoch}/{self.num_epochs} ({time.time() - epoch_start:.1f}'
          ' s): val MAE mm ' +
          ', '.join(f'{errors["mae_mm"]:.2f}' for errors in val_errors))
    return save_latest

  def _check_budget(self, epoch, epoch_start) -> None:
    """Fits the epochs to `time_budget_s` after the first, and stops early
    when the next epoch would pass it."""
    config = self.config
    # Timed on the first whole epoch of this call, without its compiling
    # (and 'auto' probing), which is not repeated.
    first = self.start_epoch + 1 + bool(self.resume_step)
    if epoch == first and config.time_budget_s:
      self._fit_budget(time.time() - epoch_start - (
          self.compile_seconds if self.compiled_epoch == epoch else 0.0))
    elif (config.time_budget_s and epoch < self.num_epochs and
          time.time() - self.started + 2 * (time.time() - epoch_start) >
          config.time_budget_s):
      log.info(f'stopping after epoch {epoch}: the next would pass '
           f'time_budget_s={config.time_budget_s}')
      self.num_epochs = epoch

  def _fit_budget(self, epoch_seconds):
    left = self.config.time_budget_s - (time.time() - self.started)
    fit = int(1 + max(0, (left - 2 * epoch_seconds) // epoch_seconds))
    if fit < self.num_epochs:
      log.info(
          f'time_budget_s={self.config.time_budget_s}: {epoch_seconds:.1f} s '
          f'per epoch, {fit} of {self.num_epochs} epochs fit')
      self.num_epochs = fit

  def _score_test(self, state, writers):
    """Scores each member's test fold with its selected checkpoint."""
    # A member that diverged before its first validation has no selected
    # epoch: it is reported with no test figures.
    # With score_test=False (settings chosen on validation) the test fold
    # is never looked at.
    scored = [self.best[m]['epoch'] > 0 and self.config.score_test
              for m in range(len(self.configs))]
    best_states = [ck.restore_best(self.init_states[m], self.best[m]['epoch'])
                   if self.best[m]['epoch'] > 0 else self.init_states[m]
                   for m, ck in enumerate(self.checkpoints)]
    state = jax.device_put(jax.tree.map(lambda *x: jnp.stack(x), *best_states),
                           self.replicated)
    test = self._predict(state, 'test') if any(scored) else None
    quality = self._val_quality(best_states)
    arrays, results = self.data.arrays, []
    for m, (config, workdir) in enumerate(zip(self.configs, self.workdirs)):
      index, mask, hc_px_pred = test or (None, None, None)
      keep = index[m][mask[m]] if scored[m] else None
      if not scored[m]:
        if config.score_test:
          log.info(
              f'{workdir}: diverged in epoch {self.diverged[m]} before any '
              'validation; no test figures')
        plain, errors = None, {}
      else:
        plain = self._errors(test, m)
        errors = {f'test_{k}': v for k, v in plain.items()}
        metrics_lib.write_predictions(
            os.path.join(workdir, workdir_lib.PREDICTIONS_FILE),
            metrics_lib.prediction_rows(
                arrays['filename'][keep], arrays['subject_id'][keep],
                arrays['pixel_size_mm'][keep], arrays['hc_px'][keep],
                hc_px_pred[m][mask[m]]))
      result = self._result(m, errors)
      if quality[m] is not None:
        result['quality'] = quality[m]
      data_lib.save_json(os.path.join(workdir, workdir_lib.RESULTS_FILE),
                         result)
      if errors and not self.rescore_only:
        writers[m].write({'epoch': self.num_epochs,
                          'step': int(self.num_epochs * self.data.steps[m]),
                          **errors})
      writers[m].close()
      if errors:
        log.info(f'{workdir}: test fold {config.fold} (epoch '
             f'{self.best[m]["epoch"]} selected on validation): '
             f'{metrics_lib.format_errors(plain)}')
      results.append(result)
    return results

  def _val_quality(self, best_states) -> list[dict | None]:
    """Each member's quality signal on its validation part with its selected
    checkpoint, and the threshold chosen there (`kinds.quality_record`);
    None for a member with no selected epoch, or a kind with no signal."""
    kind = models.kind_of(self.config)
    if kind.quality is None:
      return [None] * len(self.configs)
    images = self.data.arrays['images']
    forward = jax.jit(kind.forward(step_lib.create_model(self.config),
                                   *images.shape[1:3]))
    size = self.config.eval_batch_size
    index, mask = self.data.eval_index('val', size)
    records = []
    for m, state in enumerate(best_states):
      keep = index[m][mask[m]]
      if self.best[m]['epoch'] <= 0 or not keep.size:
        records.append(None)
        continue
      variables = {'params': state.params, 'batch_stats': state.batch_stats}
      values = [jax.device_get(forward(variables, normalise.zscore_batch(
          jnp.asarray(images[keep[c:c + size]]))))['quality']
                for c in range(0, keep.size, size)]
      records.append(kinds.quality_record(kind.quality,
                                          np.concatenate(values)))
    return records

  def _train_seconds(self, m) -> float:
    """This call's wall time, or, when it trained nothing (a rescore of a
    finished run), the training's time that results.json recorded."""
    path = os.path.join(self.workdirs[m], workdir_lib.RESULTS_FILE)
    if self.start_epoch >= self.num_epochs and os.path.isfile(path):
      previous = workdir_lib.read_json(path).get('train_seconds')
      if previous is not None:
        return previous
    return round(time.time() - self.started, 1)

  def _result(self, m, errors) -> dict:
    """Member `m`'s results.json, with its test `errors` ({} for none)."""
    config, arrays = self.configs[m], self.data.arrays
    train_index = self.data.split[m]['train']
    return {
        'model': config.model, 'loss': config.loss, 'fold': config.fold,
        'seed': config.seed, 'selected_epoch': self.best[m]['epoch'],
        'normaliser_px': float(self.data.normaliser_px[m]),
        'val_mae_mm': self.best[m]['val_mae_mm'],
        'num_epochs': self.num_epochs,
        'planned_epochs': config.num_epochs,
        'diverged_epoch': int(self.diverged[m]) or None,
        'source_digest': self.data.info.get('source_digest'),
        'num_members': len(self.configs),
        'members_per_call': self.how if len(self.configs) > 1 else None,
        'train_seconds': self._train_seconds(m),
        **{f'train_hc_{unit}_{stat}': float(fn(arrays[f'hc_{unit}'][
            train_index])) for unit in ('mm', 'px')
           for stat, fn in (('min', np.min), ('max', np.max))},
        **errors}
