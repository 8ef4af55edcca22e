"""What a training config must be, and what a resumed run may change.

The fields a config may have, and their types, are those of
`configs/default.py`'s `get_config()`; the fields of `model_options` are
those of the model's class (`models.MODELS`, its dataclass fields) and the
terms of `mask_loss` those of `hc_jax.nets.mask_head.LOSS_TERMS`. A field's
type gives its rule (a flag, a string, an integer or a finite number >= 0:
every number of a config counts, sizes or weighs something); `RULES` adds by
hand what a type does not say (allowed values, other ranges).

`check_config` refuses a config that cannot run, `check_members` the members
of one run that differ in more than `MEMBER_FIELDS`, and `check_resume` a
config that differs from the one a workdir's run was started with in more
than `RESUME_MAY_CHANGE`. `hc_jax.main` (through `train.train_members`) and
`hc_jax.grid` ask these same functions, so both accept and refuse the same
configs with the same one-line messages.
"""

import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import os
import typing
from collections import abc
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from hc_jax import log
from hc_jax import losses
from hc_jax import models
from hc_jax import workdir as workdir_lib
from hc_jax.data import augment as augment_lib
from hc_jax.data import cache as cache_lib
from hc_jax.nets import hcnet
from hc_jax.nets import layers as layers_lib
from hc_jax.nets import mask_head
from hc_jax.nets import paper

# The default config, the source of every field's name and type.
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))), 'configs', 'default.py')
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
# Fields added to configs/default.py after runs were written without them:
# a run whose config.json lacks one ran with this value.
ADDED_FIELDS = {'mask_loss.shape': 0.0, 'mask_loss.rays': 0.0,
                'data.folder': '', 'data.labels': ''}
MEMBERS_PER_CALL = ('auto', 'vmap', 'map')
# Model class fields that are not `model_options`: the config's own `dtype`
# and `layers` set them, Flax sets the others.
_NOT_OPTIONS = ('parent', 'name', 'layers', 'dtype')


class Rule:
  """What one config field must be: `test(value)` and its description
  (`what`: a string, or a function giving it when asked)."""

  def __init__(self, test: Callable[[Any], bool],
               what: str | Callable[[], str]):
    self.test, self._what = test, what

  @property
  def what(self) -> str:
    return self._what() if callable(self._what) else self._what


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(low: int, high: int | None = None, what: str = '') -> Rule:
  what = what or (f'an integer >= {low}' if high is None else
                  f'an integer in [{low}, {high}]')
  return Rule(lambda v: _is_int(v) and v >= low and (
      high is None or v <= high), what)


def _real(low: float = 0.0, *, above: bool = False,
          below: float | None = None, infinite: bool = False) -> Rule:
  """A number >= low (> low when `above`), < `below` if given; finite
  unless `infinite` (NaN never)."""
  what = f'a {"" if infinite else "finite "}number {">" if above else ">="} '
  what += f'{low:g}' + (f' and < {below:g}' if below is not None else '')

  def test(v):
    return (_is_real(v) and not math.isnan(v) and
            (infinite or math.isfinite(v)) and
            (v > low if above else v >= low) and (below is None or v < below))

  return Rule(test, what)


def _choice(options, note: str = '') -> Rule:
  """One of `options` (a collection, or a function returning one), read
  when a value is checked, never copied: a registry such as `losses.LOSSES`
  may grow after this module is imported."""
  current = options if callable(options) else lambda: options
  return Rule(lambda v: isinstance(v, str) and v in current(),
              lambda: f'one of {", ".join(sorted(current()))}{note}')


_FLAG = Rule(lambda v: isinstance(v, bool), 'True or False')
_TEXT = Rule(lambda v: isinstance(v, str), 'a string')
_ANY = Rule(lambda v: True, 'anything')
_SIZES = Rule(lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and
              all(_is_int(w) and w >= 1 for w in v),
              'a non-empty tuple of integers >= 1')
_SEED = _integer(0, 2 ** 63 - 1, 'an integer in [0, 2**63)')
# What a field's type does not say, by dotted name ('model_options.*' for an
# option of any model that has it). Every other field is checked by its type.
RULES = {
    'model': _choice(models.MODELS),
    'dtype': _choice(paper.DTYPES),
    'layers': _choice(('auto',) + layers_lib.LAYER_SETS),
    'loss': _choice(lambda: losses.LOSSES, ' (or a loss added with '
                    'hc_jax.losses.register; --losses_module=FILE imports '
                    'one)'),
    'huber_delta': _real(above=True),
    'data.source': _choice(('hc18', 'synthetic', 'folder')),
    'data.num_synthetic': _integer(1),
    'data.pipeline': _choice(('auto', 'tf', 'numpy')),
    'image_size': _integer(1),
    'resize_mode': _choice(cache_lib.RESIZE_MODES),
    'num_folds': _integer(2),
    'fold_seed': _SEED,
    'val_fraction': _real(below=1.0),
    'augment.scale_range': Rule(
        lambda v: v is None or (isinstance(v, (tuple, list)) and len(v) == 2
                                and all(_is_real(x) for x in v)),
        'None or (min, max)'),
    'batch_size': _integer(1),
    'eval_batch_size': _integer(1),
    'num_epochs': _integer(1),
    'learning_rate': _real(above=True),
    'lr_schedule': _choice(('constant', 'cosine')),
    'members_per_call': _choice(MEMBERS_PER_CALL),
    'seed': _SEED,
    'checkpoint_every_seconds': _real(infinite=True),
    'model_options.head': _choice(hcnet.HEADS),
    'model_options.hidden': _integer(1),
    'model_options.dropout': _real(below=1.0),
    'model_options.stride': _integer(1),
    'model_options.attention_heads': _integer(1),
    'model_options.moments': _choice(mask_head.MOMENT_MODES),
    'model_options.window_radius': _real(above=True),
}


def _type_rule(kind) -> Rule:
  """The rule of a field of type `kind` (a class, or an annotation such as
  `Sequence[int]`)."""
  if kind is bool:
    return _FLAG
  if kind is int:
    return _integer(0)
  if kind is float:
    return _real()
  if kind is str:
    return _TEXT
  if kind is tuple or typing.get_origin(kind) in (tuple, abc.Sequence):
    return _SIZES
  return _ANY


@functools.cache
def default_fields() -> dict[str, type]:
  """{dotted name: type} of every field of `configs/default.py`."""
  spec = importlib.util.spec_from_file_location('_hc_jax_default_config',
                                                DEFAULT_CONFIG)
  if spec is None or not os.path.isfile(DEFAULT_CONFIG):
    raise ValueError(f'{DEFAULT_CONFIG} not found: hc_jax reads the fields '
                     'of its configs there (install it from a checkout with '
                     'pip install -e .)')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  fields = {}
  for key in workdir_lib.flatten(config.to_dict()):
    *groups, name = key.split('.')
    node = config
    for group in groups:
      node = node[group]
    fields[key] = node.get_type(name)
  return fields


def model_options(model: str | None = None) -> dict[str, Any]:
  """{name: type} of the options of a `models.MODELS` class (of every model
  when None), read from its dataclass fields."""
  classes = [models.MODELS[model]] if model in models.MODELS else (
      models.MODELS.values())
  return {field.name: field.type for cls in classes
          for field in dataclasses.fields(cls)
          if field.name not in _NOT_OPTIONS}


def field_rule(key: str, model: str | None = None) -> Rule | None:
  """The rule of a dotted config field (None: a field hc_jax does not know).

  Args:
    key: e.g. 'num_epochs', 'data.pipeline', 'model_options.widths'.
    model: the config's model, whose options `model_options.*` are (None:
      an option of any model).
  """
  group, _, name = key.rpartition('.')
  if group == 'model_options':
    options = model_options(model)
    if name not in options:
      return None
    return RULES.get(key) or _type_rule(options[name])
  if group == 'mask_loss':
    return _real() if name in mask_head.LOSS_TERMS else None
  fields = default_fields()
  if key not in fields:
    return None
  return RULES.get(key) or _type_rule(fields[key])


def _unknown(key: str, config) -> str:
  """The one line for a field hc_jax does not know, naming the nearest known
  one."""
  group, _, name = key.rpartition('.')
  if group == 'mask_loss':
    return (f'mask_loss has no terms [{name!r}]; it has '
            f'{", ".join(mask_head.LOSS_TERMS)}')
  if group == 'model_options':
    known = sorted(model_options(config.get('model')))
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.0)
    return (f"model {config.get('model')!r} has no option '{name}' — did you "
            f"mean 'model_options.{near[0]}'? (its options: "
            f'{", ".join(known)})')
  near = difflib.get_close_matches(key, list(default_fields()), n=1,
                                   cutoff=0.0)
  return f"no config field '{key}' — did you mean '{near[0]}'?"


def check_config(config) -> None:
  """Raises ValueError with one clear line for a config that cannot run.

  Every field is checked: an unknown one is named with the nearest known
  field, a known one against its rule (`field_rule`); then what spans
  fields (the fold against num_folds, the model built for the input size,
  the batch against the devices). Nothing is prepared or compiled before.
  """
  for key, value in workdir_lib.flatten(config.to_dict()).items():
    if key in REMOVED_FIELDS:
      log.warn(f'{key} is no longer used ({REMOVED_FIELDS[key]}); remove it '
               'from the config')
      continue
    rule = field_rule(key, config.get('model'))
    if rule is None:
      raise ValueError(_unknown(key, config))
    if not rule.test(value):
      raise ValueError(f'{key} must be {rule.what}, got {value!r}')
  if not config.fold < config.num_folds:
    raise ValueError(f'fold must be in [0, {config.num_folds - 1}], got '
                     f'{config.fold}')
  augment_lib.AugmentConfig.from_dict(config.augment)  # Raises if bad.
  losses.get_loss(config)
  model = models.from_config(config)  # A dtype it cannot do.
  _check_model_input(config, model)
  if (config.get('mask_loss') or {}).get('rays', 0.0) and not getattr(
      model, 'refine_rays', 0):
    raise ValueError(f'mask_loss.rays={config.mask_loss.rays} needs a '
                     'boundary refinement: model_options.refine_rays > 0 '
                     '(configs/hcnet_mask_refine.py)')
  num_devices = jax.device_count()
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % num_devices:
      raise ValueError(f'{name}={config[name]} is not divisible by the '
                       f'{num_devices} devices')


def _check_model_input(config, model) -> None:
  """Raises ValueError when `model` cannot be built for the config's input
  (traced abstractly: no compiling, no memory for the parameters)."""
  height, width = cache_lib.input_shape(config)
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
  `workdir` holds.

  Only the fields of `RESUME_MAY_CHANGE` may differ from its config.json (a
  field it lacks counts as its `ADDED_FIELDS` value; the `REMOVED_FIELDS`
  and `RECORDED_FIELDS` are not compared). A workdir without config.json
  holds no run yet.
  """
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
