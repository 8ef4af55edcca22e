"""The paper's grid on one GPU within a time budget, without TensorFlow.

  python3 benchmarks/gpu_grid.py --data=export/hc18_224.npz --out=$OUT \
      --runs_dir=/tmp/hc_runs --models=resnet50,vgg16 --losses=huber,mse,mae \
      --batch_size=8 --time_budget_s=540

Reads an export made by `benchmarks/export_for_gpu.py` (the .npz and its
.folds.json beside it) and, model by model, trains every loss on every fold
in one fold-vmapped run (`hc_jax.train_folds`): 3 losses × 5 folds = 15
models per jitted step. The first epoch is timed and the number of epochs cut
to what fits in the time left (never more than --epochs); a model starts only
while --min_model_s remain, so later models (VGG16 after ResNet50) run only if
time remains. Rows trained for fewer than --protocol_epochs epochs (the
default config's 250) are labelled 'reduced'.

Leaves under --out: `summary.md` (the table, also printed), `summary.json`,
`predictions.csv` (every test image of every model, loss and fold) and
`runs.tar.gz`, the `--runs_dir` tree (`<model>_<loss>/fold<k>/` with
results.json, predictions_test.csv, metrics.jsonl, ...) that
`python -m hc_jax.grid --root=... --aggregate_only` reads once unpacked.

It is a GPU script: on a machine where JAX finds no accelerator it stops at
once (a missing CUDA set-up would otherwise spend the whole budget training
on the CPU), unless --allow_cpu. `--members_per_call=auto` (the default)
times the members vmapped (grouped convolutions) and one after another on
the first steps and trains on with the faster. A member whose loss diverges
is frozen and scored with the epoch selected before (noted in the summary).
"""

import argparse
import csv
import json
import os
import sys
import tarfile
import tempfile
import time

START = time.perf_counter()
# Run from a bare checkout too (the GPU machine has no `pip install -e .`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from hc_jax import device_augment
from hc_jax import metrics as metrics_lib
from hc_jax import train
from hc_jax import fold_data
from hc_jax import train_folds

PROTOCOL_EPOCHS = 250  # configs/default.py's num_epochs.


def pooled_rows(runs_dir: str, results: list[dict],
                protocol_epochs: int) -> list[dict]:
  """One summary row per (model, loss): test errors pooled over its folds."""
  rows = []
  keys = list(dict.fromkeys((r['model'], r['loss']) for r in results))
  for model, loss in keys:
    members = sorted((r for r in results
                      if (r['model'], r['loss']) == (model, loss)),
                     key=lambda r: r['fold'])
    predictions = []
    for r in members:
      path = os.path.join(runs_dir, f'{model}_{loss}', f'fold{r["fold"]}',
                          train.PREDICTIONS_FILE)
      with open(path) as f:
        predictions += list(csv.DictReader(f))
    errors = metrics_lib.hc_errors(
        [float(p['hc_px_true']) for p in predictions],
        [float(p['hc_px_pred']) for p in predictions],
        [float(p['pixel_size_mm']) for p in predictions])
    fold_mae = [r['test_mae_mm'] for r in members]
    rows.append({
        'model': model, 'loss': loss, 'dtype': members[0]['dtype'],
        'folds': [r['fold'] for r in members],
        'num_epochs': members[0]['num_epochs'],
        'reduced': members[0]['num_epochs'] < protocol_epochs,
        'selected_epochs': [r['selected_epoch'] for r in members],
        'val_mae_mm_mean': float(np.mean([r['val_mae_mm'] for r in members])),
        'fold_test_mae_mm_mean': float(np.mean(fold_mae)),
        'fold_test_mae_mm_sd': float(np.std(fold_mae)),
        **{f'test_{k}': v for k, v in errors.items()}})
  return rows


def format_table(rows: list[dict], protocol_epochs: int) -> str:
  """A Markdown table of the pooled rows."""
  lines = ['| model | loss | dtype | epochs | test MAE mm (pooled) | '
           'MAE px | PMAE % | bias mm | fold MAE mm | val MAE mm | images |',
           '|' + ' --- |' * 11]
  for r in rows:
    epochs = f'{r["num_epochs"]}' + (
        f' (reduced, of {protocol_epochs})' if r['reduced'] else '')
    lines.append(
        f'| {r["model"]} | {r["loss"]} | {r["dtype"]} | {epochs} | '
        f'{r["test_mae_mm"]:.2f} ± {r["test_mae_mm_std"]:.2f} | '
        f'{r["test_mae_px"]:.2f} ± {r["test_mae_px_std"]:.2f} | '
        f'{r["test_pmae"]:.2f} ± {r["test_pmae_std"]:.2f} | '
        f'{r["test_bias_mm"]:+.2f} | {r["fold_test_mae_mm_mean"]:.2f} ± '
        f'{r["fold_test_mae_mm_sd"]:.2f} | {r["val_mae_mm_mean"]:.2f} | '
        f'{r["test_num_images"]} |')
  return '\n'.join(lines)


def write_outputs(out: str, runs_dir: str, results: list[dict],
                  notes: list[str], settings: dict) -> list[dict]:
  """Writes summary.md/.json, predictions.csv and runs.tar.gz under `out`."""
  rows = pooled_rows(runs_dir, results, settings['protocol_epochs'])
  table = format_table(rows, settings['protocol_epochs'])
  with open(os.path.join(out, 'summary.md'), 'w') as f:
    f.write('# GPU grid: test folds pooled over the cross-validation\n\n'
            + table + '\n\n' + ''.join(f'- {note}\n' for note in notes))
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump({'settings': settings, 'rows': rows, 'members': results,
               'notes': notes}, f, indent=2)
  with open(os.path.join(out, 'predictions.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, ['model', 'loss', 'fold',
                                *metrics_lib.PREDICTION_COLUMNS])
    writer.writeheader()
    for r in results:
      path = os.path.join(runs_dir, f'{r["model"]}_{r["loss"]}',
                          f'fold{r["fold"]}', train.PREDICTIONS_FILE)
      with open(path) as p:
        for row in csv.DictReader(p):
          writer.writerow({'model': r['model'], 'loss': r['loss'],
                           'fold': r['fold'], **row})
  with tarfile.open(os.path.join(out, 'runs.tar.gz'), 'w:gz') as tar:
    tar.add(runs_dir, arcname='runs')
  print(table)
  for note in notes:
    print(note)
  print(f'wrote {out}/summary.md, summary.json, predictions.csv, runs.tar.gz',
        flush=True)
  return rows


def _per_call(value: str):
  if value == train_folds.AUTO:
    return value
  try:
    return int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"an int >= 0 or '{train_folds.AUTO}', not {value!r}") from None


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', required=True, help='the export .npz')
  parser.add_argument('--folds', default='',
                      help='fold assignment JSON; default: the .folds.json '
                      'beside --data')
  parser.add_argument('--out', required=True)
  parser.add_argument('--runs_dir', default='',
                      help='the per-fold workdirs (packed into '
                      'OUT/runs.tar.gz); default: a new temporary directory')
  parser.add_argument('--models', default='resnet50,vgg16')
  parser.add_argument('--losses', default='huber,mse,mae')
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'),
                      help='compute dtype of ResNet50 (others stay float32)')
  parser.add_argument('--epochs', type=int, default=PROTOCOL_EPOCHS,
                      help='most epochs per run; the budget may cut them')
  parser.add_argument('--protocol_epochs', type=int, default=PROTOCOL_EPOCHS,
                      help='fewer epochs than this are labelled reduced')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--eval_batch_size', type=int, default=64)
  parser.add_argument('--learning_rate', type=float, default=1e-3)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--time_budget_s', type=float, default=540.0,
                      help='for the whole script, from its start')
  parser.add_argument('--min_model_s', type=float, default=90.0,
                      help='start another model only with this much left')
  parser.add_argument('--members_per_call', type=_per_call, default='auto',
                      help="members per vmapped model call: 0 all, 1 one "
                      "after another (no grouped convolutions), k chunks, "
                      "'auto' the faster of 0 and 1 timed on the first steps")
  parser.add_argument('--allow_cpu', action='store_true',
                      help='run even where JAX has no accelerator (tests)')
  parser.add_argument('--one_loss_at_a_time', action='store_true',
                      help='one vmapped run per loss (5 members) instead of '
                      'one for all losses')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  folds_path = args.folds or (args.data[:-len('.npz')] + '.folds.json'
                              if args.data.endswith('.npz') else '')
  for path in (args.data, folds_path):
    if not os.path.isfile(path):
      sys.exit(f'gpu_grid: {path or "--folds"} not found (make it with '
               'benchmarks/export_for_gpu.py)')
  try:
    train_folds.require_accelerator(args.allow_cpu)
  except RuntimeError as error:
    sys.exit(f'gpu_grid: {error}')
  import jax  # pylint: disable=import-outside-toplevel
  os.makedirs(args.out, exist_ok=True)
  runs_dir = args.runs_dir or tempfile.mkdtemp(prefix='hc_jax_gpu_runs_')
  os.makedirs(runs_dir, exist_ok=True)
  losses = tuple(args.losses.split(','))

  def config_for(model, group, time_budget_s):
    return train_folds.FoldsConfig(
        model=model, losses=group, dtype=args.dtype, num_epochs=args.epochs,
        batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        learning_rate=args.learning_rate, seed=args.seed,
        augment=device_augment.AugmentConfig(), time_budget_s=time_budget_s,
        members_per_call=args.members_per_call)

  try:  # Every setting checked before anything is compiled.
    data = fold_data.load(args.data, folds_path)
    for model in args.models.split(','):
      train_folds.check_config(config_for(model, losses, None),
                               data.assignment.num_folds)
    fold_data.Members(data, losses, None, args.batch_size)
  except ValueError as error:
    sys.exit(f'gpu_grid: {error}')
  print(f'{len(data.arrays["images"])} images at {data.image_size}x'
        f'{data.image_size}, {data.assignment.num_folds} folds; '
        f'{jax.devices()[0].device_kind}; budget {args.time_budget_s:.0f} s, '
        f'{time.perf_counter() - START:.0f} s spent loading', flush=True)
  deadline = START + args.time_budget_s - 10.0  # Kept for writing the outputs.
  loss_groups = [(loss,) for loss in losses] if args.one_loss_at_a_time else [
      losses]
  settings = {**vars(args), 'folds': folds_path, 'runs_dir': runs_dir,
              'device': jax.devices()[0].device_kind}
  results, skipped = [], []

  def notes():
    reduced = sorted({f'{r["model"]}_{r["loss"]}' for r in results
                      if r['num_epochs'] < args.protocol_epochs})
    diverged = [f'DIVERGED: {r["model"]} {r["loss"]} fold {r["fold"]} in '
                f'epoch {r["diverged_epoch"]}, scored with epoch '
                f'{r["selected_epoch"]} (selected on validation before; 0 is '
                'the initial weights)' for r in results
                if r.get('diverged_epoch')]
    return skipped + diverged + ([
        f'REDUCED: {", ".join(reduced)} trained for fewer than the '
        f"protocol's {args.protocol_epochs} epochs (time budget "
        f'{args.time_budget_s:.0f} s or --epochs={args.epochs}).'
    ] if reduced else []) + [
        f'{jax.devices()[0].device_kind}, jax {jax.__version__}; '
        f'{time.perf_counter() - START:.0f} s in all.']

  for model in args.models.split(','):
    for i, group in enumerate(loss_groups):
      left = deadline - time.perf_counter()
      if left < args.min_model_s:
        skipped.append(f'{model} {"/".join(group)}: not run, '
                       f'{max(left, 0):.0f} s left (< --min_model_s='
                       f'{args.min_model_s:.0f})')
        print(skipped[-1], flush=True)
        continue
      config = config_for(model, group, left / (len(loss_groups) - i))
      try:
        results += train_folds.train_and_evaluate(config, data, runs_dir)
      except FloatingPointError as error:  # The next model may still run.
        skipped.append(f'{model} {"/".join(group)}: stopped, {error}')
        print(skipped[-1], flush=True)
        continue
      # After every run, so a run cut short still leaves what was done.
      write_outputs(args.out, runs_dir, results, notes(), settings)
  if not results:
    sys.exit('gpu_grid: nothing was trained within the budget')
  if skipped:  # Record what did not run.
    write_outputs(args.out, runs_dir, results, notes(), settings)


if __name__ == '__main__':
  main()
