"""The package's layout: imports point down its layers (so its graph has no
cycle), the top level holds the commands (and a subpackage none), and the
run directory's file names have one owner."""

import ast
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, 'hc_jax')
# What may sit at the top level: the commands and what they share.
TOP_LEVEL = {'__init__', 'archive', 'cli', 'cpu', 'cv_score', 'grid',
             'leftovers', 'log', 'losses', 'main', 'metrics', 'models',
             'plausibility', 'plots', 'predict', 'prepare', 'shifted',
             'shipped', 'synthetic', 'workdir'}
PACKAGES = {'data', 'evaluation', 'nets', 'training'}
# The layers, bottom first: a module imports its own layer and those below,
# never one above. A top-level module or a package is named without hc_jax.
LAYERS = (
    {'__init__', 'archive', 'cpu', 'leftovers', 'log', 'losses', 'metrics',
     'workdir'},  # Helpers.
    {'data'},
    {'nets'},
    {'models'},  # The registry of the networks.
    {'training'},
    {'evaluation'},  # It restores what training wrote.
    {'cli', 'cv_score', 'grid', 'main', 'plausibility', 'plots', 'predict',
     'prepare', 'shifted', 'shipped', 'synthetic'},  # The commands.
)


def _modules() -> dict[str, str]:
  """{dotted name: path} of every module of hc_jax."""
  out = {}
  for folder, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
        if parts[-1] == '__init__':
          parts = parts[:-1]
        out['.'.join(parts)] = path
  return out


def _imports(path: str, modules) -> set[str]:
  """The hc_jax modules a file imports, at any depth (function-level
  imports included): `from hc_jax.a import b` names module hc_jax.a.b where
  there is one, else hc_jax.a; importing a module runs its packages'
  `__init__` first, so each of them is imported too."""
  with open(path) as f:
    tree = ast.parse(f.read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith('hc_jax')}
    elif isinstance(node, ast.ImportFrom) and node.module and (
        node.module == 'hc_jax' or node.module.startswith('hc_jax.')):
      for alias in node.names:
        name = f'{node.module}.{alias.name}'
        out.add(name if name in modules else node.module)
  parents = {'.'.join(name.split('.')[:k]) for name in out
             for k in range(1, name.count('.') + 1)}
  return (out | parents) & set(modules)


def _cycle(graph):
  """One import cycle of `graph` as a list of modules, or None."""
  state = {}

  def visit(node, path):
    state[node] = 'open'
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt, path + [nxt])
        if found:
          return found
    state[node] = 'done'
    return None

  for start in sorted(graph):
    if start not in state:
      found = visit(start, [start])
      if found:
        return found
  return None


def test_no_import_cycles():
  modules = _modules()
  graph = {name: _imports(path, modules) - {name}
           for name, path in modules.items()}
  assert _cycle(graph) is None, ' -> '.join(_cycle(graph))


def _layer(module: str) -> int:
  """The index in `LAYERS` of an hc_jax module."""
  parts = module.split('.')
  name = parts[1] if len(parts) > 1 else '__init__'
  found = [i for i, layer in enumerate(LAYERS) if name in layer]
  assert found, f'{module} is in no layer of LAYERS'
  return found[0]


def _upward(graph) -> set[tuple[str, str]]:
  return {(a, b) for a, imported in graph.items() for b in imported
          if _layer(b) > _layer(a)}


def test_imports_point_down_the_layers():
  modules = _modules()
  graph = {name: _imports(path, modules) - {name}
           for name, path in modules.items()}
  assert not _upward(graph), sorted(_upward(graph))


def test_an_upward_import_is_found():
  assert _upward({'hc_jax.training.trainer': {'hc_jax.evaluation.metrics'},
                  'hc_jax.nets.pretrained': {'hc_jax.models'},
                  'hc_jax.data.cache': {'hc_jax.cli', 'hc_jax.log'}}) == {
                      ('hc_jax.training.trainer', 'hc_jax.evaluation.metrics'),
                      ('hc_jax.nets.pretrained', 'hc_jax.models'),
                      ('hc_jax.data.cache', 'hc_jax.cli')}


def test_the_cycle_finder_finds_a_cycle():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set()}) is None


def test_importing_a_submodule_counts_its_package():
  """`from hc_jax.data import hc18` runs hc_jax/data/__init__.py first: a
  package whose __init__ imported a submodule that imports a sibling through
  the package would be a cycle."""
  modules = _modules()
  assert 'hc_jax.data' in _imports(modules['hc_jax.data.pipeline'], modules)


def test_the_top_level_holds_the_commands_and_the_packages():
  names = {n[:-3] for n in os.listdir(PACKAGE) if n.endswith('.py')}
  assert names == TOP_LEVEL
  folders = {n for n in os.listdir(PACKAGE)
             if os.path.isfile(os.path.join(PACKAGE, n, '__init__.py'))}
  assert folders == PACKAGES


def _commands_in(path: str) -> list[str]:
  """'path:line what' of each command in a module: a module-level `def
  main` or an `if __name__ == '__main__':` block."""
  with open(path) as f:
    tree = ast.parse(f.read())
  found = []
  for node in tree.body:
    if isinstance(node, ast.FunctionDef) and node.name == 'main':
      found.append(f'{path}:{node.lineno} def main')
    elif isinstance(node, ast.If) and '__main__' in ast.unparse(node.test):
      found.append(f'{path}:{node.lineno} __main__ block')
  return found


def test_commands_live_at_the_top_level_only():
  """A subpackage holds libraries; its commands are top-level modules
  (`hc_jax/synthetic.py` runs `hc_jax.data.phantom_set`)."""
  found = [line for module, path in _modules().items()
           if module.count('.') > 1 for line in _commands_in(path)]
  assert not found, found


def test_a_command_inside_a_subpackage_is_found(tmp_path):
  path = tmp_path / 'tool.py'
  path.write_text('def helper():\n  pass\n')
  assert not _commands_in(str(path))
  path.write_text('import sys\n\ndef main(argv=None):\n  return 0\n')
  assert _commands_in(str(path)) == [f'{path}:3 def main']
  path.write_text("import sys\nif __name__ == '__main__':\n  sys.exit(0)\n")
  assert _commands_in(str(path)) == [f'{path}:2 __main__ block']


def test_the_documented_entry_points_import():
  # pylint: disable=import-outside-toplevel,unused-import
  from hc_jax import cv_score, grid, losses, main, models, plausibility, plots
  from hc_jax import predict, prepare, synthetic
  assert callable(predict.load) and models.MODELS and losses.LOSSES
  for command in (cv_score, grid, main, plausibility, plots, predict, prepare,
                  synthetic):
    assert callable(command.main)


def test_the_run_directorys_file_names_are_written_in_workdir_only():
  """Code elsewhere names them through `hc_jax.workdir` (docstrings and
  messages may mention them)."""
  from hc_jax import workdir  # pylint: disable=import-outside-toplevel
  names = {workdir.CONFIG_FILE, workdir.FOLDS_FILE, workdir.METRICS_FILE,
           workdir.TENSORBOARD_DIR, workdir.CHECKPOINTS_DIR,
           workdir.DIVERGED_FILE, workdir.PREDICTIONS_FILE,
           workdir.RESULTS_FILE, workdir.LOCK_FILE, 'hc18_synthetic'}
  found = []
  for module, path in _modules().items():
    if module == 'hc_jax.workdir':
      continue
    with open(path) as f:
      tree = ast.parse(f.read())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef,
                                       ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr)}
    found += [f'{path}:{node.lineno} {node.value!r}'
              for node in ast.walk(tree)
              if isinstance(node, ast.Constant) and node.value in names
              and id(node) not in docstrings]
  assert not found, found


# hc_jax's own frames from the command to the step: main.main,
# train.train_and_evaluate, Trainer.run (the epoch loop), step.train_step.
MAX_FRAMES_TO_THE_STEP = 4


def test_the_command_reaches_the_pure_step_in_few_frames(tiny_config, tmp_path,
                                                         monkeypatch):
  """`python -m hc_jax.main` reaches `train_step` through a short path
  (flax's imagenet example: main, train_and_evaluate, the step)."""
  import inspect  # pylint: disable=import-outside-toplevel
  from conftest import config_flags  # pylint: disable=import-outside-toplevel
  from hc_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  from hc_jax.training import step as step_lib  # pylint: disable=import-outside-toplevel
  paths = []
  original = step_lib.train_step

  def spy(*args, **kwargs):
    paths.append([f'{os.path.basename(f.filename)}:{f.function}'
                  for f in inspect.stack()
                  if os.path.abspath(f.filename).startswith(PACKAGE + os.sep)])
    return original(*args, **kwargs)

  monkeypatch.setattr(step_lib, 'train_step', spy)
  assert main_lib.main(['--config=configs/default.py',
                        f'--workdir={tmp_path / "run"}',
                        *config_flags(tiny_config),
                        '--config.num_epochs=1']) == 0
  assert paths, 'train_step was never called'
  path = paths[0][::-1] + ['step.py:train_step']  # Outermost first.
  assert path[0] == 'main.py:main', path
  assert len(path) <= MAX_FRAMES_TO_THE_STEP, path
