"""The notebooks: the quickstart runs end to end; the Colab one is well formed.

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
  for needed in ('configs/resnet_huber.py', "hc18_dir = 'download'",
                 'train.train_and_evaluate(config, workdir)', 'jax.devices()',
                 'plots.plot_all'):
    assert needed in source, needed
