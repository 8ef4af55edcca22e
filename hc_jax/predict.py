"""Applies a trained run, or a grid of fold runs, to new scans.

  python -m hc_jax.predict --workdir=runs/cnn263k_mse_fold0 \
      --images=../shared/hc18/test_set --out=predictions.csv \
      [--pixel-sizes=CSV] [--overlays=DIR] [--tta-flip]

For each image: HC in pixels of the original image, in mm where its pixel size
is known, and the gestational age by Hadlock (1984), flagged outside the 14-42
weeks the formula was fitted on. `--images` takes directories (every PNG but
`*_Annotation.png`) and files, comma-separated or with the flag repeated.
Pixel sizes come from `--pixel-sizes` (CSV `filename,pixel size(mm)[,...]`, as
in HC18), or else from the HC18 CSV in the parent of an images directory
(`test_set/` -> `test_set_pixel_size.csv`). A file that cannot be used gets a
row with its error as status, and the batch goes on. Exit code 0 when every
image was predicted, 1 when some failed, 2 for a usage error.

A workdir whose subdirectories are finished runs (`fold0/` ... `fold4/`) is a
fold ensemble: HC is the mean over the runs and `hc_mm_sd` their standard
deviation (ddof=1). As a library:

  predictor = predict.load('runs/cv_grid')
  out = predictor([image_uint8_2d, ...], pixel_sizes_mm=[0.1, ...])
  out['hc_mm'], out['hc_mm_sd'], out['hc_px']

Images are preprocessed by the training code's own TF ops (resize, the uint8
rounding of the training cache, per-image z-score), so a run's test-fold
images get the very predictions in its `predictions_test.csv`.
"""

import argparse
import concurrent.futures
import csv
import dataclasses
import functools
import json
import math
import os
import sys
from typing import Sequence

import numpy as np

from hc_jax import gestational_age
from hc_jax import hc18

BATCH_SIZE = 32
PROGRESS_EVERY = 64  # Images per chunk of the CLI, and per progress line.
COLUMNS = ('filename', 'pixel_size_mm', 'hc_px', 'hc_mm', 'hc_mm_sd',
           'ga_weeks', 'ga_flag', 'status')
OVERLAY_SUFFIX = '_prediction.png'
# Fields that must agree between the runs of an ensemble: they share one
# model and one preprocessing.
ENSEMBLE_FIELDS = ('model', 'dtype', 'image_size', 'resize_mode')


def _hide_gpus_from_tf(tf):
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):  # Already initialised.
    pass


def run_dirs(workdir: str) -> list[str]:
  """The finished runs a workdir stands for: itself, or its subdirectories.

  Args:
    workdir: a run (holds config.json) or a grid of runs.

  Returns:
    Run directories, sorted.

  Raises:
    FileNotFoundError: no such directory, or it holds no run.
    ValueError: a run has no results.json (training did not finish).
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'workdir {workdir} does not exist')
  if os.path.isfile(os.path.join(workdir, 'config.json')):
    runs = [workdir]
  else:
    runs = sorted(
        os.path.join(workdir, name) for name in os.listdir(workdir)
        if os.path.isfile(os.path.join(workdir, name, 'config.json')))
    if not runs:
      raise FileNotFoundError(
          f'{workdir} is not a run (no config.json) and has no run '
          'subdirectories')
  for run in runs:
    if not os.path.isfile(os.path.join(run, 'results.json')):
      raise ValueError(f'{run} has no results.json: training did not finish')
  return runs


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _restore_variables(run: str, config, model):
  """The best checkpoint's {'params', 'batch_stats'}, restored via orbax."""
  # pylint: disable=import-outside-toplevel
  import jax
  from hc_jax import checkpoint
  from hc_jax import train
  # The saved tree is the whole train state (optimiser state included), so
  # the abstract target is built the way training builds the state.
  tx = train.create_optimizer(config, steps_per_epoch=1)
  abstract = jax.eval_shape(lambda: train.create_train_state(
      config, model, jax.random.key(0), tx))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      abstract)
  state = checkpoint.Checkpoints(run).restore_best(abstract)
  return {'params': state.params, 'batch_stats': state.batch_stats}


def available_cores() -> int:
  """The cores this process may run on (its affinity, e.g. under taskset)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def parallel_map(fn, items) -> list:
  """[fn(item) or the exception it raised, ...], in order, over threads.

  PNG decoding (PIL) and the resize (TensorFlow) release the GIL, so reading
  and preparing scans on all cores is faster than one after another.
  """
  def call(item):
    try:
      return fn(item)
    except Exception as e:  # pylint: disable=broad-except  # Reported per item.
      return e
  items = list(items)
  if len(items) < 2:
    return [call(item) for item in items]
  workers = min(len(items), available_cores())
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(call, items))


@dataclasses.dataclass
class Predictor:
  """A model (or fold ensemble) ready to predict HC; make it with `load`.

  Attributes:
    runs: the run directories, one per ensemble member.
    image_size: side of the square model input.
    resize_mode: 'stretch' or 'letterbox', as in training.
    normalisers_px: each run's `normaliser_px` (from its results.json).
  """
  runs: list[str]
  image_size: int
  resize_mode: str
  normalisers_px: list[float]
  _variables: list = dataclasses.field(repr=False)
  _forward: object = dataclasses.field(repr=False)
  _prepare: object = dataclasses.field(repr=False)

  @property
  def is_ensemble(self) -> bool:
    return len(self.runs) > 1

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """The model input for one scan, exactly as training makes it.

    Args:
      image: [H, W] uint8 scan, any size.

    Returns:
      float32 [S, S, 1]: resized, rounded to uint8, z-scored.
    """
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.uint8:
      raise ValueError(f'expected a 2D uint8 image, got {image.dtype} '
                       f'{image.shape}')
    return self._prepare(image[..., None]).numpy()

  def __call__(self, images: Sequence[np.ndarray],
               pixel_sizes_mm: Sequence[float | None] | None = None,
               tta_flip: bool = False) -> dict[str, np.ndarray]:
    """Predicts HC for a list of scans, in batches of `BATCH_SIZE`.

    Args:
      images: [H, W] uint8 scans of any sizes.
      pixel_sizes_mm: each scan's pixel size in mm (None or NaN where
        unknown), or None for none known.
      tta_flip: average each run's predictions on the scan and on its
        left-right mirror.

    Returns:
      {'hc_px': HC in px of the original image, 'hc_mm': HC in mm (NaN where
      the pixel size is unknown), 'hc_mm_sd': SD (ddof=1) of the runs' HC in
      mm (NaN for a single run)}, float64 arrays [N], means over the runs.
    """
    num_images = len(images)
    if pixel_sizes_mm is None:
      pixel_sizes_mm = [None] * num_images
    if len(pixel_sizes_mm) != num_images:
      raise ValueError(f'{len(pixel_sizes_mm)} pixel sizes for {num_images} '
                       'images')
    pixel_size = np.array([math.nan if p is None else p for p in pixel_sizes_mm],
                          np.float64)
    inputs = np.zeros([num_images, self.image_size, self.image_size, 1],
                      np.float32)
    for i, prepared in enumerate(parallel_map(self.preprocess, images)):
      if isinstance(prepared, ValueError):
        raise ValueError(f'image {i}: {prepared}') from None
      if isinstance(prepared, Exception):
        raise prepared
      inputs[i] = prepared
    views = [inputs, inputs[:, :, ::-1]] if tta_flip else [inputs]
    targets = np.zeros([len(self.runs), num_images], np.float64)
    for start in range(0, num_images, BATCH_SIZE):
      stop = min(start + BATCH_SIZE, num_images)
      for view in views:
        batch = np.zeros([BATCH_SIZE] + list(inputs.shape[1:]), np.float32)
        batch[:stop - start] = view[start:stop]  # Padded: one compiled shape.
        for member, variables in enumerate(self._variables):
          out = np.asarray(self._forward(variables, batch), np.float64)
          targets[member, start:stop] += out[:stop - start] / len(views)
    hc_px = targets * np.asarray(self.normalisers_px)[:, None]
    hc_mm = hc_px * pixel_size
    return {
        'hc_px': hc_px.mean(axis=0),
        'hc_mm': hc_mm.mean(axis=0),
        'hc_mm_sd': (hc_mm.std(axis=0, ddof=1) if self.is_ensemble else
                     np.full(num_images, math.nan)),
    }


def load(workdir: str) -> Predictor:
  """Loads a finished run, or a grid of runs as an ensemble.

  Args:
    workdir: a run directory (config.json, results.json, checkpoints/best) or
      a directory of such runs of the same model config (e.g. fold0..fold4).

  Returns:
    A `Predictor`.

  Raises:
    FileNotFoundError: no run at `workdir`.
    ValueError: an unfinished run, or an ensemble of mismatched runs.
  """
  runs = run_dirs(workdir)  # Before the heavy imports: bad paths fail fast.
  # pylint: disable=import-outside-toplevel
  import jax
  import ml_collections
  import tensorflow as tf
  from hc_jax import preprocess
  from hc_jax import train
  configs = [ml_collections.ConfigDict(
      _read_json(os.path.join(run, 'config.json'))) for run in runs]
  for run, config in zip(runs[1:], configs[1:]):
    for field in ENSEMBLE_FIELDS:
      if config[field] != configs[0][field]:
        raise ValueError(f'{run} has {field}={config[field]!r} but {runs[0]} '
                         f'has {configs[0][field]!r}; an ensemble needs one '
                         'model config')
  config = configs[0]
  model = train.create_model(config)
  variables = [_restore_variables(run, c, model)
               for run, c in zip(runs, configs)]
  normalisers_px = [float(_read_json(os.path.join(run, 'results.json'))
                          ['normaliser_px']) for run in runs]
  _hide_gpus_from_tf(tf)

  @tf.function(input_signature=[tf.TensorSpec([None, None, 1], tf.uint8)])
  def prepare(image):
    # As input_pipeline.prepare (cached uint8) then eval_dataset (z-score).
    resized = preprocess.resize(image, config.image_size, config.resize_mode)
    return preprocess.zscore(preprocess.to_uint8(resized))

  forward = jax.jit(functools.partial(model.apply, train=False))
  return Predictor(runs=runs, image_size=config.image_size,
                   resize_mode=config.resize_mode,
                   normalisers_px=normalisers_px, _variables=variables,
                   _forward=forward, _prepare=prepare)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def image_paths(specs: Sequence[str]) -> list[str]:
  """Files named by `--images`: directories expand to their scans, sorted.

  Args:
    specs: directories or files, each possibly a comma-separated list.

  Returns:
    Paths in the order given (a missing file is kept, to be reported).

  Raises:
    ValueError: when nothing is named, or a directory holds no PNG.
  """
  paths = []
  for spec in specs:
    for item in filter(None, (s.strip() for s in spec.split(','))):
      if os.path.isdir(item):
        names = sorted(n for n in os.listdir(item) if n.lower().endswith(
            '.png') and not n.endswith(hc18.ANNOTATION_SUFFIX))
        if not names:
          raise ValueError(f'{item} holds no PNG scans')
        paths += [os.path.join(item, n) for n in names]
      else:
        paths.append(item)
  if not paths:
    raise ValueError('--images names no files')
  return paths


def read_pixel_sizes(path: str) -> dict[str, float]:
  """{filename: pixel size in mm} from an HC18-style CSV.

  Raises:
    ValueError: for a missing file or a malformed row (one line).
  """
  if not os.path.isfile(path):
    raise ValueError(f'pixel-size CSV {path} does not exist')
  with open(path, newline='') as f:
    rows = [row for row in csv.reader(f) if any(c.strip() for c in row)]
  sizes = {}
  for line, row in enumerate(rows[1:], start=2):
    try:
      size = float(row[1])
      if not math.isfinite(size) or size <= 0:
        raise ValueError
    except (IndexError, ValueError):
      raise ValueError(f'{path} line {line}: expected filename,pixel size(mm)'
                       f' with a positive size, got {",".join(row)!r}') from None
    sizes[row[0].strip()] = size
  return sizes


def find_pixel_size_csv(image_dir: str) -> str | None:
  """The HC18 CSV beside an images directory (`test_set/` ->
  `../test_set_pixel_size.csv`), or the only one there, or None."""
  parent, folder = os.path.split(os.path.abspath(image_dir))
  present = {split_folder: os.path.join(parent, csv_name)
             for split_folder, csv_name in hc18.SPLITS.values()
             if os.path.isfile(os.path.join(parent, csv_name))}
  if folder in present:
    return present[folder]
  return next(iter(present.values())) if len(present) == 1 else None


def write_overlay(image: np.ndarray, lines: Sequence[str], path: str) -> None:
  """Writes the scan as RGB with `lines` of text in its top-left corner."""
  # pylint: disable=import-outside-toplevel
  from PIL import Image, ImageDraw, ImageFont
  canvas = Image.fromarray(image).convert('RGB')
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default(size=max(10, image.shape[0] // 27))
  text = '\n'.join(lines)
  box = draw.multiline_textbbox((8, 8), text, font=font)
  draw.rectangle((box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4), fill='black')
  draw.multiline_text((8, 8), text, font=font, fill=(255, 220, 0))
  canvas.save(path)


def _fmt(value: float, digits: int) -> str:
  return '' if value is None or not math.isfinite(value) else (
      f'{value:.{digits}f}')


def write_rows(path: str, rows: Sequence[dict]) -> None:
  """Writes the prediction CSV (`COLUMNS`) atomically."""
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m hc_jax.predict',
      description='Predict HC (and gestational age) for new scans.')
  parser.add_argument('--workdir', required=True,
                      help='a finished run, or a directory of runs (ensemble)')
  parser.add_argument('--images', action='append', required=True,
                      help='directories or PNG files, comma-separated or repeated')
  parser.add_argument('--pixel-sizes', '--pixel_sizes', dest='pixel_sizes',
                      help='CSV filename,pixel size(mm)')
  parser.add_argument('--out', required=True, help='output CSV')
  parser.add_argument('--overlays', help='directory for annotated PNGs')
  parser.add_argument('--tta-flip', '--tta_flip', dest='tta_flip',
                      action='store_true', help='average with the mirror image')
  return parser.parse_args(argv)


def _pixel_size_sources(args, paths):
  """{image dir: (csv path or None, sizes)} for every directory in `paths`."""
  if args.pixel_sizes:
    table = (args.pixel_sizes, read_pixel_sizes(args.pixel_sizes))
    return {os.path.dirname(p): table for p in paths}
  sources = {}
  for image_dir in dict.fromkeys(os.path.dirname(p) for p in paths):
    found = find_pixel_size_csv(image_dir or '.')
    sources[image_dir] = (found, read_pixel_sizes(found) if found else {})
    print(f'pixel sizes for {image_dir or "."}/: '
          f'{found or "none found, HC in px only"}', file=sys.stderr)
  return sources


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit code (0 ok, 1 failures, 2 usage)."""
  args = _parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO.
  try:
    paths = image_paths(args.images)
    sources = _pixel_size_sources(args, paths)
    predictor = load(args.workdir)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.overlays:
    os.makedirs(args.overlays, exist_ok=True)
  rows = []
  for start in range(0, len(paths), PROGRESS_EVERY):
    chunk = []  # (row, image) of the files that read well.
    chunk_paths = paths[start:start + PROGRESS_EVERY]
    for path, read in zip(chunk_paths,
                          parallel_map(hc18.read_grayscale, chunk_paths)):
      filename = os.path.basename(path)
      row = dict.fromkeys(COLUMNS, '')
      row.update(filename=filename, status='ok')
      rows.append(row)
      csv_path, sizes = sources[os.path.dirname(path)]
      try:
        if isinstance(read, ValueError):
          raise read
        if isinstance(read, Exception):
          raise ValueError(f'{type(read).__name__}: {read}')
        image, note = read
        if csv_path and filename not in sizes:
          raise ValueError(f'no pixel size for it in {csv_path}')
      except ValueError as e:
        row['status'] = str(e)
        continue
      if note:
        print(f'{path}: {note}', file=sys.stderr)
      row['pixel_size_mm'] = sizes.get(filename, '')
      chunk.append((row, image))
    if chunk:
      out = predictor([image for _, image in chunk],
                      [row['pixel_size_mm'] or None for row, _ in chunk],
                      tta_flip=args.tta_flip)
      for i, (row, image) in enumerate(chunk):
        ga_weeks = gestational_age.hadlock_ga_weeks(out['hc_mm'][i])
        row.update(hc_px=_fmt(out['hc_px'][i], 3),
                   hc_mm=_fmt(out['hc_mm'][i], 3),
                   hc_mm_sd=_fmt(out['hc_mm_sd'][i], 3),
                   ga_weeks=_fmt(ga_weeks, 2),
                   ga_flag=gestational_age.ga_flag(ga_weeks))
        if args.overlays:
          write_overlay(image, _overlay_lines(row), os.path.join(
              args.overlays,
              os.path.splitext(row['filename'])[0] + OVERLAY_SUFFIX))
    if len(paths) > PROGRESS_EVERY:
      print(f'{len(rows)}/{len(paths)} images', file=sys.stderr)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  write_rows(args.out, rows)
  failed = [row for row in rows if row['status'] != 'ok']
  print(f'{len(rows) - len(failed)} of {len(rows)} images predicted, '
        f'{len(failed)} failed; wrote {args.out}')
  for row in failed:
    print(f'  failed: {row["filename"]}: {row["status"]}')
  return 1 if failed else 0


def _overlay_lines(row) -> list[str]:
  if not row['hc_mm']:
    return [f'HC {float(row["hc_px"]):.1f} px (pixel size unknown)']
  spread = f' ± {float(row["hc_mm_sd"]):.1f}' if row['hc_mm_sd'] else ''
  lines = [f'HC {float(row["hc_mm"]):.1f}{spread} mm',
           f'GA {row["ga_weeks"]} weeks (Hadlock)']
  if row['ga_flag']:
    lines.append(row['ga_flag'])
  return lines


if __name__ == '__main__':
  sys.exit(main())
