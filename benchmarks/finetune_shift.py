"""Fine-tuning a shipped model on a few scans of another machine: error
against the number of scans and the minutes on one core.

  python -m hc_jax.shifted --out=/data/hc18_other_machine
  python benchmarks/finetune_shift.py --shifted=/data/hc18_other_machine \
      --out=runs/finetune_shift [--sizes=25,50,100,200] [--fold=0]

The shifted copy (hc_jax/data/shift.py) keeps HC18's names, HC values and
folds. The shipped member `fold<k>` never saw fold k's scans, so fold k's
shifted scans are its test set; the scans to fine-tune on are drawn from
the other folds (the member's own training part, seen by it only as the
first machine showed them): the subjects in a seeded random order, the
first N scans, so that each set holds the smaller ones. Each N fine-tunes
`configs/hcnet_mask_label.py` (HC values only) from `shipped:<model>:fold<k>`
on those scans as a folder data set, with 10 internal folds (81 % of the N
train, 9 % choose the epoch; the internal test fold is not used), learning
rate 3e-4 and about STEPS optimiser steps; then the fine-tuned run predicts
fold k's 180 shifted scans and the MAE is taken against their HC. Before
any of it, the shipped member itself is scored on the same scans, shifted
and original. Each step is resumable: run the command again.

With `--pseudo_outlines` the fine-tuning keeps the mask terms
(`configs/hcnet_mask.py`) with outlines the shipped member draws itself: its
ellipse on each fine-tuning scan, scaled about its centre to the scan's
known HC (no outline from a person; a scan whose redrawn outline does not
give its HC within 1 mm, e.g. one cut by the border, trains the HC term
only).

Writes `<out>/summary.csv` (one row per N: scans, minutes of fine-tuning,
MAE mm) and prints it as a Markdown table.
"""

import argparse
import csv
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

STEPS = 400
LEARNING_RATE = 3e-4
INTERNAL_FOLDS = 10


def _reference(root):
  with open(os.path.join(root, 'training_set_pixel_size_and_HC.csv')) as f:
    rows = list(csv.reader(f))[1:]
  return {r[0]: (float(r[1]), float(r[2])) for r in rows}


def _assignment(root):
  from hc_jax.data import folds  # pylint: disable=import-outside-toplevel
  reference = _reference(root)
  names = sorted(reference)
  return folds.assign_folds(names, [reference[n][1] for n in names],
                            num_folds=5, val_fraction=0.1, seed=0)


def _write_set(root, names, out, reference):
  """A folder data set of `names` (copies of the shifted scans)."""
  if os.path.isfile(os.path.join(out, 'labels.csv')):
    return
  tmp = out + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with open(os.path.join(tmp, 'labels.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['filename', 'pixel_size_mm', 'hc_mm', 'subject'])
    for name in names:
      shutil.copy(os.path.join(root, 'training_set', name),
                  os.path.join(tmp, name))
      writer.writerow([name, repr(reference[name][0]), reference[name][1],
                       name.split('_')[0]])
  os.replace(tmp, out)


def _pseudo_outlines(data, out, member, log_path):
  """`data` (a folder data set) again in `out`, with an outline per scan
  from the shipped member's own ellipse scaled to the scan's HC."""
  # pylint: disable=import-outside-toplevel
  from PIL import Image
  from hc_jax.data import ellipse as ellipse_lib
  from hc_jax.data import phantom
  if os.path.isfile(os.path.join(out, 'labels.csv')):
    return
  predicted = os.path.join(out + '.predicted.csv')
  sizes = out + '.pixel_size.csv'
  with open(os.path.join(data, 'labels.csv'), newline='') as f, open(
      sizes, 'w', newline='') as g:
    writer = csv.writer(g)
    writer.writerow(['filename', 'pixel size(mm)'])
    writer.writerows([r['filename'], r['pixel_size_mm']]
                     for r in csv.DictReader(f))
  if not os.path.isfile(predicted):
    archive = os.path.join(REPO, 'hc_jax', 'shipped', member.split(':')[0] +
                           '.npz')
    _run([sys.executable, '-m', 'hc_jax.predict',
          f'--workdir={archive}:{member.split(":")[1]}', f'--images={data}',
          f'--pixel-sizes={sizes}', f'--out={predicted}', '--no-scan-check'],
         log_path, ok=(0, 1))
  with open(predicted, newline='') as f:
    ellipses = {r['filename']: r for r in csv.DictReader(f)}
  tmp = out + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with open(os.path.join(data, 'labels.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  kept = 0
  with open(os.path.join(tmp, 'labels.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['filename', 'pixel_size_mm', 'hc_mm', 'subject',
                     'annotation'])
    for row in rows:
      name = row['filename']
      shutil.copy(os.path.join(data, name), os.path.join(tmp, name))
      annotation = ''
      e = ellipses.get(name, {})
      if e.get('semi_axis_a_px'):
        a, b = float(e['semi_axis_a_px']), float(e['semi_axis_b_px'])
        hc_px = float(row['hc_mm']) / float(row['pixel_size_mm'])
        scale = hc_px / ellipse_lib.ramanujan_perimeter(a, b)
        with Image.open(os.path.join(data, name)) as image:
          width, height = image.size
        outline = phantom.draw_ellipse_outline(
            height, width, float(e['center_x_px']), float(e['center_y_px']),
            a * scale, b * scale, float(e['angle_rad']))
        try:
          fitted = ellipse_lib.fit_annotation(outline)
          if abs(fitted.perimeter_px - hc_px) * float(
              row['pixel_size_mm']) <= 1.0:
            annotation = name[:-len('.png')] + '_Annotation.png'
            Image.fromarray(outline).save(os.path.join(tmp, annotation))
            kept += 1
        except ValueError:
          pass
      writer.writerow([name, row['pixel_size_mm'], row['hc_mm'],
                       row['subject'], annotation])
  with open(log_path, 'a') as log:
    log.write(f'{out}: {kept} of {len(rows)} scans with a drawn outline\n')
  os.replace(tmp, out)


def _mae_of_predictions(path, reference):
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  errors = [abs(float(r['hc_mm']) - reference[r['filename']][1])
            for r in rows if r.get('hc_mm')]
  return sum(errors) / len(errors), len(errors)


def _run(command, log_path, ok=(0,)):
  with open(log_path, 'a') as log:
    log.write(f'== {" ".join(command)}\n')
    log.flush()
    status = subprocess.run(command, check=False, stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO).returncode
  if status not in ok:
    raise SystemExit(f'{command[2]} exited with {status}; see {log_path}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--shifted', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--hc18_dir', default='')
  parser.add_argument('--sizes', default='25,50,100,200')
  parser.add_argument('--fold', type=int, default=0)
  parser.add_argument('--model', default='hcnet_mask')
  parser.add_argument('--pseudo_outlines', action='store_true',
                      help='keep the mask terms, with the shipped member\'s '
                      'own ellipses scaled to the known HC as outlines')
  args = parser.parse_args()
  from hc_jax.data import hc18  # pylint: disable=import-outside-toplevel
  original = args.hc18_dir or hc18.default_dir()
  os.makedirs(args.out, exist_ok=True)
  log_path = os.path.join(args.out, 'log.txt')
  reference = _reference(args.shifted)
  split = _assignment(args.shifted).split(args.fold)
  test = split['test']
  # The test scans, shifted, as predict takes them.
  test_dir = os.path.join(args.out, 'test_shifted')
  if not os.path.isdir(test_dir):
    os.makedirs(test_dir + '.partial', exist_ok=True)
    with open(os.path.join(test_dir + '.partial', 'pixel_size.csv'), 'w',
              newline='') as f:
      writer = csv.writer(f)
      writer.writerow(['filename', 'pixel size(mm)'])
      for name in test:
        shutil.copy(os.path.join(args.shifted, 'training_set', name),
                    os.path.join(test_dir + '.partial', name))
        writer.writerow([name, repr(reference[name][0])])
    os.replace(test_dir + '.partial', test_dir)
  member = f'{args.model}:fold{args.fold}'
  rows = []
  for label, root in (('original', original), ('shifted', args.shifted)):
    path = os.path.join(args.out, f'shipped_{label}.csv')
    if not os.path.isfile(path):
      archive = os.path.join(REPO, 'hc_jax', 'shipped', args.model + '.npz')
      _run([sys.executable, '-m', 'hc_jax.cv_score',
            f'--runs={archive}:fold{args.fold}', f'--hc18_dir={root}',
            f'--out={path}'] + (['--shifted_copy'] if label == 'shifted'
                                else []), log_path)
    with open(path, newline='') as f:
      errors = [abs(float(r['error_mm'])) for r in csv.DictReader(f)]
    rows.append({'scans': 0, 'data': label, 'minutes': 0.0,
                 'mae_mm': sum(errors) / len(errors), 'images': len(errors)})
  pool = split['train'] + split['val']
  subjects = sorted({n.split('_')[0] for n in pool})
  random.Random(0).shuffle(subjects)
  ordered = [n for s in subjects for n in sorted(pool)
             if n.split('_')[0] == s]
  for size in [int(s) for s in args.sizes.split(',')]:
    names = ordered[:size]
    data = os.path.join(args.out, f'scans_{size}')
    _write_set(args.shifted, names, data, reference)
    tag = f'pseudo_{size}' if args.pseudo_outlines else f'{size}'
    config = 'configs/hcnet_mask_label.py'
    if args.pseudo_outlines:
      outlined = os.path.join(args.out, f'scans_{tag}')
      _pseudo_outlines(data, outlined, member, log_path)
      data, config = outlined, 'configs/hcnet_mask.py'
    run = os.path.join(args.out, f'run_{tag}')
    steps_per_epoch = max(1, int(size * 0.81) // 8)
    epochs = math.ceil(STEPS / steps_per_epoch)
    started = time.time()
    _run([sys.executable, '-m', 'hc_jax.main',
          f'--config={config}', f'--workdir={run}',
          '--config.data.source=folder', f'--config.data.folder={data}',
          f'--config.init_from=shipped:{member}',
          f'--config.num_folds={INTERNAL_FOLDS}',
          f'--config.learning_rate={LEARNING_RATE}',
          f'--config.num_epochs={epochs}', '--config.warmup_epochs=1'],
         log_path)
    with open(os.path.join(run, 'results.json')) as f:
      minutes = json.load(f).get('train_seconds', time.time() - started) / 60
    predictions = os.path.join(args.out, f'predictions_{tag}.csv')
    if not os.path.isfile(predictions):
      _run([sys.executable, '-m', 'hc_jax.predict', f'--workdir={run}',
            f'--images={test_dir}',
            f'--pixel-sizes={os.path.join(test_dir, "pixel_size.csv")}',
            f'--out={predictions}'], log_path, ok=(0, 1))  # 1: some flagged.
    mae, count = _mae_of_predictions(predictions, reference)
    rows.append({'scans': tag, 'data': 'shifted', 'minutes': minutes,
                 'mae_mm': mae, 'images': count})
  summary = 'summary_pseudo.csv' if args.pseudo_outlines else 'summary.csv'
  with open(os.path.join(args.out, summary), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  print('| fine-tuning scans | test scans | minutes (one core) | MAE mm |')
  print('| --- | --- | --- | --- |')
  for row in rows:
    print(f'| {row["scans"]} | {row["data"]} ({row["images"]}) | '
          f'{row["minutes"]:.1f} | {row["mae_mm"]:.2f} |')


if __name__ == '__main__':
  main()
