"""The figures of predictions and runs (matplotlib, written as PNG).

  figures.scatter_hc(predictions, 'scatter.png', title)
  figures.bland_altman(predictions, 'bland_altman.png', title)

`predictions` are pooled prediction columns ('hc_mm_true', 'hc_mm_pred',
and for the worst cases 'filename' and 'workdir'), as
`hc_jax.evaluation.cv_table.pool_predictions` gives them; `python -m
hc_jax.plots` draws them all for a run or a grid.

Trimesters are of the gestational age that Hadlock's formula gives for the
TRUE HC (`hc_jax.evaluation.gestational_age`): 1st < 14 weeks (below the
formula's fitted range, so only a rough band), 2nd 14 to 28 weeks, 3rd >= 28
weeks; that is HC below about 89 mm, 89 to 258 mm, and above. Every function
returns the path it wrote. Figures are made with `matplotlib.figure.Figure`,
which draws PNGs with Agg and touches no global pyplot state.
"""

import json
import math
import os
from typing import Sequence

from matplotlib.figure import Figure
import numpy as np

from hc_jax import workdir as workdir_lib
from hc_jax.data import hc18
from hc_jax.evaluation import gestational_age

# (label, lowest GA in weeks, highest GA in weeks), by Hadlock from true HC.
TRIMESTERS = (('1st (< 14 wk)', -math.inf, 14.0),
              ('2nd (14-28 wk)', 14.0, 28.0),
              ('3rd (>= 28 wk)', 28.0, math.inf))
DPI = 120


def _save(figure: Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=DPI, bbox_inches='tight')
  return path


def _true_pred_mm(predictions) -> tuple[np.ndarray, np.ndarray]:
  true_mm = np.asarray(predictions['hc_mm_true'], np.float64)
  pred_mm = np.asarray(predictions['hc_mm_pred'], np.float64)
  if not true_mm.size:
    raise ValueError('no predictions to plot')
  return true_mm, pred_mm


def scatter_hc(predictions, path: str, title: str = '') -> str:
  """Predicted vs true HC (mm), one dot per image, with the identity line.

  Args:
    predictions: columns with 'hc_mm_true' and 'hc_mm_pred' (as
      `cv_table.read_predictions` or `cv_table.pool_predictions` give them).
    path: the PNG to write.
    title: the figure's title.

  Returns:
    `path`.
  """
  true_mm, pred_mm = _true_pred_mm(predictions)
  figure = Figure(figsize=(5, 5))
  axes = figure.subplots()
  axes.scatter(true_mm, pred_mm, s=9, alpha=0.6, edgecolors='none')
  low = min(true_mm.min(), pred_mm.min())
  high = max(true_mm.max(), pred_mm.max())
  pad = 0.05 * (high - low or 1.0)
  limits = (low - pad, high + pad)
  axes.plot(limits, limits, 'k--', linewidth=1, label='identity')
  axes.set(xlim=limits, ylim=limits, xlabel='true HC (mm)',
           ylabel='predicted HC (mm)', aspect='equal')
  mae_mm = np.abs(pred_mm - true_mm).mean()
  axes.set_title((f'{title}\n' if title else '') +
                 f'n={true_mm.size}, MAE {mae_mm:.2f} mm')
  axes.legend(loc='upper left')
  return _save(figure, path)


def limits_of_agreement(hc_mm_true, hc_mm_pred) -> dict[str, float]:
  """Bland-Altman statistics of predicted minus true HC.

  Args:
    hc_mm_true: reference HC (mm), [N].
    hc_mm_pred: predicted HC (mm), [N].

  Returns:
    {'bias_mm': mean difference, 'sd_mm': its SD (ddof=1; 0 for one image),
    'lower_mm', 'upper_mm': bias -/+ 1.96 SD}.
  """
  difference = (np.asarray(hc_mm_pred, np.float64) -
                np.asarray(hc_mm_true, np.float64))
  bias = float(difference.mean())
  sd = float(difference.std(ddof=1)) if difference.size > 1 else 0.0
  return {'bias_mm': bias, 'sd_mm': sd, 'lower_mm': bias - 1.96 * sd,
          'upper_mm': bias + 1.96 * sd}


def bland_altman(predictions, path: str, title: str = '') -> str:
  """Bland-Altman plot: difference (pred - true) against the mean of the two.

  The bias and the 95 % limits of agreement (bias ± 1.96 SD) are drawn as
  lines and written beside them.

  Args:
    predictions: columns with 'hc_mm_true' and 'hc_mm_pred'.
    path: the PNG to write.
    title: the figure's title.

  Returns:
    `path`.
  """
  true_mm, pred_mm = _true_pred_mm(predictions)
  agreement = limits_of_agreement(true_mm, pred_mm)
  figure = Figure(figsize=(6, 4.5))
  axes = figure.subplots()
  axes.scatter((true_mm + pred_mm) / 2, pred_mm - true_mm, s=9, alpha=0.6,
               edgecolors='none')
  for key, text, style in (('upper_mm', '+1.96 SD', ':'),
                           ('bias_mm', 'bias', '-'),
                           ('lower_mm', '-1.96 SD', ':')):
    axes.axhline(agreement[key], color='k', linestyle=style, linewidth=1)
    axes.annotate(f'{text} {agreement[key]:.2f} mm', (1.0, agreement[key]),
                  xycoords=('axes fraction', 'data'), xytext=(-4, 3),
                  textcoords='offset points', ha='right', fontsize=8)
  axes.set(xlabel='mean of true and predicted HC (mm)',
           ylabel='predicted - true HC (mm)')
  axes.set_title((f'{title}\n' if title else '') +
                 f'Bland-Altman, n={true_mm.size}')
  return _save(figure, path)


def trimester_index(hc_mm_true) -> np.ndarray:
  """Index into `TRIMESTERS` of each image, from Hadlock's GA of its HC."""
  ga_weeks = np.atleast_1d(gestational_age.hadlock_ga_weeks(
      np.asarray(hc_mm_true, np.float64)))
  index = np.zeros(ga_weeks.shape, np.int64)
  for i, (_, low, _) in enumerate(TRIMESTERS):
    index[ga_weeks >= low] = i
  return index


def error_by_trimester(predictions, path: str, title: str = '') -> str:
  """Box plots of the absolute error (mm) per trimester (see module doc).

  Args:
    predictions: columns with 'hc_mm_true' and 'hc_mm_pred'.
    path: the PNG to write.
    title: the figure's title.

  Returns:
    `path`.
  """
  true_mm, pred_mm = _true_pred_mm(predictions)
  errors = np.abs(pred_mm - true_mm)
  index = trimester_index(true_mm)
  figure = Figure(figsize=(6, 4.5))
  axes = figure.subplots()
  groups = [errors[index == i] for i in range(len(TRIMESTERS))]
  present = [i for i, group in enumerate(groups) if group.size]
  axes.boxplot([groups[i] for i in present], positions=[i + 1 for i in present],
               widths=0.5)
  axes.set_xticks(range(1, len(TRIMESTERS) + 1))
  axes.set_xticklabels([f'{label}\nn={groups[i].size}' for i, (label, _, _)
                        in enumerate(TRIMESTERS)])
  axes.set_xlim(0.5, len(TRIMESTERS) + 0.5)
  axes.set_ylabel('|predicted - true HC| (mm)')
  axes.set_title((f'{title}\n' if title else '') +
                 'absolute error by trimester (Hadlock GA of the true HC)')
  return _save(figure, path)


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, workdir_lib.METRICS_FILE)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  return [line for line in lines if 'train_loss' in line]  # Not the test line.


def _fold_label(workdir: str) -> str:
  path = os.path.join(workdir, workdir_lib.RESULTS_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      return f'fold {json.load(f).get("fold", "?")}'
  return os.path.basename(os.path.normpath(workdir))


def learning_curves(workdirs: Sequence[str], path: str, title: str = '') -> str:
  """Train loss and validation MAE (mm) per epoch, one line per fold.

  The epoch that the validation part selected (results.json) is marked.

  Args:
    workdirs: runs (folds) of one configuration.
    path: the PNG to write.
    title: the figure's title.

  Returns:
    `path`.

  Raises:
    ValueError: when no run has epochs in its metrics.jsonl.
  """
  curves = [(w, read_metrics(w)) for w in workdirs]
  curves = [(w, lines) for w, lines in curves if lines]
  if not curves:
    raise ValueError(f'no epochs in the {workdir_lib.METRICS_FILE} of '
                     f'{", ".join(workdirs)}')
  figure = Figure(figsize=(10, 4))
  loss_axes, val_axes = figure.subplots(1, 2)
  for workdir, lines in curves:
    epochs = [line['epoch'] for line in lines]
    label = _fold_label(workdir)
    loss_axes.plot(epochs, [line['train_loss'] for line in lines], label=label)
    val_mm = [line.get('val_mae_mm', math.nan) for line in lines]
    (line_2d,) = val_axes.plot(epochs, val_mm, label=label)
    results_path = os.path.join(workdir, workdir_lib.RESULTS_FILE)
    if os.path.isfile(results_path):
      with open(results_path) as f:
        selected = json.load(f).get('selected_epoch')
      if selected in epochs:
        val_axes.plot(selected, val_mm[epochs.index(selected)], 'o',
                      color=line_2d.get_color())
  if all(line['train_loss'] > 0 for _, lines in curves for line in lines):
    loss_axes.set_yscale('log')
  loss_axes.set(xlabel='epoch', ylabel='train loss', title='training loss')
  val_axes.set(xlabel='epoch', ylabel='validation MAE (mm)',
               title='validation MAE (dot: selected epoch)')
  loss_axes.legend(fontsize=8)
  if title:
    figure.suptitle(title)
  return _save(figure, path)


def images_dir(workdir: str, hc18_dir: str | None = None) -> str | None:
  """Where the scans of a run are: `hc18_dir`, else what its config used.

  A run on phantoms (data.source 'synthetic') wrote them into its workdir;
  a run on HC18 used data.hc18_dir or the default copy. A run on downloaded
  data has none to read here (None).
  """
  if hc18_dir:
    return hc18_dir
  config_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.isfile(config_path):
    return None
  with open(config_path) as f:
    data = json.load(f).get('data', {})
  if data.get('source') == 'synthetic':
    found = os.path.join(workdir, workdir_lib.SYNTHETIC_DIR)
  elif data.get('hc18_dir') == 'download':
    return None
  else:
    found = data.get('hc18_dir') or hc18.default_dir()
  return found if found and os.path.isdir(found) else None


def worst_cases(predictions, path: str, hc18_dir: str | None = None,
                num_cases: int = 6, title: str = '') -> str | None:
  """The scans with the largest absolute errors, with true and predicted HC.

  The reference outline (the `_Annotation.png` beside the scan) is drawn in
  green where it exists.

  Args:
    predictions: pooled columns incl. 'filename' and 'workdir' (as
      `cv_table.pool_predictions` gives them).
    path: the PNG to write.
    hc18_dir: an HC18 directory that holds the scans in training_set/; None
      looks where each run's config says (see `images_dir`).
    num_cases: how many scans.
    title: the figure's title.

  Returns:
    `path`, or None (nothing written) when none of the scans can be read.
  """
  true_mm, pred_mm = _true_pred_mm(predictions)
  order = np.argsort(-np.abs(pred_mm - true_mm), kind='stable')
  workdirs = predictions.get('workdir', [None] * true_mm.size)
  cases = []
  for i in order:
    directory = (images_dir(workdirs[i], hc18_dir) if workdirs[i] else hc18_dir)
    if not directory:
      continue
    image_path = os.path.join(directory, hc18.SPLITS['train'][0],
                              str(predictions['filename'][i]))
    try:
      image, _ = hc18.read_grayscale(image_path)
    except ValueError:
      continue
    cases.append((i, image_path, image))
    if len(cases) == num_cases:
      break
  if not cases:
    return None
  num_cols = min(3, len(cases))
  num_rows = math.ceil(len(cases) / num_cols)
  figure = Figure(figsize=(4 * num_cols, 3.2 * num_rows))
  grid_axes = np.atleast_1d(figure.subplots(num_rows, num_cols)).ravel()
  for axes, (i, image_path, image) in zip(grid_axes, cases):
    axes.imshow(image, cmap='gray', vmin=0, vmax=255)
    annotation_path = image_path[:-len('.png')] + hc18.ANNOTATION_SUFFIX
    if os.path.isfile(annotation_path):
      rows, cols = np.nonzero(hc18.read_grayscale(annotation_path)[0])
      axes.scatter(cols, rows, s=0.3, c='lime', marker='.', linewidths=0)
    axes.set_title(f'{predictions["filename"][i]}\ntrue {true_mm[i]:.1f} mm, '
                   f'predicted {pred_mm[i]:.1f} mm '
                   f'({pred_mm[i] - true_mm[i]:+.1f})', fontsize=9)
  for axes in grid_axes:
    axes.axis('off')
  if title:
    figure.suptitle(title)
  return _save(figure, path)
