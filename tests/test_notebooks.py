"""The notebooks run: the quickstart end to end, the Colab one on a CPU.

The quickstart is executed with nbclient in the `python3` kernel, which must be
this interpreter (so it sees this venv's hc_jax): jupyter_client starts a
kernel spec whose argv[0] is 'python' with `sys.executable`. Where `python3`
names another interpreter (a user-level kernel spec), the test puts a spec for
this one first on $JUPYTER_PATH.
"""

import json
import os
import re
import sys

import nbformat
import pytest

from conftest import REPO

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
  monkeypatch.setenv('HC_JAX_QUICKSTART_IMAGES', '60')
  monkeypatch.setenv('HC_JAX_QUICKSTART_WORKDIR', str(workdir))
  notebook = _read('quickstart.ipynb')
  NotebookClient(notebook, kernel_name=KERNEL, timeout=300,
                 resources={'metadata': {'path': NOTEBOOKS}}).execute()
  assert (workdir / 'results.json').is_file()
  outputs = '\n'.join(_text_outputs(cell) for cell in notebook.cells)
  assert '1 epochs, 60 phantom scans' in outputs
  # The predictor reproduces the run's own test prediction of the scan.
  match = re.search(r'predicted (-?[\d.]+) mm \(predictions_test.csv: '
                    r'(-?[\d.]+) mm', outputs)
  assert match, outputs[-2000:]
  assert float(match.group(1)) == pytest.approx(float(match.group(2)), abs=0.15)
  figures = sorted(os.listdir(workdir / 'figures'))
  assert [name for name in figures if name.endswith('_scatter.png')]
  assert len(figures) >= 4
  images = [output for cell in notebook.cells
            for output in cell.get('outputs', [])
            if 'image/png' in output.get('data', {})]
  assert len(images) >= 1 + len(figures)  # The scan, then every figure.


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


def test_colab_notebook_trains_resnet_huber_on_the_tpu():
  source = '\n'.join(cell.source for cell in _read('colab_tpu.ipynb').cells)
  for needed in ('configs/resnet_huber.py', "hc18_dir = '/content/hc18'",
                 'train.train_and_evaluate(config, workdir)', 'jax.devices()',
                 'plots.plot_all'):
    assert needed in source, needed
  assert 'YOUR_ORG' not in source


def test_colab_notebook_starts_with_the_source_of_hc_jax():
  code_cells = [cell for cell in _read('colab_tpu.ipynb').cells
                if cell.cell_type == 'code']
  assert 'HC_JAX_ZIP' in code_cells[0].source
  assert 'HC_JAX_GIT' in code_cells[0].source
  colab_only = [cell for cell in code_cells
                if 'colab-only' in cell.metadata.get('tags', [])]
  assert len(colab_only) == 1 and 'pip install' in colab_only[0].source
  # Only the Colab-only cell runs shell commands; the rest runs anywhere.
  for cell in code_cells:
    if cell not in colab_only:
      assert _code_without_shell_lines(cell.source) == cell.source


def test_quickstart_names_its_install_command():
  assert "pip install -e '.[notebook]'" in _read('quickstart.ipynb').cells[
      0].source


# What the test changes in the Colab notebook to run it on a CPU in seconds:
# the 263K CNN at 32x32 for one epoch on phantom scans, instead of ResNet50
# at 224x224 for 250 epochs on the HC18 files uploaded from Zenodo.
TINY_CPU_CONFIG = """
config.model = 'cnn_263k'
config.image_size = 32
config.num_epochs = 1
config.batch_size = 8
config.eval_batch_size = 8
config.data.hc18_dir = {hc18_dir!r}
config.data.cache_dir = {cache_dir!r}
workdir = {workdir!r}
"""


@pytest.mark.slow
def test_colab_notebook_runs_in_order_on_a_cpu(tmp_path, monkeypatch,
                                               phantom_hc18):
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel
  _use_this_interpreter(monkeypatch, tmp_path)
  notebook = _read('colab_tpu.ipynb')
  cells = []
  for cell in notebook.cells:
    if 'colab-only' in cell.metadata.get('tags', []):
      continue  # The pip installs: hc_jax is installed here already.
    cells.append(cell)
    if "cli.load_config('configs/resnet_huber.py')" in cell.source:
      cells.append(nbformat.v4.new_code_cell(TINY_CPU_CONFIG.format(
          hc18_dir=phantom_hc18[0], cache_dir=phantom_hc18[1],
          workdir=str(tmp_path / 'resnet_huber_fold0'))))
  assert len(cells) == len(notebook.cells)  # One skipped, one added.
  notebook.cells = cells
  # Run from notebooks/, as a local Jupyter would: the source cell finds the
  # checkout above it (no zip uploaded, no git URL set).
  NotebookClient(notebook, kernel_name=KERNEL, timeout=600,
                 resources={'metadata': {'path': NOTEBOOKS}}).execute()
  outputs = '\n'.join(_text_outputs(cell) for cell in notebook.cells)
  assert f'hc_jax from {REPO}' in outputs
  assert (tmp_path / 'resnet_huber_fold0' / 'results.json').is_file()
  assert 'epoch' in outputs and 'selected on validation' in outputs
  assert os.listdir(tmp_path / 'resnet_huber_fold0' / 'figures')


def test_colab_notebook_says_one_thing_of_the_download():
  """Its introduction and its config section agree: the HC18 files are
  uploaded by hand, automatic download is refused."""
  cells = _read('colab_tpu.ipynb').cells
  intro = cells[0].source
  assert 'upload' in intro and 'fetches' not in intro
  text = '\n'.join(c.source for c in cells if c.cell_type == 'markdown')
  assert 'Automatic download is refused' in text


def test_quickstart_hides_the_start_up_noise_as_the_commands_do():
  setup = _read('quickstart.ipynb').cells[1].source
  assert 'cli.quiet_logs()' in setup
  assert setup.index('cli.quiet_logs()') < min(
      (setup.index(s) for s in ('import jax', 'import tensorflow')
       if s in setup), default=len(setup))
