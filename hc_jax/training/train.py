"""Training and evaluation: one trainer for one model or several at once.

`train_and_evaluate(config, workdir)` trains one fold of one config.
`train_members(configs, workdirs)` trains M members at once (configs that
differ only in `MEMBER_FIELDS`: test fold, loss, seed) with ONE jitted step
over a leading member axis: the member states are stacked, and the step maps
the members either in one `jax.vmap` or one after another with `jax.lax.map`
inside the same compiled step (`members_per_call`; 'auto' times both on the
first steps). With one member the step is the plain one. A member's results
do not depend on which members train beside it.

The step is pure: gather-free (batches of uint8 images come from
`hc_jax.data`), it augments on the accelerator (`hc_jax.data.augment`, which moves
the HC label and the reference ellipse with the image) and applies the
optimiser. It is data parallel over a 1-D device mesh: each member's batch is
split over the 'data' axis and the states are replicated, so the same code
runs on one CPU, one GPU, a TPU slice or several hosts.

Per member, each epoch ends with an evaluation on its validation part (carved
from the training folds); the epoch with the lowest validation MAE (mm) is
kept as the best checkpoint, and only that one is scored on the test fold. A
member whose loss turns NaN or infinite is frozen from then on and scored with
the epoch selected before; only when every member has diverged does the run
stop with `FloatingPointError`. Each member's workdir holds config.json,
folds.json, metrics.jsonl, TensorBoard events, checkpoints/latest and
checkpoints/best, predictions_test.csv and results.json; a run started again
with the same command resumes from its last checkpoint with the same batches
and ends the same.
"""

import contextlib
import functools
import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from hc_jax import log
from hc_jax import losses
from hc_jax import models
from hc_jax import workdir as workdir_lib
from hc_jax.data import augment as augment_lib
from hc_jax.data import prepare
from hc_jax.nets import mask_head
from hc_jax.training import lock as lock_lib

# Config fields in which the members of one run may differ.
MEMBER_FIELDS = ('fold', 'loss', 'huber_delta', 'seed')
# Config fields that may change when a run is resumed or extended in its
# workdir: they say how long to train, how often to checkpoint, whether to
# score again, where the data is and how the process runs, never what is
# trained (the batches, the model, the optimiser and the targets stay). Every
# other field must be as config.json records it. With lr_schedule='cosine'
# the learning rate is laid over num_epochs, so num_epochs must stay too.
RESUME_MAY_CHANGE = (
    'num_epochs', 'time_budget_s', 'rescore', 'score_test',
    'checkpoint_every_seconds', 'eval_batch_size',
    'members_per_call', 'tune_malloc', 'distributed', 'data.hc18_dir',
    'data.cache_dir', 'data.prepared', 'data.pipeline')
# What config.json records beside the config: the data a run trained on
# (checked on resume against the data found now) and the layers it used.
RECORDED_FIELDS = ('source_digest', 'content_digest', 'layers_resolved')
# Fields that configs no longer have, and why: a config that sets one runs
# with a one-line warning; a run's config.json that has one resumes.
REMOVED_FIELDS = {'log_every_steps': 'progress is logged every 30 s'}
MEMBERS_PER_CALL = ('auto', 'vmap', 'map')
# Fields added to configs/default.py after runs were written without them:
# a run whose config.json lacks one ran with this value.
ADDED_FIELDS = {'mask_loss.shape': 0.0, 'data.folder': '', 'data.labels': ''}


class _Rule:
  """What one config field must be: `test(value)` and its description
  (`what`: a string, or a function giving it when asked)."""

  def __init__(self, test, what):
    self.test, self._what = test, what

  @property
  def what(self) -> str:
    return self._what() if callable(self._what) else self._what


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(low: int, high: int | None = None, what: str = '') -> _Rule:
  what = what or (f'an integer >= {low}' if high is None else
                  f'an integer in [{low}, {high}]')
  return _Rule(lambda v: _is_int(v) and v >= low and (
      high is None or v <= high), what)


def _real(low: float = 0.0, *, above: bool = False,
          below: float | None = None, infinite: bool = False) -> _Rule:
  """A number >= low (> low when `above`), < `below` if given; finite
  unless `infinite` (NaN never)."""
  what = f'a {"" if infinite else "finite "}number {">" if above else ">="} '
  what += f'{low:g}' + (f' and < {below:g}' if below is not None else '')

  def test(v):
    return (_is_real(v) and not math.isnan(v) and
            (infinite or math.isfinite(v)) and
            (v > low if above else v >= low) and (below is None or v < below))

  return _Rule(test, what)


def _choice(options, note: str = '') -> _Rule:
  """One of `options` (a collection, or a function returning one), read
  when a value is checked, never copied: a registry such as `losses.LOSSES`
  may grow after this module is imported."""
  current = options if callable(options) else lambda: options
  return _Rule(lambda v: isinstance(v, str) and v in current(),
               lambda: f'one of {", ".join(sorted(current()))}{note}')


_FLAG = _Rule(lambda v: isinstance(v, bool), 'True or False')
_TEXT = _Rule(lambda v: isinstance(v, str), 'a string')
_WIDTHS = _Rule(lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and
                all(_is_int(w) and w >= 1 for w in v),
                'a non-empty tuple of integers >= 1')
# Every field a config may have, by its dotted name ('mask_loss.*': each of
# its terms), and what it must be. `check_config` tests each field present
# before any work is done; tests/test_reliability.py checks that every field
# of every config in configs/ has a rule here.
CONFIG_RULES = {
    'model': _choice(models.MODELS),
    'dtype': _choice(('float32', 'bfloat16')),
    'layers': _choice(('auto', 'plain', 'fast')),
    'loss': _choice(lambda: losses.LOSSES, ' (or a loss added with '
                    'hc_jax.losses.register; --losses_module=FILE imports '
                    'one)'),
    'huber_delta': _real(above=True),
    'ellipse_weight': _real(),
    'mask_loss.*': _real(),
    'init_from': _TEXT,
    'data.source': _choice(('hc18', 'synthetic', 'folder')),
    'data.folder': _TEXT,
    'data.labels': _TEXT,
    'data.hc18_dir': _TEXT,
    'data.num_synthetic': _integer(1),
    'data.prepared': _TEXT,
    'data.cache_dir': _TEXT,
    'data.pipeline': _choice(('auto', 'tf', 'numpy')),
    'image_size': _integer(1),
    'image_width': _integer(0),
    'resize_mode': _choice(prepare.RESIZE_MODES),
    'hc_normaliser_px': _real(),
    'num_folds': _integer(2),
    'fold': _integer(0),
    'fold_seed': _integer(0, 2 ** 63 - 1, 'an integer in [0, 2**63)'),
    'val_fraction': _real(below=1.0),
    'augment.flip': _FLAG,
    'augment.max_translate_px': _real(),
    'augment.max_rotate_deg': _real(),
    'augment.scale_range': _Rule(
        lambda v: v is None or (isinstance(v, (tuple, list)) and len(v) == 2
                                and all(_is_real(x) for x in v)),
        'None or (min, max)'),
    'augment.exact_labels': _FLAG,
    'batch_size': _integer(1),
    'eval_batch_size': _integer(1),
    'num_epochs': _integer(1),
    'learning_rate': _real(above=True),
    'lr_schedule': _choice(('constant', 'cosine')),
    'warmup_epochs': _integer(0),
    'weight_decay': _real(),
    'tune_malloc': _FLAG,
    'members_per_call': _choice(MEMBERS_PER_CALL),
    'time_budget_s': _real(),
    'rescore': _FLAG,
    'score_test': _FLAG,
    'seed': _integer(0, 2 ** 63 - 1, 'an integer in [0, 2**63)'),
    'checkpoint_every_seconds': _real(infinite=True),
    'distributed': _FLAG,
    # Fields of the models (hc_jax.nets.hcnet, hc_jax.nets.hcnet_mask), by
    # name.
    'model_options.widths': _WIDTHS,
    'model_options.head': _choice(('flatten', 'gap')),
    'model_options.hidden': _integer(1),
    'model_options.dropout': _real(below=1.0),
    'model_options.dilated': _FLAG,
    'model_options.bounded': _FLAG,
    'model_options.stride': _integer(1),
    'model_options.margin': _integer(0),
    'model_options.attention': _FLAG,
    'model_options.attention_heads': _integer(1),
    'model_options.moments': _choice(mask_head.MOMENT_MODES),
    'model_options.window_radius': _real(above=True),
    'model_options.keras_v1': _FLAG,
}


def config_rule(key: str) -> _Rule | None:
  """The rule of a dotted config field (None: a field hc_jax does not
  know)."""
  if key in CONFIG_RULES:
    return CONFIG_RULES[key]
  group = key.rpartition('.')[0]
  return CONFIG_RULES.get(f'{group}.*') if group else None


def check_config(config) -> None:
  """Raises ValueError with one clear line for a config that cannot run.

  Every field is checked against `CONFIG_RULES` (its type and range), then
  what spans fields (the fold against num_folds, the model built for the
  input size, the batch against the devices); nothing is prepared or
  compiled before.
  """
  for key, value in workdir_lib.flatten(config.to_dict()).items():
    if key in REMOVED_FIELDS:
      log.warn(f'{key} is no longer used ({REMOVED_FIELDS[key]}); remove it '
               'from the config')
    rule = config_rule(key)
    if rule is not None and not rule.test(value):
      raise ValueError(f'{key} must be {rule.what}, got {value!r}')
  if not config.fold < config.num_folds:
    raise ValueError(f'fold must be in [0, {config.num_folds - 1}], got '
                     f'{config.fold}')
  weights = dict(config.get('mask_loss', {}) or {})
  unknown = sorted(set(weights) - set(mask_head.LOSS_TERMS))
  if unknown:
    raise ValueError(f'mask_loss has no terms {unknown}; it has '
                     f'{", ".join(mask_head.LOSS_TERMS)}')
  augment_lib.AugmentConfig.from_dict(config.augment)  # Raises if bad.
  losses.get_loss(config)
  model = models.from_config(config)  # Unknown fields, a dtype it cannot do.
  _check_model_input(config, model)
  num_devices = jax.device_count()
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % num_devices:
      raise ValueError(f'{name}={config[name]} is not divisible by the '
                       f'{num_devices} devices')


def _check_model_input(config, model) -> None:
  """Raises ValueError when `model` cannot be built for the config's input
  (traced abstractly: no compiling, no memory for the parameters)."""
  height, width = prepare.input_shape(config)
  smallest = models.smallest_input(model)
  if min(height, width) < smallest:
    raise ValueError(
        f'{config.model} cannot take a {height}x{width} input (image_size='
        f'{config.image_size}, image_width={config.get("image_width", 0)}): '
        f'it needs at least {smallest}x{smallest} px')
  try:
    jax.eval_shape(functools.partial(model.init, train=False),
                   jax.random.key(0),
                   jax.ShapeDtypeStruct((1, height, width, 1), jnp.float32))
  except Exception as e:  # pylint: disable=broad-except  # Any model error.
    reason = ' '.join(str(e).split()) or type(e).__name__
    raise ValueError(
        f'{config.model} cannot take a {height}x{width} input (image_size='
        f'{config.image_size}, image_width={config.get("image_width", 0)}): '
        f'{reason}') from None


def check_members(configs: Sequence[Any]) -> None:
  """Checks each config, and that they differ only in `MEMBER_FIELDS`."""
  flat = [workdir_lib.flatten(c.to_dict()) for c in configs]
  for config, fields in zip(configs, flat):
    check_config(config)
    differ = sorted(k for k in set(fields) | set(flat[0])
                    if k not in MEMBER_FIELDS and
                    not _same(fields.get(k), flat[0].get(k)))
    if differ:
      raise ValueError('members of one run may differ only in '
                       f'{", ".join(MEMBER_FIELDS)}; these differ: '
                       f'{", ".join(differ)}')
  keys = [(c.fold, c.loss, c.huber_delta, c.seed) for c in configs]
  if len(set(keys)) != len(keys):
    raise ValueError(f'two members are the same run: {keys}')


def _same(a, b) -> bool:
  """Equality through JSON: tuples equal lists, NaN equals NaN."""
  return (json.dumps(a, sort_keys=True, default=repr) ==
          json.dumps(b, sort_keys=True, default=repr))


def check_resume(config, workdir: str) -> None:
  """Raises ValueError unless `config` may resume (or extend) the run that
  `workdir` holds: only the fields of `RESUME_MAY_CHANGE` may differ from
  its config.json (a field it lacks counts as its `ADDED_FIELDS` value; the
  `REMOVED_FIELDS` are not compared). A workdir without config.json holds no
  run yet."""
  saved = workdir_lib.read_run_config(workdir)
  if saved is None:
    return
  may_change = set(RESUME_MAY_CHANGE)
  if config.get('lr_schedule') == 'cosine':
    may_change.discard('num_epochs')
  saved = workdir_lib.flatten({k: v for k, v in saved.items()
                    if k not in RECORDED_FIELDS})
  saved = {**ADDED_FIELDS, **saved}
  wanted = workdir_lib.flatten(json.loads(json.dumps(config.to_dict())))
  for key in REMOVED_FIELDS:
    saved.pop(key, None)
    wanted.pop(key, None)

  def show(flat, key):
    return repr(flat[key]) if key in flat else '(none)'

  differ = [f'{key}={show(saved, key)} there, {show(wanted, key)} now'
            for key in sorted(set(saved) | set(wanted))
            if key not in may_change and
            (key not in saved or key not in wanted or
             not _same(saved[key], wanted[key]))]
  if differ:
    cosine = ('; with lr_schedule=cosine num_epochs is part of the schedule'
              if any(d.startswith('num_epochs=') for d in differ) else '')
    raise ValueError(
        f'{workdir} was run with another config ({"; ".join(differ)}); a '
        f'resumed run may change only {", ".join(sorted(may_change))}'
        f'{cosine}; use another workdir')


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains one fold, selects on validation, scores the test fold.

  Args:
    config: a config from `configs/` (an ml_collections.ConfigDict).
    workdir: where the run leaves its files; an unfinished run there is
      resumed, a finished one is left as it is (unless `config.rescore`).

  Returns:
    The results (the contents of results.json).

  Raises:
    ValueError: for a bad config or data (and `lock.LockedError` when
      another process holds the workdir, `manifest.CheckpointError` when no
      checkpoint can be restored).
    FloatingPointError: on a NaN or inf loss (the last good checkpoint stays).
  """
  return train_members([config], [workdir])[0]


def _missing(workdir: str) -> list[str]:
  """The folders that creating `workdir` would create, deepest first."""
  missing, folder = [], os.path.abspath(workdir)
  while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
    missing.append(folder)
    folder = os.path.dirname(folder)
  return missing


def _finished_results(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, workdir_lib.RESULTS_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def train_members(configs: Sequence[Any], workdirs: Sequence[str]
                  ) -> list[dict[str, Any]]:
  """Trains several members at once; see the module docstring.

  Everything that can refuse the command (the configs, the config each
  workdir was run with, the data, the checkpoints to resume from) is checked
  before anything in the workdirs is written, so a refused command leaves
  them as they were.

  Returns:
    One results dict per member, in order.

  Raises:
    ValueError: a bad config, or a workdir run with another config (see
      `check_resume`) or on other data.
  """
  check_members(configs)
  if len(set(map(os.path.abspath, workdirs))) != len(workdirs):
    raise ValueError(f'members need distinct workdirs: {list(workdirs)}')
  for config, workdir in zip(configs, workdirs):  # Before anything is written.
    check_resume(config, workdir)
  results = [None] * len(configs)
  todo = []
  for m, (config, workdir) in enumerate(zip(configs, workdirs)):
    finished = _finished_results(workdir)
    # The same command again changes nothing; more epochs extend the run.
    if (finished and not config.get('rescore', False) and
        finished.get('planned_epochs') == config.num_epochs):
      log.info(
          f'already finished: {os.path.join(workdir, workdir_lib.RESULTS_FILE)} '
          '(--config.rescore=True scores its test fold again)')
      results[m] = finished
    else:
      todo.append(m)
  if todo:
    created = sorted({folder for m in todo for folder in _missing(workdirs[m])},
                     key=len, reverse=True)  # Deepest first.
    try:
      with contextlib.ExitStack() as stack:
        for m in todo:  # One lock per workdir, held by the first host.
          if jax.process_index() == 0:
            stack.enter_context(lock_lib.WorkdirLock(workdirs[m]))
        from hc_jax.training import trainer  # pylint: disable=import-outside-toplevel
        trained = trainer.Trainer([configs[m] for m in todo],
                                  [workdirs[m] for m in todo]).run()
    except BaseException:
      for folder in created:  # A run that fails at the start leaves nothing,
        if os.path.isdir(folder) and not os.listdir(folder):  # no parent.
          os.rmdir(folder)
      raise
    for m, result in zip(todo, trained):
      results[m] = result
  return results
