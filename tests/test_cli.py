"""The commands' shared plumbing: config errors in one line, quiet start-up."""

import errno
import logging
import os
import subprocess
import sys

from ml_collections import config_dict
import pytest

from conftest import REPO
from hc_jax import cli
from hc_jax import main as main_lib
from hc_jax.data import hc18

MSE_CONFIG = os.path.join('configs', 'cnn263k_mse.py')


def _load(overrides=(), path=MSE_CONFIG):
  return cli.load_config(os.path.join(REPO, path), overrides)


@pytest.mark.parametrize('overrides, message', [
    (['num_epoch=2'], "no field 'num_epoch' — did you mean 'num_epochs'?"),
    (['data.hc18_dirr=x'],
     "no field 'data.hc18_dirr' — did you mean 'data.hc18_dir'?"),
    (['dat.hc18_dir=x'], "no field 'dat' — did you mean 'data'?"),
    (['zzzzzz=1'], "no field 'zzzzzz'"),
    (['num_epochs.x=1'], "'num_epochs' is a value (int)"),
    (['num_epochs=three'], 'invalid literal'),
    (['num_epochs'], "override 'num_epochs' is not KEY=VALUE"),
])
def test_a_bad_override_is_one_line_naming_the_file(overrides, message):
  with pytest.raises(cli.UsageError) as error:
    _load(overrides)
  text = str(error.value)
  assert text.startswith(os.path.join(REPO, MSE_CONFIG) + ': ')
  assert message in text
  assert '\n' not in text


def test_a_missing_config_file_is_one_line():
  with pytest.raises(cli.UsageError, match=r'^configs/no_such\.py: config '
                     r'file not found \(the configs in configs/: [^\n]*\)$'):
    cli.load_config('configs/no_such.py')


def test_a_broken_config_file_is_one_line(tmp_path):
  path = tmp_path / 'configs' / 'broken.py'
  path.parent.mkdir()
  path.write_text('def get_config():\n  return undefined_name\n')
  with pytest.raises(cli.UsageError, match='NameError') as error:
    cli.load_config(str(path))
  assert '\n' not in str(error.value)


def test_overrides_are_parsed_by_type_and_the_config_stays_locked():
  config = _load(['num_epochs=3', 'learning_rate=1e-4', 'augment.flip=false',
                  'augment.scale_range=(0.9, 1.1)', 'data.cache_dir=/x'])
  assert (config.loss, config.num_epochs, config.learning_rate) == (
      'mse', 3, 1e-4)
  assert config.augment.flip is False
  assert tuple(config.augment.scale_range) == (0.9, 1.1)
  assert config.data.cache_dir == '/x'
  assert isinstance(config, config_dict.ConfigDict)
  with pytest.raises(AttributeError):
    config.num_epoch = 5  # A typo in code is caught too.


def test_split_config_args_takes_every_form():
  path, overrides, rest = cli.split_config_args([
      '--config', 'c.py', '--workdir=w', '--config.fold=2',
      '--config.num_epochs', '5', '--config.distributed',
      '--noconfig.tune_malloc', '--other'])
  assert path == 'c.py'
  assert overrides == ['fold=2', 'num_epochs=5', 'distributed=True',
                       'tune_malloc=False']
  assert rest == ['--workdir=w', '--other']
  with pytest.raises(cli.UsageError, match='twice'):
    cli.split_config_args(['--config=a.py', '--config=b.py'])
  with pytest.raises(cli.UsageError, match='needs a config file'):
    cli.split_config_args(['--config'])


def test_argument_parser_errors_are_one_line(capsys):
  parser = cli.ArgumentParser(prog='prog')
  parser.add_argument('--out', required=True)
  with pytest.raises(SystemExit) as exit_info:
    parser.parse_args(['--bogus'])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('error: ')


@pytest.mark.parametrize('error', [
    cli.UsageError('bad\nflag'), hc18.ImageReadError('not a PNG'),
    FloatingPointError('loss is nan at step 7'), FileNotFoundError('gone'),
    ValueError('bad value')])
def test_run_main_maps_known_errors_to_one_line_and_status_2(error, capsys):
  def fail():
    raise error
  assert cli.run_main(fail) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1


def test_run_main_keeps_the_list_of_a_broken_hc18_copy(capsys):
  def fail():
    raise hc18.HC18Error('/data/hc18', ['001_HC.png: missing', 'a.csv: bad'])
  assert cli.run_main(fail) == 2
  lines = capsys.readouterr().err.splitlines()
  assert lines[0].startswith('error: HC18 data at /data/hc18 has 2 problem')
  assert lines[1:] == ['  001_HC.png: missing', '  a.csv: bad']


def test_run_main_passes_statuses_and_unknown_errors_through():
  assert cli.run_main(lambda: None) == 0
  assert cli.run_main(lambda: 1) == 1
  def bug():
    raise KeyError('a bug, not a usage error')
  with pytest.raises(KeyError):
    cli.run_main(bug)


def test_quiet_logs_drops_tfds_noise_and_keeps_other_warnings(caplog):
  cli.quiet_logs(tensorflow=False)
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  with caplog.at_level(logging.WARNING):
    absl_logging.warning('Variant folder %s has no %s', '/x',
                         'dataset_info.json')
    absl_logging.warning('a real warning %d', 1)
  messages = [record.getMessage() for record in caplog.records]
  assert messages == ['a real warning 1']


def test_setup_process_makes_the_process_settings(monkeypatch):
  # pylint: disable=import-outside-toplevel
  import jax
  from hc_jax import cpu
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda: calls.append('distributed'))
  monkeypatch.setattr(cpu, 'tune_malloc', lambda: calls.append('malloc'))
  config = config_dict.ConfigDict({'distributed': False,
                                   'tune_malloc': False})
  cli.setup_process(config)
  assert not calls
  config.distributed = True
  config.tune_malloc = True
  cli.setup_process(config)
  assert calls == ['distributed'] + (
      ['malloc'] if jax.default_backend() == 'cpu' else [])


def test_default_workdir_is_named_after_the_config_file():
  assert main_lib.default_workdir('configs/resnet_huber.py', 0) == os.path.join(
      'runs', 'resnet_huber_fold0')
  assert main_lib.default_workdir('/a/b/cnn1m_mae.py', 3) == os.path.join(
      'runs', 'cnn1m_mae_fold3')


def _run(*args):
  env = dict(os.environ)
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)  # As a user's shell has it.
  return subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)


@pytest.mark.parametrize('args, message', [
    (['hc_jax.main', f'--config={MSE_CONFIG}', '--config.num_epoch=2'],
     f"error: {MSE_CONFIG}: no field 'num_epoch' — did you mean "
     "'num_epochs'?"),
    (['hc_jax.main', '--config=configs/x.py'],
     'error: configs/x.py: config file not found'),
    (['hc_jax.main', f'--config={MSE_CONFIG}', '--bogus'],
     'error: unrecognized arguments: --bogus'),
    (['hc_jax.main', '--workdir=runs/x'], 'error: --config=FILE is required'),
    (['hc_jax.grid', f'--configs={MSE_CONFIG}', '--root=/nonexistent/grid',
      '--config.num_epoch=2'],
     f"error: {MSE_CONFIG}: no field 'num_epoch' — did you mean "
     "'num_epochs'?"),
    (['hc_jax.plots', '--root=/nonexistent/grid', '--out=/tmp/x'],
     'error: /nonexistent/grid'),
    (['hc_jax.predict', '--bogus'], 'error: '),
    (['hc_jax.plausibility', '--root=/nonexistent/grid'],
     'error: --root /nonexistent/grid is not a directory'),
    (['hc_jax.synthetic', '--out=/tmp/x', '--seed=-1'],
     'error: --seed must be >= 0, got -1'),
])
def test_commands_report_mistakes_in_one_line_with_status_2(args, message):
  result = _run(*args)
  assert result.returncode == 2, result.stderr
  assert result.stderr.count('\n') == 1, result.stderr
  assert result.stderr.startswith(message), result.stderr


def test_quiet_logs_keeps_tensorflows_import_lines_off_stderr():
  code = ('from hc_jax import cli; cli.quiet_logs(); import tensorflow; '
          'print("ok")')
  result = subprocess.run(
      [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
      timeout=300, check=False,
      env={k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'})
  assert result.returncode == 0, result.stderr
  assert result.stdout == 'ok\n'
  assert result.stderr == ''


def test_quiet_logs_hides_tfds_progress_bars_even_after_tfds_is_imported():
  # A notebook or script may import TFDS (and tqdm, which reads TQDM_DISABLE
  # once, on import) before it asks for quiet.
  code = ('import tensorflow_datasets as tfds; from hc_jax import cli; '
          'cli.quiet_logs(tensorflow=False); '
          'from tensorflow_datasets.core.utils import tqdm_utils; '
          'list(tqdm_utils.tqdm(range(3), desc="building")); print("ok")')
  result = subprocess.run(
      [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
      timeout=300, check=False,
      env={k: v for k, v in os.environ.items() if k != 'TQDM_DISABLE'})
  assert result.returncode == 0, result.stderr
  assert result.stdout == 'ok\n'
  assert 'building' not in result.stderr, result.stderr


@pytest.mark.slow
def test_a_tiny_run_is_quiet_and_goes_to_its_default_workdir(tmp_path):
  config = os.path.join(REPO, 'configs', 'demo.py')
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  result = subprocess.run(
      [sys.executable, '-m', 'hc_jax.main', f'--config={config}',
       '--config.num_epochs=1', '--config.data.num_synthetic=20',
       '--config.image_size=32'],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / 'runs' / 'demo_fold0' / 'results.json').is_file()
  output = result.stdout + result.stderr
  for noise in ('oneDNN', 'absl::InitializeLog', 'dataset_info.json',
                'Downloading and preparing', 'Generating splits', 'I0000'):
    assert noise not in output, output[-3000:]


def test_main_says_what_it_starts_before_the_slow_imports(tmp_path, capsys):
  from hc_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  status = main_lib.main([
      f'--config={os.path.join(REPO, "configs", "demo.py")}',
      '--config.data.source=hc18', f'--config.data.hc18_dir={tmp_path}',
      f'--workdir={tmp_path / "run"}'])
  err = capsys.readouterr().err.splitlines()
  assert status == 2
  assert err[0].endswith('demo.py: starting JAX and TensorFlow (then the '
                         'data and the compilation; about 30 s on a CPU)...')
  assert err[-1].startswith('error: ')


@pytest.mark.parametrize('error, expected', [
    (OSError(errno.EROFS, 'Read-only file system', '/runs/a/.lock'),
     '/runs/a/.lock: the file system is read-only'),
    (PermissionError(errno.EACCES, 'Permission denied', '/c'),
     '/c: permission denied'),
    (OSError(errno.ENOSPC, 'No space left on device'),
     'no space left on the device; free some space'),
    (RuntimeError('NotFoundError: Failed to finalize writing of split '
                  '"train": /c/x.tfrecord; No such file or directory'),
     'no such file or directory (removed while the command ran?)'),
])
def test_storage_errors_are_one_line_naming_the_path(error, expected, capsys):
  def fail():
    raise OSError('writing failed') from error
  assert cli.run_main(fail) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1, err
  assert expected in err, err


def test_other_os_errors_pass_through():
  def bug():
    raise OSError(errno.EBADF, 'Bad file descriptor')
  with pytest.raises(OSError):
    cli.run_main(bug)


def test_main_help_lists_the_configs_their_fields_and_the_default_workdir(
    capsys):
  with pytest.raises(SystemExit) as stop:
    main_lib.main(['--help'])
  assert stop.value.code == 0
  text = capsys.readouterr().out
  for name in ('hcnet_mask.py', 'demo.py', 'resnet_huber.py',
               'cnn263k_mse.py'):
    assert name in text, name
  assert 'num_epochs = 250' in text and "loss = 'mse'" in text  # default.py
  assert 'runs/<config file>_fold<k>' in text
  assert 'runs/hcnet_mask_fold0' in text
  assert '--losses_module' in text
  # With a config named, its own values.
  with pytest.raises(SystemExit):
    main_lib.main(['--config=configs/demo.py', '--help'])
  assert 'num_epochs = 30' in capsys.readouterr().out


def test_a_missing_config_file_lists_the_configs_there(monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(cli.UsageError) as error:
    cli.load_config('configs/hcnet_msk.py')
  message = str(error.value)
  assert message.startswith('configs/hcnet_msk.py: config file not found — '
                            'did you mean configs/hcnet_mask.py? (the '
                            'configs in configs/: cnn1m_huber.py, ')
  assert '\n' not in message
  for name in os.listdir(os.path.join(REPO, 'configs')):
    if name.endswith('.py') and name != '__init__.py':
      assert name in message, name
  # Named in a folder without configs: those of the checkout.
  with pytest.raises(cli.UsageError, match=r'^/nonexistent/demo\.py: config '
                     r'file not found — did you mean .*configs/demo\.py\? '
                     r'\(the configs in '):
    cli.load_config('/nonexistent/demo.py')


def test_git_ignores_what_the_readmes_first_command_writes():
  if subprocess.run(['git', 'rev-parse'], cwd=REPO, capture_output=True,
                    check=False).returncode:
    pytest.skip('not a git checkout')
  # `--out=hc.csv --overlays=overlays` in the checkout (tests/test_readme.py
  # checks that the README's first command is this one).
  paths = ['hc.csv', 'overlays/020_HC_prediction.png']
  result = subprocess.run(['git', 'check-ignore', '--no-index', *paths],
                          cwd=REPO, capture_output=True, text=True,
                          check=False)
  assert result.stdout.split() == paths, result


def test_predict_help_and_readme_say_the_shipped_model_gives_the_ellipse(
    capsys):
  from hc_jax import predict  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit):
    predict.main(['--help'])
  text = ' '.join(capsys.readouterr().out.split())
  assert "models that give the head's ellipse (the mask models, such as " \
      'the shipped default hcnet_mask_refine, and hcnet_ellipse' in text
  assert 'It needs a model that gives the ellipse (the shipped one does)' \
      in text
  assert 'needs an ellipse model' not in text
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = ' '.join(f.read().split())
  assert "For a model that gives the head's ellipse (the shipped mask " \
      'models' in readme


def test_main_imports_losses_modules_and_reports_a_missing_one(capsys):
  demo = os.path.join(REPO, 'configs', 'demo.py')
  assert main_lib.main([f'--config={demo}',
                        '--losses_module=no_such_losses.py']) == 2
  assert capsys.readouterr().err.splitlines()[-1] == (
      'error: losses module no_such_losses.py: no such file')
