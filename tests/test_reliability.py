"""Refused commands change nothing; resumes, caches and checkpoints are checked.

Each test here drives a run into a state a researcher meets after a mistake
or a fault (a changed config, damaged or replaced files, a read-only or full
disk) and asserts that the command either goes on with the same result or
stops with one line and exit status 2, leaving the workdir as it was.
"""

import hashlib
import json
import os
import shutil

import pytest

from conftest import config_flags
from hc_jax import main as main_lib
from hc_jax import workdir as workdir_lib
from hc_jax.training import config_check
from hc_jax.training import train


def _tiny(phantom_hc18):
  """conftest's tiny_config, for module-scoped fixtures."""
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.data.hc18_dir, config.data.cache_dir = phantom_hc18
  config.image_size = 32
  config.num_epochs = 2
  config.batch_size = 8
  config.eval_batch_size = 8
  config.tune_malloc = False
  return config


def _tree(workdir) -> dict[str, str]:
  """Every file below `workdir` with a digest of its bytes."""
  found = {}
  for directory, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(directory, name)
      with open(path, 'rb') as f:
        found[os.path.relpath(path, workdir)] = hashlib.sha256(
            f.read()).hexdigest()
  return found


def _main(config, workdir, *flags) -> int:
  """`python -m hc_jax.main` in this process, on configs/default.py."""
  return main_lib.main(['--config=configs/default.py', f'--workdir={workdir}',
                        *config_flags(config), '--config.tune_malloc=False',
                        *flags])


def _one_error_line(err: str) -> str:
  lines = [line for line in err.splitlines() if line.strip()]
  assert lines and 'Traceback' not in err, err[-3000:]
  assert lines[-1].startswith('error: '), err[-3000:]
  assert not [line for line in lines if line.startswith('error: ')][:-1], err
  return lines[-1]


@pytest.fixture(scope='module')
def finished_run(phantom_hc18, tmp_path_factory):
  """A finished two-epoch run of the tiny config (a resume checkpoint after
  every epoch)."""
  config = _tiny(phantom_hc18)
  config.checkpoint_every_seconds = 0.0
  workdir = str(tmp_path_factory.mktemp('finished') / 'run')
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _copy(run, tmp_path, finished=True):
  config, workdir = run
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  if not finished:  # As if killed after its last epoch's checkpoint.
    os.remove(os.path.join(copy, workdir_lib.RESULTS_FILE))
  return config.copy_and_resolve_references(), copy


# A refused command writes nothing.


def _damage_every_latest(workdir):
  latest = os.path.join(workdir, 'checkpoints', 'latest')
  for step in os.listdir(latest):
    for directory, _, names in os.walk(os.path.join(latest, step)):
      for name in names:
        if name != 'hc_jax_manifest.json':
          with open(os.path.join(directory, name), 'ab') as f:
            f.write(b'\0')


@pytest.mark.parametrize('change, flags, message', [
    ('image_size', ['--config.image_size=48'], 'image_size=32 there, 48 now'),
    ('checkpoints', [], 'can be restored'),
])
def test_a_refused_rerun_of_a_finished_run_changes_nothing(
    finished_run, tmp_path, capsys, change, flags, message):
  config, workdir = _copy(finished_run, tmp_path)
  if change == 'checkpoints':
    _damage_every_latest(workdir)
  before = _tree(workdir)
  capsys.readouterr()
  assert _main(config, workdir, '--config.num_epochs=3', *flags) == 2
  assert message in _one_error_line(capsys.readouterr().err)
  assert _tree(workdir) == before
  assert not os.path.exists(os.path.join(workdir, '.lock'))


# Resuming with another config.


@pytest.mark.parametrize('flag, field', [
    ('--config.loss=mae', 'loss'),
    ('--config.learning_rate=0.01', 'learning_rate'),
    ('--config.augment.flip=False', 'augment.flip'),
    ('--config.seed=3', 'seed'),
])
def test_resuming_with_another_config_is_refused_naming_the_field(
    finished_run, tmp_path, capsys, flag, field):
  config, workdir = _copy(finished_run, tmp_path, finished=False)
  before = _tree(workdir)
  capsys.readouterr()
  assert _main(config, workdir, flag) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert 'was run with another config' in line and f'({field}=' in line, line
  assert _tree(workdir) == before


def test_resuming_may_change_the_fields_that_do_not_change_the_training(
    finished_run, tmp_path, capsys):
  config, workdir = _copy(finished_run, tmp_path, finished=False)
  assert _main(config, workdir, '--config.num_epochs=3',
               '--config.checkpoint_every_seconds=5',
               '--config.eval_batch_size=16', '--config.time_budget_s=600',
               '--config.data.pipeline=numpy') == 0
  assert 'resuming after epoch 2' in capsys.readouterr().out
  assert os.path.isfile(os.path.join(workdir, workdir_lib.RESULTS_FILE))


def test_a_cosine_schedule_keeps_its_num_epochs(tmp_path):
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.lr_schedule = 'cosine'
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  from hc_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  pipeline.save_json(os.path.join(workdir, workdir_lib.CONFIG_FILE),
                 {**config.to_dict(), 'source_digest': 'x'})
  config_check.check_resume(config, workdir)
  config.num_epochs += 10
  with pytest.raises(ValueError, match='num_epochs=250 there, 260 now.*'
                     'part of the schedule'):
    config_check.check_resume(config, workdir)
  config.lr_schedule = 'constant'
  with pytest.raises(ValueError, match=r"lr_schedule='cosine' there"):
    config_check.check_resume(config, workdir)


def test_a_removed_field_warns_and_an_old_run_with_it_resumes(tmp_path,
                                                              capsys):
  """`log_every_steps` (read by nothing): a config that sets it runs with a
  one-line warning; a run whose config.json has it (or lacks a field added
  since, `config_check.ADDED_FIELDS`) resumes."""
  from configs import default  # pylint: disable=import-outside-toplevel
  from hc_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.image_size = 32
  old = config.to_dict()
  old['log_every_steps'] = 50
  del old['mask_loss']['shape']
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  pipeline.save_json(os.path.join(workdir, workdir_lib.CONFIG_FILE), old)
  config_check.check_resume(config, workdir)
  config.log_every_steps = 20
  config_check.check_config(config)
  warnings = [line for line in capsys.readouterr().err.splitlines()
              if 'log_every_steps' in line]
  assert len(warnings) == 1 and 'no longer used' in warnings[0], warnings
  config_check.check_resume(config, workdir)
  config.mask_loss.shape = 0.5
  with pytest.raises(ValueError, match='mask_loss.shape'):
    config_check.check_resume(config, workdir)


# Config validation: every field, before any work.


@pytest.mark.parametrize('flag, message', [
    ('--config.model_options.widths=(0,0,0,0,0)', 'model_options.widths must'),
    ('--config.learning_rate=nan', 'learning_rate must be a finite number > 0'),
    ('--config.checkpoint_every_seconds=nan',
     'checkpoint_every_seconds must be a number >= 0'),
    ('--config.huber_delta=-1', 'huber_delta must be a finite number > 0'),
    ('--config.seed=-1', 'seed must be an integer in [0, 2**63)'),
    ('--config.image_size=7', 'cannot take a 7x7 input (image_size=7'),
    ('--config.time_budget_s=inf', 'time_budget_s must be a finite number'),
    ('--config.val_fraction=1.0', 'val_fraction must be a finite number >= 0 '
     'and < 1'),
    ('--config.model_options.head=conv', 'model_options.head must be one of'),
    ('--config.data.pipeline=torch', 'data.pipeline must be one of auto'),
])
def test_a_bad_config_field_is_one_line_before_any_work(
    phantom_hc18, tmp_path, capsys, flag, message):
  cache = tmp_path / 'cache'
  workdir = tmp_path / 'run'
  status = main_lib.main([
      '--config=configs/hcnet_label.py', f'--workdir={workdir}',
      f'--config.data.hc18_dir={phantom_hc18[0]}',
      f'--config.data.cache_dir={cache}', '--config.tune_malloc=False', flag])
  captured = capsys.readouterr()
  assert status == 2
  assert message in _one_error_line(captured.err)
  assert not cache.exists() and not workdir.exists()  # Nothing prepared.
  assert 'compiling' not in captured.out


def test_every_field_of_every_config_has_a_rule_it_passes():
  import glob  # pylint: disable=import-outside-toplevel
  import importlib  # pylint: disable=import-outside-toplevel
  paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), '..',
                                        'configs', '*.py')))
  names = [os.path.basename(p)[:-3] for p in paths
           if not os.path.basename(p).startswith('_')]
  assert 'default' in names and 'hcnet_mask' in names
  for name in names:
    config = importlib.import_module(f'configs.{name}').get_config()
    for key, value in workdir_lib.flatten(config.to_dict()).items():  # pylint: disable=protected-access
      rule = config_check.field_rule(key, config.model)
      assert rule is not None, f'configs/{name}.py: {key} has no rule'
      assert rule.test(value), f'configs/{name}.py: {key}={value!r}'
    config_check.check_config(config)


@pytest.mark.parametrize('field, value, message', [
    ('num_epoch', 3,
     "no config field 'num_epoch' — did you mean 'num_epochs'?"),
    ('data.hc18dir', '',
     "no config field 'data.hc18dir' — did you mean 'data.hc18_dir'?"),
    ('model_options.widht', (8, 8, 8, 8, 8),
     "model 'hcnet_mask' has no option 'widht' — did you mean "
     "'model_options.widths'?"),
    ('model_options.dtype', 'float32',
     "model 'hcnet_mask' has no option 'dtype'"),
])
def test_an_unknown_field_is_one_line_naming_the_nearest(field, value,
                                                         message):
  from configs import hcnet_mask  # pylint: disable=import-outside-toplevel
  config = hcnet_mask.get_config()
  group, _, name = field.rpartition('.')
  (config[group] if group else config)[name] = value
  with pytest.raises(ValueError) as error:
    config_check.check_config(config)
  assert message in str(error.value) and '\n' not in str(error.value)


def test_the_field_rules_come_from_the_default_config_and_the_models(
    monkeypatch):
  """Every field of configs/default.py and every option of every model has
  a rule by its type; a model's new option is checked with no rule added."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel
  from hc_jax import models  # pylint: disable=import-outside-toplevel
  fields = workdir_lib.flatten(default.get_config().to_dict())
  assert set(config_check.default_fields()) == set(fields)
  for key in fields:
    assert config_check.field_rule(key).what != 'anything', key
  for name in models.MODELS:
    for option in config_check.model_options(name):
      rule = config_check.field_rule(f'model_options.{option}', name)
      assert rule.what != 'anything', (name, option)

  @dataclasses.dataclass
  class Tiny:
    depth: int = 2
    gain: float = 1.0

  monkeypatch.setitem(models.MODELS, 'tiny', Tiny)
  depth = config_check.field_rule('model_options.depth', 'tiny')
  assert depth.what == 'an integer >= 0' and not depth.test(-1)
  assert config_check.field_rule('model_options.gain', 'tiny').test(0.5)
  assert config_check.field_rule('model_options.depth', 'hcnet') is None


@pytest.mark.parametrize('value', [True, '3', None, float('nan'), -1, 2.5])
def test_an_integer_field_takes_only_integers_in_range(value):
  rule = config_check.field_rule('num_epochs')
  assert rule.test(3)
  assert not rule.test(value)


# The prepared-data cache: damaged or rewritten files are prepared again.


def _cached_npz(cache_dir):
  found = [os.path.join(d, n) for d, _, names in os.walk(cache_dir)
           for n in names if n.startswith('prepared_') and n.endswith('.npz')]
  assert len(found) == 1, found
  return found[0]


def _flip_byte(path, where):
  with open(path, 'r+b') as f:
    f.seek(where)
    byte = f.read(1)
    f.seek(where)
    f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize('damage', ['truncated', 'flipped_byte', 'rewritten'])
def test_a_damaged_or_rewritten_cache_is_prepared_again(phantom_hc18, tmp_path,
                                                        capsys, damage):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from hc_jax.data import cache as cache_lib  # pylint: disable=import-outside-toplevel
  root, cache = phantom_hc18[0], str(tmp_path / 'cache')
  arrays, info = cache_lib.prepare(root, (32, 32), 'stretch', cache)
  path = _cached_npz(cache)
  size = os.path.getsize(path)
  if damage == 'truncated':
    os.truncate(path, size // 2)
  elif damage == 'flipped_byte':
    _flip_byte(path, size // 2)
  else:  # Self-consistent, with the info (and digest) of the original.
    forged = dict(arrays, hc_px=np.ones_like(arrays['hc_px']))
    np.savez(path, info=np.asarray(json.dumps(info)), **forged)
  capsys.readouterr()
  again, _ = cache_lib.prepare(root, (32, 32), 'stretch', cache)
  err = capsys.readouterr().err
  warnings = [line for line in err.splitlines() if line.startswith('warning')]
  assert len(warnings) == 1 and path in warnings[0], err
  assert 'preparing it again' in warnings[0]
  for name in cache_lib.ARRAY_FIELDS:
    np.testing.assert_array_equal(again[name], arrays[name])
  capsys.readouterr()
  cache_lib.prepare(root, (32, 32), 'stretch', cache)  # Repaired: no warning.
  assert 'warning' not in capsys.readouterr().err


def _cut_after_first_record(path):
  """Truncates a TFRecord file just after its first record (length, its
  CRC, data, its CRC): what is left reads without error."""
  import struct  # pylint: disable=import-outside-toplevel
  with open(path, 'rb') as f:
    length, = struct.unpack('<Q', f.read(8))
  os.truncate(path, 8 + 4 + length + 4)


@pytest.fixture(scope='module')
def tfds_build(phantom_hc18, tmp_path_factory):
  """`(arrays, cache)`: the phantoms prepared once at 32x32 into `cache`,
  its arrays file removed (as for another input size: read the build)."""
  from hc_jax.data import cache as cache_lib  # pylint: disable=import-outside-toplevel
  cache = str(tmp_path_factory.mktemp('tfds_build') / 'cache')
  arrays, _ = cache_lib.prepare(phantom_hc18[0], (32, 32), 'stretch', cache)
  os.remove(_cached_npz(cache))
  return arrays, cache


@pytest.mark.parametrize('damage', ['flipped_byte', 'removed',
                                    'cut_after_a_record'])
def test_a_damaged_tfds_build_is_built_again(phantom_hc18, tfds_build,
                                             tmp_path, capsys, damage):
  import shutil  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from hc_jax.data import cache as cache_lib  # pylint: disable=import-outside-toplevel
  root, cache = phantom_hc18[0], str(tmp_path / 'cache')
  arrays = tfds_build[0]
  shutil.copytree(tfds_build[1], cache)  # A copy of the build to damage.
  records = [os.path.join(d, n) for d, _, names in os.walk(cache)
             for n in names if n.startswith('hc18-train.tfrecord')]
  assert len(records) == 1, records
  if damage == 'flipped_byte':
    _flip_byte(records[0], os.path.getsize(records[0]) // 2)
  elif damage == 'removed':
    os.remove(records[0])
  else:
    _cut_after_first_record(records[0])
  capsys.readouterr()
  again, _ = cache_lib.prepare(root, (32, 32), 'stretch', cache)
  err = capsys.readouterr().err
  warnings = [line for line in err.splitlines() if line.startswith('warning')]
  assert len(warnings) == 1 and 'building it again' in warnings[0], err
  for name in cache_lib.ARRAY_FIELDS:
    np.testing.assert_array_equal(again[name], arrays[name])


# The cache is keyed by the source's content.


def _png_of_size(image, size: int) -> bytes:
  """`image` as a PNG of exactly `size` bytes (a tEXt chunk pads it)."""
  import io  # pylint: disable=import-outside-toplevel
  import struct  # pylint: disable=import-outside-toplevel
  import zlib  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG', optimize=True)
  data = buffer.getvalue()
  pad = size - len(data) - 12  # A chunk: length, type, data, CRC.
  assert pad >= 1, (len(data), size)
  body = b'tEXt' + b'x\0' + b'p' * (pad - 2)
  chunk = struct.pack('>I', pad) + body + struct.pack(
      '>I', zlib.crc32(body) & 0xFFFFFFFF)
  end = data.rindex(b'IEND') - 4
  return data[:end] + chunk + data[end:]


@pytest.fixture
def hc18_copy(phantom_hc18, tmp_path):
  copy = str(tmp_path / 'hc18')
  shutil.copytree(phantom_hc18[0], copy)
  return copy


def _first_scan(root):
  return sorted(n for n in os.listdir(os.path.join(root, 'training_set'))
                if n.endswith('HC.png'))[0]


def test_an_image_corrupted_in_place_is_checked_again(hc18_copy, tmp_path):
  from hc_jax.data import cache as cache_lib  # pylint: disable=import-outside-toplevel
  from hc_jax.data import digests  # pylint: disable=import-outside-toplevel
  from hc_jax.data import hc18  # pylint: disable=import-outside-toplevel
  cache = str(tmp_path / 'cache')
  cache_lib.prepare(hc18_copy, (32, 32), 'stretch', cache)
  name = _first_scan(hc18_copy)
  path = os.path.join(hc18_copy, 'training_set', name)
  digest = digests.source_digest(hc18_copy)
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:  # Same name, same size, broken data.
    f.seek(size // 2)
    f.write(b'\0' * 64)
  assert digests.source_digest(hc18_copy) == digest  # Names and sizes only.
  with pytest.raises(hc18.HC18Error) as error:
    cache_lib.prepare(hc18_copy, (32, 32), 'stretch', cache)
  assert name in str(error.value)


def test_an_image_replaced_by_another_of_the_same_size_is_prepared_anew(
    hc18_copy, tmp_path, monkeypatch):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from hc_jax.data import cache as cache_lib  # pylint: disable=import-outside-toplevel
  from hc_jax.data import digests  # pylint: disable=import-outside-toplevel
  from hc_jax.data import hc18  # pylint: disable=import-outside-toplevel
  cache = str(tmp_path / 'cache')
  before, info = cache_lib.prepare(hc18_copy, (32, 32), 'stretch', cache)
  name = _first_scan(hc18_copy)
  path = os.path.join(hc18_copy, 'training_set', name)
  image, _ = hc18.read_grayscale(path)
  replacement = _png_of_size(np.ascontiguousarray(image[::-1]),
                             os.path.getsize(path))
  with open(path, 'wb') as f:
    f.write(replacement)
  assert digests.source_digest(hc18_copy) == info['source_digest']
  after, new_info = cache_lib.prepare(hc18_copy, (32, 32), 'stretch', cache)
  assert new_info['content_digest'] != info['content_digest']
  row = list(after['filename']).index(name)
  assert not np.array_equal(after['images'][row], before['images'][row])
  fresh, _ = cache_lib.prepare(hc18_copy, (32, 32), 'stretch',
                               str(tmp_path / 'fresh'))
  np.testing.assert_array_equal(after['images'], fresh['images'])
  # Unchanged files are hashed once: the next digest reads none of them.
  read = []
  original = digests._sha256_file  # pylint: disable=protected-access
  monkeypatch.setattr(digests, '_sha256_file',
                      lambda p: read.append(p) or original(p))
  assert digests.content_digest(
      hc18_copy, os.path.join(cache, digests.HASHES_FILE)) == \
      new_info['content_digest']
  assert not read


# Checkpoints without their manifest are not used.


def test_a_newest_checkpoint_without_manifest_is_not_used(tmp_path, capsys):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from hc_jax.training import checkpoint  # pylint: disable=import-outside-toplevel
  from hc_jax.training import manifest  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / 'run')
  ckpt = checkpoint.Checkpoints(workdir)
  for epoch in (1, 2):
    ckpt.save(epoch, {'w': np.full(4, epoch, np.float32)},
              {'epoch': epoch, 'best': {'epoch': epoch}}, is_best=False)
  newest = os.path.join(workdir, 'checkpoints', 'latest', '2')
  os.remove(os.path.join(newest, manifest.MANIFEST_FILE))
  capsys.readouterr()
  state, progress = checkpoint.Checkpoints(workdir).restore_latest(
      {'w': np.zeros(4, np.float32)})
  assert progress['epoch'] == 1 and state['w'].tolist() == [1.0] * 4
  err = [line for line in capsys.readouterr().err.splitlines() if line]
  assert len(err) == 1 and 'epoch 2' in err[0] and 'resuming from epoch 1' in \
      err[0], err
  os.remove(os.path.join(workdir, 'checkpoints', 'latest', '1',
                         manifest.MANIFEST_FILE))
  state, progress = checkpoint.Checkpoints(workdir).restore_latest(
      {'w': np.zeros(4, np.float32)})
  assert progress == {} and state['w'].tolist() == [0.0] * 4
  assert 'starting over' in capsys.readouterr().err


# A read-only, full or vanishing disk: one line and exit status 2.


def _read_only(monkeypatch, directory):
  """Makes `directory` act as on a read-only file system (chmod would not
  stop root): every write, creation, removal or rename below it raises
  OSError(EROFS) naming the path, as the kernel would."""
  import builtins  # pylint: disable=import-outside-toplevel
  import errno  # pylint: disable=import-outside-toplevel
  top = os.path.abspath(directory)

  def under(path):
    if isinstance(path, int):
      return False
    path = os.path.abspath(os.fsdecode(path))
    return path == top or path.startswith(top + os.sep)

  def refuse(path):
    raise OSError(errno.EROFS, 'Read-only file system', os.fsdecode(path))

  def guard(original, writes=lambda *args, **kwargs: True):
    def guarded(path, *args, **kwargs):
      if under(path) and writes(path, *args, **kwargs):
        refuse(path)
      return original(path, *args, **kwargs)
    return guarded

  write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
  monkeypatch.setattr(os, 'open', guard(
      os.open, lambda path, flags, *a, **k: flags & write_flags))
  monkeypatch.setattr(builtins, 'open', guard(
      builtins.open, lambda path, mode='r', *a, **k: set(mode) & set('wax+')))
  monkeypatch.setattr(os, 'mkdir', guard(
      os.mkdir, lambda path, *a, **k: not os.path.isdir(path)))
  for name in ('remove', 'unlink', 'rmdir'):
    monkeypatch.setattr(os, name, guard(getattr(os, name)))
  for name in ('rename', 'replace'):
    original = getattr(os, name)
    def moved(source, target, *args, _original=original, **kwargs):
      if under(source) or under(target):
        refuse(target)
      return _original(source, target, *args, **kwargs)
    monkeypatch.setattr(os, name, moved)


def test_a_read_only_workdir_of_an_unfinished_run_is_one_line(
    finished_run, tmp_path, capsys, monkeypatch):
  config, workdir = _copy(finished_run, tmp_path, finished=False)
  before = _tree(workdir)
  _read_only(monkeypatch, workdir)
  capsys.readouterr()
  assert _main(config, workdir) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert os.path.join(workdir, '.lock') in line and 'read-only' in line, line
  monkeypatch.undo()
  assert _tree(workdir) == before


def test_a_lock_that_cannot_be_written_names_its_file(tmp_path, monkeypatch):
  import errno  # pylint: disable=import-outside-toplevel
  from hc_jax.training import lock  # pylint: disable=import-outside-toplevel

  def full(*args):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(lock.os, 'write', full)
  with pytest.raises(OSError) as error:
    lock.WorkdirLock(str(tmp_path)).acquire()
  assert error.value.errno == errno.ENOSPC
  assert error.value.filename == str(tmp_path / workdir_lib.LOCK_FILE)
  assert not os.listdir(tmp_path)


def test_a_read_only_cache_is_one_line_naming_it(phantom_hc18, tmp_path,
                                                  capsys, monkeypatch):
  config = _tiny(phantom_hc18)
  cache = tmp_path / 'cache'
  cache.mkdir()
  config.data.cache_dir = str(cache)
  workdir = str(tmp_path / 'run')
  _read_only(monkeypatch, cache)
  capsys.readouterr()
  assert _main(config, workdir) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert f'in the cache {cache} (--config.data.cache_dir)' in line, line
  assert 'the file system is read-only' in line, line
  monkeypatch.undo()
  assert not os.listdir(cache) and not os.path.exists(workdir)


def test_a_cache_removed_while_preparing_is_one_line_then_prepared_again(
    phantom_hc18, tmp_path, capsys, monkeypatch):
  from hc_jax.data import hc18_tfds  # pylint: disable=import-outside-toplevel
  config = _tiny(phantom_hc18)
  cache = tmp_path / 'cache'
  config.data.cache_dir = str(cache)
  workdir = str(tmp_path / 'run')
  original = hc18_tfds.Hc18._generate_examples  # pylint: disable=protected-access

  def removed_midway(self, records):
    for i, example in enumerate(original(self, records)):
      if i == 5:
        shutil.rmtree(cache)
      yield example

  monkeypatch.setattr(hc18_tfds.Hc18, '_generate_examples', removed_midway)
  capsys.readouterr()
  assert _main(config, workdir) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert f'in the cache {cache}' in line, line
  assert 'removed while the command ran' in line, line
  monkeypatch.undo()
  assert _main(config, workdir) == 0  # The same command again prepares it.
  assert os.path.isfile(os.path.join(workdir, workdir_lib.RESULTS_FILE))
