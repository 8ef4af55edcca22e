"""Fine-tuning: a run that starts from a shipped model's weights.

  python -m hc_jax.main --config=configs/hcnet_mask_label.py \
      --config.data.source=folder --config.data.folder=my_scans \
      --config.init_from=shipped:hcnet_mask:fold0 --config.num_epochs=10

`init_from` names a shipped model and one of its members
(`shipped:<name>:<member>`, e.g. `shipped:hcnet_mask:fold2`), or the whole
ensemble (`shipped:<name>`): its members' weights and BatchNorm statistics
averaged, which is meaningful because the fold members start from the same
initialisation. An archive file works the same way (`path/model.npz`,
`path/model.npz:fold2`). The config must build the same network (its
`model` and `model_options`); the input size, the data, the loss terms and
the schedule are the run's own. Only the weights are taken: the optimiser
starts afresh.
"""

from typing import Any

import jax
import numpy as np

from hc_jax import workdir as workdir_lib

PREFIX = 'shipped:'


def is_shipped(init_from: str) -> bool:
  """Whether `init_from` names a shipped model or an archive (not Keras
  weights)."""
  from hc_jax import archive  # pylint: disable=import-outside-toplevel
  return bool(init_from) and (init_from.startswith(PREFIX) or
                              archive.is_archive(init_from))


def _archive(init_from: str):
  """The archive `init_from` names, restricted to its member if it names
  one."""
  from hc_jax import archive  # pylint: disable=import-outside-toplevel
  if init_from.startswith(PREFIX):
    name, _, member = init_from[len(PREFIX):].partition(':')
    read = archive.Archive(archive.path_of(name))
  else:
    path, member = archive.split_member(init_from)
    read = archive.read(path)
  if member:
    read.only(member)
  return read


def _same_class(theirs: str, ours: str) -> bool:
  """Whether two model names build the same network (one's class derives
  from the other's, as hcnet_mask_label's from hcnet_mask's)."""
  from hc_jax import models  # pylint: disable=import-outside-toplevel
  a, b = models.MODELS.get(theirs), models.MODELS.get(ours)
  return a is not None and b is not None and (issubclass(a, b) or
                                               issubclass(b, a))


def _check_same_network(config, member_config: dict, where: str) -> None:
  theirs = {'model': member_config.get('model'),
            **{f'model_options.{k}': v for k, v in
               (member_config.get('model_options') or {}).items()}}
  options = config.get('model_options') or {}
  if hasattr(options, 'to_dict'):
    options = options.to_dict()
  ours = {'model': config.model,
          **{f'model_options.{k}': v for k, v in options.items()}}
  norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # pylint: disable=unnecessary-lambda-assignment
  if _same_class(theirs['model'], ours['model']):  # E.g. hcnet_mask_label.
    theirs['model'] = ours['model']
  differ = [f'{k}={theirs.get(k)!r} there, {ours.get(k)!r} here'
            for k in sorted(set(theirs) | set(ours))
            if norm(theirs.get(k)) != norm(ours.get(k))]
  if differ:
    raise ValueError(f'init_from={where} holds another network '
                     f'({"; ".join(differ)}); use its config')


def load_into(state: Any, config) -> Any:
  """`state` with the params and BatchNorm statistics `config.init_from`
  names (a member, or the members' mean).

  Raises:
    ValueError: an unknown model or member, another network, a damaged
      archive (one line each).
  """
  try:
    read = _archive(config.init_from)
  except workdir_lib.PredictError as e:
    raise ValueError(f'init_from={config.init_from}: {e}') from None
  for member_config in read.configs:
    _check_same_network(config, member_config, config.init_from)
  abstract = jax.eval_shape(lambda s: {'params': s.params,
                                       'batch_stats': s.batch_stats}, state)
  try:
    members = [read.variables(i, abstract) for i in range(len(read.members))]
  except workdir_lib.PredictError as e:
    raise ValueError(f'init_from={config.init_from}: {e}') from None
  mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs), 0).astype(xs[0].dtype),
                      *members)
  return state.replace(params=mean['params'],
                       batch_stats=mean.get('batch_stats', state.batch_stats))
