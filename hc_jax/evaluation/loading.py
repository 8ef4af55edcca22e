"""Loading a trained run, a fold ensemble or a shipped model as a `Predictor`.

  predictor = loading.load('runs/cv_grid')
  predictor = loading.load()  # The default shipped model.

`load` finds the runs (or reads the shipped archive) before the heavy
imports, builds the model of the runs' config with Flax's own layers
(`inference.LAYERS`) and its kind's forward function (`hc_jax.nets.kinds`),
checks that it gives its kind's output, restores only
the parameters and batch statistics of each run's best checkpoint
(`hc_jax.training.checkpoint.restore_variables`) and makes the TensorFlow
function preparing a scan as training prepares it. What the `Predictor`
does with them is `hc_jax.evaluation.inference`.
"""

import functools
import os
from typing import Any, NamedTuple, Sequence
import warnings

from hc_jax import log
from hc_jax import workdir as workdir_lib
from hc_jax.evaluation import inference
from hc_jax.training import checkpoint


def _hide_gpus_from_tf(tf):
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):  # Already initialised.
    pass


def load(workdir: str | None = None, model_options: dict | None = None,
         model: str | None = None) -> inference.Predictor:
  """Loads a finished run, a grid of runs as an ensemble, or a shipped model.

  Args:
    workdir: a run directory (config.json, results.json, checkpoints/best), a
      directory of such runs of the same model config (e.g. fold0..fold4), or
      a shipped-model archive (`hc_jax.shipped`, a .npz file); None: the
      shipped model `model`.
    model_options: model fields to set other than as trained, which change
      no parameter (e.g. a mask model's `moments`), or None.
    model: the name of a shipped model (`archive_lib.names()`); None with no
      `workdir`: `archive_lib.DEFAULT_MODEL`.

  Returns:
    A `Predictor`.

  Raises:
    PredictError: no run at `workdir`, an unfinished run, an ensemble of
      mismatched runs, an unreadable config, results or checkpoint file.
  """
  archive, runs = _runs_of(workdir, model)
  # pylint: disable=import-outside-toplevel
  import jax
  import tensorflow as tf
  from hc_jax.nets import kinds
  if archive:
    configs, results = archive.configs, archive.results
  else:
    configs = workdir_lib.read_configs(runs)
    results = [
        workdir_lib.read_json(os.path.join(run, workdir_lib.RESULTS_FILE))
        for run in runs
    ]
  normalisers_px = workdir_lib.normalisers_px(runs, results)
  train_hc_mm, train_hc_px = workdir_lib.training_ranges(results)
  config_path = archive.path if archive else os.path.join(
      runs[0], workdir_lib.CONFIG_FILE)
  built = _build_model(configs[0], model_options, config_path)
  variables = [archive.variables(i, built.abstract) if archive else
               checkpoint.restore_variables(run, built.abstract)
               for i, run in enumerate(runs)]
  _hide_gpus_from_tf(tf)
  return inference.Predictor(
      runs=runs, image_size=built.height, image_width=built.width,
      resize_mode=built.config.resize_mode, normalisers_px=normalisers_px,
      _variables=variables, _forward=jax.jit(built.forward),
      _prepare=_image_preparer(built.config, built.height, built.width),
      train_hc_mm=train_hc_mm, train_hc_px=train_hc_px, kind=built.kind,
      mask_grid=built.mask_grid,
      # The threshold chosen on the runs' validation parts, stored with them
      # (None: the kind's default).
      min_quality=kinds.stored_threshold(results, built.kind.quality),
      trained_on_phantoms=any(
          dict(c.get('data') or {}).get('source') == 'synthetic'
          for c in configs),
      name=_model_name(workdir, archive, configs[0]))


def _model_name(workdir: str | None, archive, config: dict) -> str:
  """What predict's CSV and overlays call the model: a shipped model's name
  (`hcnet_mask`), else the model of the run's config and the base name of
  the run, grid or archive file given (`hcnet_mask (cv_grid)`)."""
  if workdir is None:
    return archive.meta.get('name') or config.get('model', '')
  base = os.path.basename(os.path.abspath(workdir))
  return f'{config.get("model", "?")} ({base})'


def _runs_of(workdir: str | None, model: str | None):
  """(the shipped-model archive or None, the run directories) that `load`
  loads, found before the heavy imports: fail fast."""
  from hc_jax import archive as archive_lib
  if workdir is not None and model is not None:
    raise workdir_lib.PredictError(
        'give a workdir or a shipped model, not both')
  if workdir is None or archive_lib.is_archive(workdir):
    archive = archive_lib.read(model if workdir is None else workdir)
    return archive, archive.runs
  runs = workdir_lib.run_dirs(workdir)
  _warn_if_training(runs)
  return None, runs


class _Model(NamedTuple):
  """A model built from a run's config, checked to give its kind's output."""
  config: Any  # ml_collections.ConfigDict
  abstract: Any  # The variables' shapes (jax.eval_shape of init).
  forward: Any  # `kind.forward`'s function.
  kind: Any  # The model's `hc_jax.nets.kinds.Kind`.
  height: int
  width: int
  mask_grid: tuple[int, int] | None


def _build_model(config_dict: dict, model_options: dict | None,
                 config_path: str) -> _Model:
  """The model of a run's config (with `model_options` set).

  Raises:
    PredictError: naming `config_path`, for any config the model cannot be
      built from, or a model whose output is not what its kind declares.
  """
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import ml_collections
  from hc_jax import models
  from hc_jax.data import cache as cache_lib
  try:
    config = ml_collections.ConfigDict({**config_dict,
                                        'layers': inference.LAYERS})
    if model_options:
      config.model_options.update(model_options)
    height, width = cache_lib.input_shape(config)
    if min(height, width) < 1:
      raise ValueError(f'the model input is {width}x{height} px')
    if config.resize_mode not in cache_lib.RESIZE_MODES:
      raise ValueError(f'unknown resize_mode {config.resize_mode!r}')
    model = models.from_config(config)
    abstract = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0),
        jnp.zeros((1, height, width, 1), jnp.float32))
    kind = models.kind_of(config)
    forward = kind.forward(model, height, width)
    output = jax.eval_shape(
        forward, abstract, jax.ShapeDtypeStruct((2, height, width, 1),
                                                jnp.float32))['value']
    expected = (2,) + kind.value_shape
    if output.shape != expected:
      raise ValueError(f'the model returns {list(output.shape)} for 2 images; '
                       f'its kind {kind.name!r} needs {list(expected)}')
  except Exception as e:  # pylint: disable=broad-except  # Any config error.
    raise workdir_lib.PredictError(
        f'{config_path}: cannot build the model ({log.error_line(e)})'
    ) from None
  return _Model(config, abstract, forward, kind, height, width,
                kind.grid(model))


def _image_preparer(config, height: int, width: int):
  """The TensorFlow function making one uint8 [H, W, 1] scan a model input,
  as training makes it."""
  # pylint: disable=import-outside-toplevel
  import tensorflow as tf
  from hc_jax.data import normalise
  from hc_jax.data import resize as resize_lib

  @tf.function(input_signature=[tf.TensorSpec([None, None, 1], tf.uint8)])
  def prepare_image(image):
    # As the prepared training images (resized, uint8), then z-scored as the
    # trainer does.
    resized = resize_lib.resize(image, (height, width), config.resize_mode)
    return normalise.zscore_tf(resize_lib.to_uint8(resized))

  return prepare_image


def _warn_if_training(runs: Sequence[str]) -> None:
  """Warns (once per run) when a process is training into a run now: its
  best checkpoint and results.json may be replaced while they are read."""
  from hc_jax.training import lock  # pylint: disable=import-outside-toplevel
  for run in runs:
    who = lock.holder(run)
    if who:
      warnings.warn(f'{run} is being trained by {who}: the predictions use '
                    'its best checkpoint so far, which that process may '
                    'still replace', stacklevel=3)
