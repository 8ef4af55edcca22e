"""ImageNet-pretrained weights from Keras files: `load_into(state, path, name)`.

Zhang et al. started their VGG16 and ResNet50 from ImageNet weights. Keras
ships those as `keras.applications` files; this module copies such a file's
weights into the matching hc_jax model (`models.ResNet50`, `models.VGG16`)
and leaves the regression head at its random initialisation.

Files understood:
  * `.h5` / `.hdf5` in Keras' legacy layout, e.g. the ImageNet file that
    `keras.applications.ResNet50(weights='imagenet', include_top=False)`
    downloads (`resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`), or a
    whole model saved with `model.save('x.h5')`. Read with h5py by layer name,
    without Keras.
  * `.keras`: a whole model saved with `model.save('x.keras')`, loaded with
    `keras.models.load_model`.
  * `.weights.h5`: weights saved with `model.save_weights(...)` from a
    `keras.applications` model; Keras loads them into that architecture.

Keras layer names are the hc_jax parameter paths joined by '_'
(`conv2_block1` / `1_conv` -> `conv2_block1_1_conv`). Convolution kernels are
HWIO in both. The models take one-channel images: the first convolution's RGB
kernels are summed over the input channels, which computes on a grey image
what Keras computes on that image repeated into R, G and B. Where the hc_jax
convolution has no bias (ResNet50) the Keras bias is folded into the
BatchNorm that follows it: its running mean becomes `mean - bias`.
The ImageNet classifier layers of a file with a top (`fc1`, `fc2`,
`predictions`) are ignored.

Keras' ResNet50 is ResNet v1 (stride on the first 1x1 convolution of a
block) with BatchNorm epsilon 1.001e-5, so its weights need
`models.ResNet50(keras_v1=True)`; `train.create_model(config)` builds that
when `config.init_from` is set.
"""

import os
from typing import Any
import warnings

from flax import traverse_util
import jax.numpy as jnp
import numpy as np

from hc_jax.nets import paper

# hc_jax model name -> its keras.applications builder.
KERAS_APPLICATIONS = {'resnet50': 'ResNet50', 'vgg16': 'VGG16'}
# hc_jax model name -> its class (`hc_jax.models.MODELS` registers the same).
_MODEL_CLASSES = {'resnet50': paper.ResNet50, 'vgg16': paper.VGG16}
# Modules of the hc_jax models that Keras files have no weights for.
HEADS = {'resnet50': ('head',), 'vgg16': ('head_hidden', 'head')}
# Keras' ImageNet classifier layers: present in files with a top, not used.
CLASSIFIER_LAYERS = ('fc1', 'fc2', 'predictions')

KerasWeights = dict[str, list[np.ndarray]]


def load_into(state: Any, path: str, model_name: str) -> Any:
  """Initialises a train state's backbone from a Keras weights file.

  Args:
    state: A `train.TrainState` (anything with `params`, `batch_stats`,
      `apply_fn` and `replace`) of the model `model_name`; for 'resnet50' its
      model must have been built with `keras_v1=True`.
    path: A Keras `.h5`, `.keras` or `.weights.h5` file of
      `keras.applications.ResNet50` (or `VGG16`), with or without top.
    model_name: The config name of the model, 'resnet50' or 'vgg16'.

  Returns:
    The state with every backbone parameter and BatchNorm statistic replaced
    by the file's; the head and the optimiser state are unchanged.

  Raises:
    ValueError: For another model, a state whose model cannot compute what
      Keras' does, or a file that cannot be read or does not match the model
      (the message lists missing, unexpected and mis-shaped layers).
    FileNotFoundError: If `path` does not exist.
  """
  _check_model(state, model_name)
  keras_weights = read_keras_weights(path, model_name)
  params, batch_stats = import_weights(
      keras_weights, state.params, state.batch_stats, model_name, source=path)
  return state.replace(params=params, batch_stats=batch_stats)


def _check_model_name(model_name: str) -> None:
  if model_name not in KERAS_APPLICATIONS:
    raise ValueError(
        f'pretrained weights can be imported for '
        f'{" and ".join(sorted(KERAS_APPLICATIONS))} only, not {model_name!r}')


def _check_model(state: Any, model_name: str) -> None:
  """Raises ValueError unless `model_name` weights suit the state's model."""
  _check_model_name(model_name)
  module = getattr(state.apply_fn, '__self__', None)  # Bound `model.apply`.
  if module is None:
    return
  if not isinstance(module, _MODEL_CLASSES[model_name]):
    raise ValueError(f'the state holds a {type(module).__name__}, not the '
                     f'{model_name} that the weights are for')
  if isinstance(module, paper.ResNet50) and not module.keras_v1:
    raise ValueError(
        "Keras' ResNet50 weights need models.ResNet50(keras_v1=True) (strides "
        'and BatchNorm epsilon as in Keras); train.create_model(config) builds '
        'it when config.init_from is set')
  if isinstance(module, paper.VGG16) and module.batch_norm:
    raise ValueError(
        "Keras' VGG16 has no BatchNorm; use models.VGG16(batch_norm=False)")


def read_keras_weights(path: str, model_name: str) -> KerasWeights:
  """Reads every layer's weights from a Keras file.

  Args:
    path: A `.h5`/`.hdf5` (legacy layout), `.keras` or `.weights.h5` file.
    model_name: 'resnet50' or 'vgg16': the `keras.applications` model that a
      `.weights.h5` file is loaded into.

  Returns:
    Layer name -> the layer's weights in Keras' order (kernel, bias;
    gamma, beta, moving mean, moving variance), for layers that have any.

  Raises:
    FileNotFoundError: If `path` does not exist.
    ValueError: If the file cannot be read as that kind of Keras file.
  """
  _check_model_name(model_name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no Keras weights file at {path}')
  if path.endswith('.keras'):
    reader, kind = _read_keras_model, 'Keras model (.keras)'
  elif path.endswith('.weights.h5'):
    reader = _read_weights_h5
    kind = (f'keras.applications.{KERAS_APPLICATIONS[model_name]} weights '
            '(.weights.h5)')
  elif path.endswith(('.h5', '.hdf5')):
    reader, kind = _read_legacy_h5, 'legacy Keras HDF5'
  else:
    raise ValueError(f'{path}: expected a Keras .h5, .hdf5, .keras or '
                     f'.weights.h5 file')
  try:
    return reader(path, model_name)
  except Exception as error:  # pylint: disable=broad-except
    first_line = (str(error).strip().splitlines() or [''])[0]
    raise ValueError(f'cannot read {path} as a {kind} file: '
                     f'{type(error).__name__}: {first_line}') from error


def _read_legacy_h5(path: str, model_name: str) -> KerasWeights:
  """Keras' legacy HDF5 layout: `layer_names`, then `weight_names` per layer."""
  del model_name  # Layers are found by name.
  import h5py  # pylint: disable=import-outside-toplevel

  def names(group, attribute):
    # Keras splits long name lists over `attribute0`, `attribute1`, ...
    if attribute in group.attrs:
      values = list(group.attrs[attribute])
    else:
      values, chunk = [], 0
      while f'{attribute}{chunk}' in group.attrs:
        values += list(group.attrs[f'{attribute}{chunk}'])
        chunk += 1
    return [v.decode('utf8') if isinstance(v, bytes) else str(v)
            for v in values]

  with h5py.File(path, 'r') as file:
    group = file['model_weights'] if 'model_weights' in file else file
    layer_names = names(group, 'layer_names')
    if not layer_names:
      raise ValueError('no layer_names attribute (not a Keras weights file)')
    return {name: [np.asarray(group[name][weight])
                   for weight in names(group[name], 'weight_names')]
            for name in layer_names if names(group[name], 'weight_names')}


def _import_keras():
  """Imports Keras, keeping a TensorFlow backend off the accelerators."""
  import keras  # pylint: disable=import-outside-toplevel
  if keras.backend.backend() == 'tensorflow':
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    try:
      tf.config.set_visible_devices([], 'GPU')
    except (RuntimeError, ValueError):
      pass  # Devices were already initialised; TF keeps what it has.
  return keras


def _layer_weights(keras_model) -> KerasWeights:
  """Layer name -> weights, descending into nested models."""
  weights = {}
  for layer in keras_model.layers:
    if hasattr(layer, 'layers'):  # A model used as a layer.
      nested = _layer_weights(layer)
    elif layer.weights:
      nested = {layer.name: [np.asarray(w) for w in layer.get_weights()]}
    else:
      nested = {}
    for name in nested:
      if name in weights:
        raise ValueError(f'two layers are named {name!r}')
    weights.update(nested)
  return weights


def _read_keras_model(path: str, model_name: str) -> KerasWeights:
  del model_name  # Layers are found by name.
  keras = _import_keras()
  return _layer_weights(keras.models.load_model(path, compile=False))


def _read_weights_h5(path: str, model_name: str) -> KerasWeights:
  # Keras 3 stores these weights by position, not layer name: load them into
  # the architecture they were saved from.
  keras = _import_keras()
  application = getattr(keras.applications, KERAS_APPLICATIONS[model_name])
  keras_model = application(weights=None, include_top=False,
                            input_shape=(None, None, 3))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    keras_model.load_weights(path)
  for warning in caught:
    # Keras only warns where parts of the model keep their fresh weights.
    if 'Skipping' in str(warning.message):
      raise ValueError(str(warning.message))
    warnings.warn(warning.message, warning.category)
  return _layer_weights(keras_model)


def _listing(items: list[str], limit: int = 6) -> str:
  shown = ', '.join(items[:limit])
  return shown + (f', ... ({len(items) - limit} more)' if len(items) > limit
                  else '')


def _fit(value: np.ndarray, target: Any, name: str, problems: list[str],
         sum_rgb: bool = False) -> np.ndarray | None:
  """`value` as float64 if it fits the target's shape, else None (a problem).

  With `sum_rgb`, a kernel `[h, w, 3, out]` for a target `[h, w, 1, out]` is
  summed over its input channels.
  """
  value = np.asarray(value, np.float64)
  if (sum_rgb and value.ndim == 4 and value.shape[2] == 3
      and tuple(target.shape) == value.shape[:2] + (1,) + value.shape[3:]):
    value = value.sum(axis=2, keepdims=True)
  if value.shape != tuple(target.shape):
    problems.append(f'{name} {value.shape} in the file vs '
                    f'{tuple(target.shape)} in the model')
    return None
  return value


def _import_conv(name, arrays, path, variables, flat_params, backbone,
                 imported, folded_bias, problems) -> None:
  """Imports a convolution's kernel (and bias) into `imported`; a bias the
  module lacks goes to `folded_bias`, for its BatchNorm. Problems are
  appended to `problems`."""
  if len(arrays) not in (1, 2):
    problems.append(f'{name} has {len(arrays)} arrays, not kernel and bias')
    return
  kernel = _fit(arrays[0], flat_params[path + ('kernel',)],
                f'{name}/kernel', problems, sum_rgb=True)
  bias = np.zeros(flat_params[path + ('kernel',)].shape[-1])
  if len(arrays) == 2:
    bias = _fit(arrays[1], bias, f'{name}/bias', problems)
  if kernel is None or bias is None:
    return
  imported[path + ('kernel',)] = kernel
  if 'bias' in variables:
    imported[path + ('bias',)] = bias
  else:
    norm_path = path[:-1] + (path[-1].removesuffix('conv') + 'bn',)
    if norm_path not in backbone:
      problems.append(f'{name} has a bias and no BatchNorm to fold it into')
      return
    folded_bias[norm_path] = bias


def _import_norm(name, arrays, path, flat_params, flat_stats, imported,
                 folded_bias, problems) -> None:
  """Imports a BatchNorm's scale, bias and statistics into `imported`, its
  mean shifted by the folded bias of the convolution before it."""
  if len(arrays) != 4:
    problems.append(f'{name} has {len(arrays)} arrays, not gamma, beta, '
                    'moving mean and moving variance')
    return
  targets = {'scale': flat_params[path + ('scale',)],
             'bias': flat_params[path + ('bias',)],
             'mean': flat_stats[path + ('mean',)],
             'var': flat_stats[path + ('var',)]}
  fitted = {key: _fit(array, targets[key], f'{name}/{key}', problems)
            for key, array in zip(targets, arrays)}
  if any(value is None for value in fitted.values()):
    return
  # BN(conv(x) + b) = BN'(conv(x)) with the running mean shifted by b.
  fitted['mean'] = fitted['mean'] - folded_bias.get(path, 0.0)
  for key, value in fitted.items():
    imported[path + (key,)] = value


def import_weights(keras_weights: KerasWeights, params: Any, batch_stats: Any,
                   model_name: str, source: str = 'the file'
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Maps Keras layer weights onto hc_jax parameters and BatchNorm statistics.

  Args:
    keras_weights: Layer name -> weights, from `read_keras_weights`.
    params: The model's `params` collection (its shapes and dtypes are kept).
    batch_stats: The model's `batch_stats` collection.
    model_name: 'resnet50' or 'vgg16'; its head modules keep their values.
    source: Where the weights come from, for error messages.

  Returns:
    New `(params, batch_stats)`.

  Raises:
    ValueError: Listing the model's layers missing from the file, the file's
      unused layers and every array whose shape does not match.
  """
  _check_model_name(model_name)
  flat_params = traverse_util.flatten_dict(params)
  flat_stats = traverse_util.flatten_dict(batch_stats)
  modules: dict[tuple[str, ...], set[str]] = {}
  for key in flat_params:
    modules.setdefault(key[:-1], set()).add(key[-1])
  backbone = {path: variables for path, variables in modules.items()
              if path[0] not in HEADS[model_name]}
  imported: dict[tuple[str, ...], np.ndarray] = {}
  folded_bias: dict[tuple[str, ...], np.ndarray] = {}
  missing, problems, used = [], [], set()

  # Convolutions first, so that their biases can fold into the next BatchNorm.
  order = sorted(backbone, key=lambda path: 'scale' in backbone[path])
  for path in order:
    variables = backbone[path]
    name = '_'.join(path)
    if name not in keras_weights:
      missing.append(name)
      continue
    used.add(name)
    arrays = keras_weights[name]
    if variables <= {'kernel', 'bias'} and 'kernel' in variables:
      _import_conv(name, arrays, path, variables, flat_params, backbone,
                   imported, folded_bias, problems)
    elif variables == {'scale', 'bias'}:
      _import_norm(name, arrays, path, flat_params, flat_stats, imported,
                   folded_bias, problems)
    else:
      problems.append(f'{name} has variables {sorted(variables)}, which no '
                      'Keras layer maps to')

  missing.sort()
  extra = sorted(set(keras_weights) - used - set(CLASSIFIER_LAYERS))
  if missing or extra or problems:
    parts = [f'missing layers: {_listing(missing)}' if missing else '',
             f'unexpected layers: {_listing(extra)}' if extra else '',
             f'mis-shaped: {_listing(problems, 3)}' if problems else '']
    raise ValueError(
        f"{source} does not match hc_jax's {model_name}: "
        + '; '.join(part for part in parts if part))

  def replaced(flat):
    return traverse_util.unflatten_dict({
        key: (jnp.asarray(imported[key], dtype=value.dtype)
              if key in imported else value)
        for key, value in flat.items()})

  return replaced(flat_params), replaced(flat_stats)
