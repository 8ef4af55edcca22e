"""Training from HC values alone and on a researcher's own folder + CSV.

A copy of the phantom HC18 set without its annotation files trains the
label-only dense model end to end, and refuses a config that needs outlines
in one line; a folder of PNG and JPEG scans with a CSV trains it, with every
bad row listed; a run fine-tunes from a shipped model's member.
"""

import csv
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from conftest import tiny_mask_config
from hc_jax import workdir as workdir_lib
from hc_jax.data import folder as folder_lib
from hc_jax.data import hc18
from hc_jax.training import train


def _label_only(hc18_dir, cache_dir):
  """configs/hcnet_mask_label.py shrunk to seconds."""
  return tiny_mask_config('hcnet_mask_label', hc18_dir, cache_dir)


@pytest.fixture(scope='module')
def without_annotations(phantom_hc18, tmp_path_factory):
  """The phantom HC18 copy with every `_Annotation.png` removed."""
  root = str(tmp_path_factory.mktemp('no_annotations') / 'hc18')
  shutil.copytree(phantom_hc18[0], root)
  removed = 0
  for name in os.listdir(os.path.join(root, 'training_set')):
    if name.endswith(hc18.ANNOTATION_SUFFIX):
      os.remove(os.path.join(root, 'training_set', name))
      removed += 1
  assert removed == 60
  return root


def test_label_only_model_trains_without_annotation_files(
    without_annotations, tmp_path):
  config = _label_only(without_annotations, str(tmp_path / 'cache'))
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  assert np.isfinite(results['test_mae_mm']) and results['test_num_images'] > 0
  with open(os.path.join(workdir, workdir_lib.PREDICTIONS_FILE)) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == results['test_num_images']


def test_a_config_that_needs_outlines_says_so_in_one_line(
    without_annotations, tmp_path):
  config = _label_only(without_annotations, str(tmp_path / 'cache'))
  config.mask_loss.bce = config.mask_loss.dice = 1.0  # configs/hcnet_mask.py
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(error.value)
  assert '\n' not in message
  assert 'reference outline' in message
  assert 'configs/hcnet_mask_label.py' in message
  assert not os.path.exists(tmp_path / 'run' / workdir_lib.RESULTS_FILE)


def _folder(phantom_root, out, jpeg_every=3, subject=True):
  """The phantom training scans as a folder data set: some PNG, some JPEG,
  in a subfolder, with labels.csv (and a subject column)."""
  os.makedirs(os.path.join(out, 'scans'), exist_ok=True)
  with open(os.path.join(phantom_root, hc18.SPLITS['train'][1])) as f:
    rows = list(csv.reader(f))[1:]
  with open(os.path.join(out, 'labels.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['File name', 'Pixel size (mm)', 'HC (mm)'] +
                    (['Subject'] if subject else []))
    for i, (name, pixel_size, hc_mm) in enumerate(rows):
      source = os.path.join(phantom_root, 'training_set', name)
      if i % jpeg_every == 0:
        target = 'scans/' + name.replace('.png', '.jpg')
        Image.open(source).save(os.path.join(out, target), quality=95)
      else:
        target = 'scans/' + name
        shutil.copy(source, os.path.join(out, target))
      writer.writerow([target, pixel_size, hc_mm] +
                      ([f'patient-{name.split("_")[0]}'] if subject else []))
  return out


def test_a_folder_with_a_csv_trains_the_label_only_model(phantom_hc18,
                                                         tmp_path):
  directory = _folder(phantom_hc18[0], str(tmp_path / 'mine'))
  config = _label_only('', str(tmp_path / 'cache'))
  config.data.source = 'folder'
  config.data.folder = directory
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  assert np.isfinite(results['test_mae_mm'])
  with open(os.path.join(workdir, workdir_lib.FOLDS_FILE)) as f:
    folds = json.load(f)
  assert folds['named_subjects'] is False
  names = {image['filename'] for image in folds['images']}
  assert 'scans/000_HC.jpg' in names and len(names) == 60
  # The subject column groups: one subject, one fold.
  by_subject = {}
  for image in folds['images']:
    by_subject.setdefault(image['subject_id'], set()).add(image['fold'])
  assert all(len(f) == 1 for f in by_subject.values())


def test_folder_scans_are_read_as_the_same_pixels(phantom_hc18, tmp_path):
  directory = _folder(phantom_hc18[0], str(tmp_path / 'mine'), jpeg_every=1000)
  records, notes = folder_lib.scan(directory)
  sources = folder_lib.sources(directory)
  assert not notes
  assert len(records) == 60 and len(sources) == 61
  png = records[1]
  original, _ = hc18.read_grayscale(os.path.join(
      phantom_hc18[0], 'training_set', os.path.basename(png.filename)))
  np.testing.assert_array_equal(folder_lib.read_image(png.image_path)[0],
                                original)
  assert all(r.ellipse is None for r in records)


def test_every_bad_row_of_a_folder_is_listed(phantom_hc18, tmp_path):
  directory = _folder(phantom_hc18[0], str(tmp_path / 'mine'), subject=False)
  path = os.path.join(directory, 'labels.csv')
  with open(path) as f:
    rows = list(csv.reader(f))
  rows[2][1] = 'abc'  # A pixel size that is no number.
  rows[3][0] = 'scans/nowhere.png'  # A missing scan (and its own unlisted).
  rows.append(rows[4])  # A repeated filename.
  rows[5][2] = '-3'  # A negative HC.
  with open(path, 'w', newline='') as f:
    csv.writer(f).writerows(rows)
  with open(os.path.join(directory, 'scans', 'broken.png'), 'wb') as f:
    f.write(b'not an image')
  with pytest.raises(folder_lib.FolderError) as error:
    folder_lib.scan(directory)
  problems = error.value.problems
  text = '\n'.join(problems)
  assert "pixel size (mm) 'abc' is not a number" in text
  assert 'scans/nowhere.png' in text and 'image is missing' in text
  assert 'repeated filename' in text
  assert "'-3' is not a positive number" in text
  assert 'broken.png: a scan in the folder without a row' in text
  assert len(problems) == 6, problems  # The unlisted scan of row 3 too.


def test_a_folder_csv_without_the_needed_columns_is_refused(tmp_path):
  directory = tmp_path / 'mine'
  directory.mkdir()
  (directory / 'labels.csv').write_text('name,px\na.png,0.1\n')
  with pytest.raises(folder_lib.FolderError, match='names no column for '
                     'filename, pixel_size_mm, hc_mm'):
    folder_lib.scan(str(directory))


def test_without_a_subject_column_hc18_names_give_the_subjects(phantom_hc18,
                                                               tmp_path):
  directory = _folder(phantom_hc18[0], str(tmp_path / 'mine'), subject=False)
  records, notes = folder_lib.scan(directory)
  assert not notes
  assert records[0].subject_id == hc18.folds.parse_filename('000_HC.png')[0]
  # Other names: each scan a subject of its own, and a note says so.
  for name in os.listdir(os.path.join(directory, 'scans')):
    os.rename(os.path.join(directory, 'scans', name),
              os.path.join(directory, 'scans', 'x' + name))
  with open(os.path.join(directory, 'labels.csv')) as f:
    text = f.read().replace('scans/', 'scans/x')
  with open(os.path.join(directory, 'labels.csv'), 'w') as f:
    f.write(text)
  records, notes = folder_lib.scan(directory)
  assert len({r.subject_id for r in records}) == 60
  assert 'each scan is a subject of its own' in notes[0]


def _mask_label_config(directory, cache_dir):
  from configs import hcnet_mask_label  # pylint: disable=import-outside-toplevel
  config = hcnet_mask_label.get_config()
  config.data.source = 'folder'
  config.data.folder = directory
  config.data.cache_dir = cache_dir
  config.num_epochs = 1
  config.warmup_epochs = 0
  config.eval_batch_size = 8
  return config


def test_fine_tuning_starts_from_a_shipped_member(phantom_hc18, tmp_path):
  from hc_jax import archive  # pylint: disable=import-outside-toplevel
  from hc_jax.training import finetune  # pylint: disable=import-outside-toplevel
  from hc_jax.training import step  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  directory = _folder(phantom_hc18[0], str(tmp_path / 'mine'))
  config = _mask_label_config(directory, str(tmp_path / 'cache'))
  # The shipped network's weights at a quarter of its input's pixels (the
  # network takes any input size): the same parameters, a quicker run.
  config.image_size, config.image_width = 64, 96
  config.init_from = 'shipped:hcnet_mask:fold2'
  model = step.create_model(config)
  tx = step.create_optimizer(config, 10)
  state = step.create_train_state(config, model, jax.random.key(0), tx)
  tuned = finetune.load_into(state, config)
  shipped = archive.read('hcnet_mask')
  expected = shipped.variables(2, jax.eval_shape(
      lambda s: {'params': s.params, 'batch_stats': s.batch_stats}, state))
  for got, want in zip(jax.tree.leaves(tuned.params),
                       jax.tree.leaves(expected['params'])):
    np.testing.assert_array_equal(np.asarray(got), want)
  # The ensemble: the members' mean.
  config.init_from = 'shipped:hcnet_mask'
  mean = finetune.load_into(state, config)
  leaf = lambda s: np.asarray(s.params['logits']['kernel'])  # pylint: disable=unnecessary-lambda-assignment
  members = [shipped.variables(i, jax.eval_shape(
      lambda s: {'params': s.params, 'batch_stats': s.batch_stats}, state))
             for i in range(5)]
  np.testing.assert_allclose(
      leaf(mean), np.mean([m['params']['logits']['kernel'] for m in members],
                          0), rtol=1e-6)
  # And a run trains from it, end to end.
  config.init_from = 'shipped:hcnet_mask:fold2'
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert np.isfinite(results['test_mae_mm'])


@pytest.mark.parametrize('init_from, message', [
    ('shipped:nosuch', "no shipped model 'nosuch'"),
    ('shipped:hcnet_mask:fold9', "has no member 'fold9'"),
])
def test_fine_tuning_from_what_is_not_there_is_one_line(
    phantom_hc18, tmp_path, init_from, message):
  directory = _folder(phantom_hc18[0], str(tmp_path / 'mine'))
  config = _mask_label_config(directory, str(tmp_path / 'cache'))
  config.init_from = init_from
  with pytest.raises(ValueError, match=message) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert '\n' not in str(error.value)


def test_fine_tuning_another_network_is_refused(phantom_hc18, tmp_path):
  directory = _folder(phantom_hc18[0], str(tmp_path / 'mine'))
  config = _mask_label_config(directory, str(tmp_path / 'cache'))
  config.model_options.widths = (4, 8, 8, 8)
  config.init_from = 'shipped:hcnet_mask:fold0'
  with pytest.raises(ValueError, match='holds another network.*widths'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
