"""The notebooks run: the quickstart end to end, the Colab one on a CPU.

The quickstart is executed with nbclient in the `python3` kernel, which must be
this interpreter (so it sees this venv's hc_jax): jupyter_client starts a
kernel spec whose argv[0] is 'python' with `sys.executable`. Where `python3`
names another interpreter (a user-level kernel spec), the test puts a spec for
this one first on $JUPYTER_PATH.
"""

import ast
import configparser
import importlib.metadata
import json
import os
import re
import sys
import types

import nbformat
import pytest

from conftest import REPO
from conftest import fake_zenodo

NOTEBOOKS = os.path.join(REPO, 'notebooks')
KERNEL = 'python3'


def _kernel_executable() -> str:
  # pylint: disable-next=import-outside-toplevel
  from jupyter_client.manager import KernelManager
  return KernelManager(kernel_name=KERNEL).format_kernel_cmd()[0]


def _use_this_interpreter(monkeypatch, tmp_path) -> None:
  if os.path.realpath(_kernel_executable()) == os.path.realpath(sys.executable):
    return
  spec_dir = tmp_path / 'jupyter' / 'kernels' / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f',
               '{connection_file}'],
      'display_name': 'hc_jax tests', 'language': 'python'}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  assert os.path.realpath(_kernel_executable()) == os.path.realpath(
      sys.executable)


def _read(name):
  return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def _text_outputs(cell) -> str:
  return ''.join(output.get('text', '') for output in cell.get('outputs', []))


def test_quickstart_runs_end_to_end(tmp_path, monkeypatch):
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel
  _use_this_interpreter(monkeypatch, tmp_path)
  workdir = tmp_path / 'quickstart'
  monkeypatch.setenv('HC_JAX_QUICKSTART_EPOCHS', '1')
  monkeypatch.setenv('HC_JAX_QUICKSTART_IMAGES', '30')
  monkeypatch.setenv('HC_JAX_QUICKSTART_WORKDIR', str(workdir))
  notebook = _read('quickstart.ipynb')
  NotebookClient(notebook, kernel_name=KERNEL, timeout=300,
                 resources={'metadata': {'path': NOTEBOOKS}}).execute()
  assert (workdir / 'results.json').is_file()
  outputs = '\n'.join(_text_outputs(cell) for cell in notebook.cells)
  assert '1 epochs, 30 phantom scans' in outputs
  # The shipped model measures a shipped HC18 scan as it did when exported.
  match = re.search(r'092_HC.png: the shipped model measures ([\d.]+) mm '
                    r'\(SD [\d.]+ mm over its folds, status ok; '
                    r'expected_hcnet_mask_refine.csv: ([\d.]+) mm\)', outputs)
  assert match, outputs[-2000:]
  assert float(match.group(2)) == 188.7
  assert float(match.group(1)) == pytest.approx(188.7, abs=0.15)
  # The demo's predictor reproduces the run's own test prediction of the
  # phantom, and says what the demo is.
  match = re.search(r'demo model, phantom \S+: predicted (-?[\d.]+) mm '
                    r'\(predictions_test.csv: (-?[\d.]+) mm, true [\d.]+ mm; '
                    r'a 1-epoch demo on phantoms, not a measurement\)', outputs)
  assert match, outputs[-2000:]
  assert float(match.group(1)) == pytest.approx(float(match.group(2)), abs=0.15)
  figures = sorted(os.listdir(workdir / 'figures'))
  assert [name for name in figures if name.endswith('_scatter.png')]
  assert len(figures) >= 4
  images = [output for cell in notebook.cells
            for output in cell.get('outputs', [])
            if 'image/png' in output.get('data', {})]
  assert len(images) >= 1 + len(figures)  # The scan, then every figure.


def test_quickstart_says_why_the_demo_model_is_no_measurement():
  cells = _read('quickstart.ipynb').cells
  code = [i for i, cell in enumerate(cells) if cell.cell_type == 'code']
  shipped = next(i for i in code if 'predict.load()' in cells[i].source)
  demo = next(i for i in code if 'predict.load(workdir)' in cells[i].source)
  assert shipped < demo  # The real scan first, then the demo.
  assert "sample = '092_HC.png'" in cells[shipped].source
  assert cells[demo - 1].cell_type == 'markdown'
  why = ' '.join(cells[demo - 1].source.split())
  for needed in ('not a head-circumference model', 'phantoms',
                 'never seen an ultrasound scan', 'not measurements'):
    assert needed in why, needed


def _code_without_shell_lines(source: str) -> str:
  """The Python of a cell: IPython's `!cmd` and `%magic` lines dropped."""
  return '\n'.join('' if line.lstrip().startswith(('!', '%')) else line
                   for line in source.splitlines())


@pytest.mark.parametrize('name', ['quickstart.ipynb', 'colab_tpu.ipynb'])
def test_notebook_is_valid_and_its_code_compiles(name):
  notebook = _read(name)
  nbformat.validate(notebook)
  code_cells = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert code_cells
  for i, cell in enumerate(code_cells):
    compile(_code_without_shell_lines(cell.source), f'{name} cell {i}', 'exec')
    assert not cell.get('outputs'), f'{name} is stored with outputs'


def _colab_cells(kind=None):
  cells = _read('colab_tpu.ipynb').cells
  return [cell for cell in cells if kind is None or cell.cell_type == kind]


def _tagged(tag):
  return [cell for cell in _colab_cells('code')
          if tag in cell.metadata.get('tags', [])]


def test_colab_notebook_trains_resnet_huber_on_the_tpu():
  source = '\n'.join(cell.source for cell in _colab_cells())
  for needed in ('configs/resnet_huber.py',
                 "download.fetch_hc18('/content/hc18')",
                 'config.data.hc18_dir = hc18_dir',
                 'config.batch_size = 8 * jax.device_count()',
                 "drive.mount('/content/drive')",
                 "workdir = '/content/drive/MyDrive/hc_jax_runs/",
                 'train.train_and_evaluate(config, workdir)', 'jax.devices()',
                 'plots.plot_all'):
    assert needed in source, needed
  assert 'YOUR_ORG' not in source
  # The number of cores is read from JAX, not assumed from a TPU's name.
  assert not re.search(r'\b8 cores? on a v[23]', source)


def test_colab_notebook_starts_with_the_source_of_hc_jax():
  code_cells = _colab_cells('code')
  assert 'REPO_URL' in code_cells[0].source
  assert 'HC_JAX_ZIP' in code_cells[0].source
  colab_only = _tagged('colab-only')
  assert ['pip install' in cell.source for cell in colab_only] == [True, False]
  assert 'drive.mount' in colab_only[1].source
  # Only the Colab-only cells run shell commands; the rest runs anywhere.
  for cell in code_cells:
    if cell not in colab_only:
      assert _code_without_shell_lines(cell.source) == cell.source


def _repo_url() -> str:
  tree = ast.parse(_colab_cells('code')[0].source)
  values = [node.value.value for node in tree.body
            if isinstance(node, ast.Assign)
            and [target.id for target in node.targets] == ['REPO_URL']]
  assert len(values) == 1
  return values[0]


def test_colab_notebook_clones_the_url_setup_cfg_records():
  """One place names the repository: setup.cfg's url, which the notebook's
  REPO_URL repeats (both empty while none is recorded)."""
  setup = configparser.ConfigParser()
  setup.read(os.path.join(REPO, 'setup.cfg'))
  url = setup.get('metadata', 'url', fallback='')
  assert _repo_url() == url
  assert not url or url.startswith('https://')
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  assert not url or url in readme


def _restart_check(monkeypatch, capsys, jax_version: str) -> str:
  """What the install cell's Python prints with a `jax` of `jax_version`
  imported before it ran."""
  [install] = [cell for cell in _tagged('colab-only')
               if 'pip install' in cell.source]
  monkeypatch.setitem(sys.modules, 'jax',
                      types.SimpleNamespace(__version__=jax_version))
  exec(compile(_code_without_shell_lines(install.source), 'install', 'exec'),
       {})  # pylint: disable=exec-used
  return capsys.readouterr().out


def test_colab_install_cell_says_exactly_when_to_restart(monkeypatch, capsys):
  installed = importlib.metadata.version('jax')
  out = _restart_check(monkeypatch, capsys, '0.0.1')
  assert out.startswith(f'RESTART NEEDED: jax 0.0.1 is loaded, {installed} is '
                        'installed. Restart the runtime (Runtime menu)')
  out = _restart_check(monkeypatch, capsys, installed)
  assert out.startswith('No restart needed'), out
  text = '\n'.join(cell.source for cell in _colab_cells('markdown'))
  assert 'only when the cell above prints `RESTART NEEDED`' in text


def test_colab_notebook_fetches_and_checks_hc18():
  """Its introduction and its data section say the same: HC18 is fetched
  from Zenodo and checked, not uploaded by hand."""
  cells = _colab_cells('markdown')
  intro = cells[0].source
  assert 'fetches HC18 from Zenodo' in intro and 'md5' in intro
  text = '\n'.join(cell.source for cell in cells)
  assert 'Automatic download is refused' not in text
  assert 'https://zenodo.org/api/records/1327317' in text
  [network] = _tagged('network')
  assert network.source == ('from hc_jax.data import download\n\n'
                            "hc18_dir = download.fetch_hc18('/content/hc18')")


def _offline_download_cell(dest: str) -> str:
  """The notebook's download cell, fetching into `dest` through the kernel's
  `fake_opener`."""
  [network] = _tagged('network')
  call = "download.fetch_hc18('/content/hc18')"
  assert network.source.count(call) == 1
  return network.source.replace(
      call, f'download.fetch_hc18({dest!r}, opener=fake_opener)')


def test_colab_download_cell_fetches_and_checks_a_local_copy(
    tmp_path, phantom_hc18, capsys):
  urls = fake_zenodo(phantom_hc18[0], str(tmp_path / 'zenodo'))
  dest = str(tmp_path / 'hc18')
  namespace = {'fake_opener': lambda url: open(urls[url], 'rb')}  # pylint: disable=consider-using-with
  exec(compile(_offline_download_cell(dest), 'download', 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['hc18_dir'] == dest
  assert sorted(os.listdir(dest)) == sorted(
      ('training_set', 'test_set', 'training_set.zip', 'test_set.zip',
       'training_set_pixel_size_and_HC.csv', 'test_set_pixel_size.csv'))
  assert '60 train, 6 test images, checked' in capsys.readouterr().out


def test_colab_notebook_estimates_its_time_against_colabs_limit():
  text = '\n'.join(cell.source for cell in _colab_cells('markdown'))
  estimate = next(cell.source for cell in _colab_cells('markdown')
                  if cell.source.startswith('## 5. How long it takes'))
  estimate = ' '.join(estimate.split())
  for needed in ('An estimate, not a measurement', 'not been timed on a TPU',
                 '250 epochs', 'about 12 h', 'left idle',
                 'images per second and the time left'):
    assert needed in estimate, needed
  assert 'config.num_epochs = 250' in '\n'.join(
      cell.source for cell in _colab_cells('code'))
  assert 'Running this cell again resumes the run' in text


def test_quickstart_names_its_install_command():
  assert "pip install -e '.[notebook]'" in _read('quickstart.ipynb').cells[
      0].source


# What the test changes in the Colab notebook to run it on a CPU in seconds:
# the 263K CNN at 32x32 for one epoch on phantom scans fetched from a fake
# Zenodo record, instead of ResNet50 at 224x224 for 250 epochs on HC18, and
# a workdir here instead of on Google Drive.
TINY_CPU_CONFIG = """
config.model = 'cnn_263k'
config.image_size = 32
config.num_epochs = 1
config.batch_size = 8
config.eval_batch_size = 8
config.data.cache_dir = {cache_dir!r}
workdir = {workdir!r}
"""
# What the kernel gets instead of the network: {url: local file}.
FAKE_OPENER = """
import json
with open({urls!r}) as f:
  SERVED = json.load(f)


def fake_opener(url):
  return open(SERVED[url], 'rb')
"""


@pytest.mark.slow
def test_colab_notebook_runs_in_order_on_a_cpu(tmp_path, monkeypatch,
                                               phantom_hc18):
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel
  _use_this_interpreter(monkeypatch, tmp_path)
  urls = tmp_path / 'urls.json'
  urls.write_text(json.dumps(fake_zenodo(phantom_hc18[0],
                                         str(tmp_path / 'zenodo'))))
  notebook = _read('colab_tpu.ipynb')
  cells = []
  for cell in notebook.cells:
    tags = cell.metadata.get('tags', [])
    if 'colab-only' in tags:
      continue  # The pip installs and Google Drive: not here.
    if 'network' in tags:
      cells.append(nbformat.v4.new_code_cell(
          FAKE_OPENER.format(urls=str(urls))))
      cell.source = _offline_download_cell(str(tmp_path / 'hc18'))
    cells.append(cell)
    if "cli.load_config('configs/resnet_huber.py')" in cell.source:
      cells.append(nbformat.v4.new_code_cell(TINY_CPU_CONFIG.format(
          cache_dir=phantom_hc18[1],
          workdir=str(tmp_path / 'resnet_huber_fold0'))))
  assert len(cells) == len(notebook.cells)  # Two skipped, two added.
  notebook.cells = cells
  # Run from notebooks/, as a local Jupyter would: the source cell finds the
  # checkout above it (no zip uploaded, no git URL set).
  NotebookClient(notebook, kernel_name=KERNEL, timeout=600,
                 resources={'metadata': {'path': NOTEBOOKS}}).execute()
  outputs = '\n'.join(_text_outputs(cell) for cell in notebook.cells)
  assert f'hc_jax from {REPO}' in outputs
  assert '60 train, 6 test images, checked against their CSVs' in outputs
  run = tmp_path / 'resnet_huber_fold0'
  assert (run / 'results.json').is_file()
  # It trained on the copy the download cell fetched.
  with open(run / 'config.json') as f:
    assert json.load(f)['data']['hc18_dir'] == str(tmp_path / 'hc18')
  assert 'epoch' in outputs and 'selected on validation' in outputs
  figures = os.listdir(run / 'figures')
  assert [name for name in figures if 'worst' in name], figures


def test_quickstart_hides_the_start_up_noise_as_the_commands_do():
  setup = _read('quickstart.ipynb').cells[1].source
  assert 'cli.quiet_logs()' in setup
  assert setup.index('cli.quiet_logs()') < min(
      (setup.index(s) for s in ('import jax', 'import tensorflow')
       if s in setup), default=len(setup))
