"""The config files' docstrings say what their `get_config()` makes.

Every file in configs/ opens with a docstring that gives the command that runs
it and states the config's figures: the model, the input size, the epochs, the
loss, the widths, the phantom scans, a parameter count. These tests parse the
docstrings' commands as the commands would (nothing is trained) and check each
figure that `FIGURES` recognises against the config, so that a config changed
without its docstring fails here. A sentence that names another config file
or sets a field (`--config.KEY=VALUE`) is about another configuration and is
not checked for figures.
"""

import ast
import collections
import functools
import importlib
import os
import re
import shlex

import jax
import jax.numpy as jnp
import pytest

from hc_jax import cli
from hc_jax import grid
from hc_jax import main as main_lib
from hc_jax import models
from hc_jax import predict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_DIR = os.path.join(REPO, 'configs')
NAMES = cli.config_files(CONFIGS_DIR)

# The commands a docstring may give, by module, and how each reads its
# arguments (an argparse parser: a bad flag exits with status 2).
PARSERS = {
    'hc_jax.main': main_lib._parse_args,  # pylint: disable=protected-access
    'hc_jax.grid': grid._parse_args,  # pylint: disable=protected-access
    'hc_jax.predict': predict._parse_args,  # pylint: disable=protected-access
}
# `python -m MODULE --flag=VALUE ...`, continued over lines ending in `\`.
COMMAND = re.compile(r'python -m ([\w.]+)((?:[ \t]+(?:\\\n[ \t]*)?--[^\s`]+)*)')
OVERRIDE = re.compile(r'--config\.([\w.]+)=([^\s`,)]+)')
# A config file named in prose: configs/X.py or X.py, not hc_jax/nets/X.py.
CONFIG_FILE = re.compile(r'(?<![\w/])(?:configs/)?(\w+\.py)\b')
MODEL = re.compile(r'(?<![\w/])(%s)(?![\w/]|\.py)' % '|'.join(
    sorted(models.MODELS, key=len, reverse=True)))

# Helper functions of the config files (all but get_config), each with the
# config it is checked on: its docstring states what it sets, so its figures
# hold for the helper applied to that config; a sentence of it that names
# `get_config` is checked against its own file's get_config().
HELPERS = {'demo.small_on_phantoms': 'hcnet_mask.py'}


def _config(name, overrides=()):
  return cli.load_config(os.path.join(CONFIGS_DIR, name), overrides)


def _input_size(config):
  """(rows, columns) of the model input: image_size x image_width."""
  return (config.image_size, config.image_width or config.image_size)


def _num_synthetic(config):
  return (config.data.num_synthetic if config.data.source == 'synthetic'
          else None)


@functools.lru_cache(maxsize=None)
def _param_count(model, options, rows, columns):
  """The number of parameters of a model at an input size, from shapes."""
  module = models.create_model(model, layers='plain', **dict(options))
  images = jnp.zeros((1, rows, columns, 1), jnp.float32)
  variables = jax.eval_shape(
      lambda: module.init(jax.random.key(0), images, train=False))
  return models.count_params(variables['params'])


def _params(config):
  options = tuple(sorted(
      (key, tuple(value) if isinstance(value, list) else value)
      for key, value in config.model_options.to_dict().items()))
  return _param_count(config.model, options, *_input_size(config))


def _about(count, unit):
  """'263K' holds for 262,000 to 264,000: one unit of the last digit off,
  rounded or truncated."""
  return lambda actual: abs(actual - count * unit) < unit


_UNITS = {'K': 1_000, 'M': 1_000_000}

# A figure: the phrase that states it (searched in each sentence, every
# match checked), the field it states, the field's value in a config, and
# the value the phrase states (or, for a rounded figure, a test of the
# config's value).
Figure = collections.namedtuple('Figure', 'pattern field actual stated')
FIGURES = (
    # The model input, rows x columns (`image_size` x `image_width`, 0 width
    # for square): 128x192 is 128 rows. 'WxH aspect' is a scan's size
    # (HC18's 800x540), not the input's.
    Figure(r'\b(\d+)x(\d+)\b(?! aspect)', 'image_size x image_width',
           _input_size, lambda m: (int(m[1]), int(m[2]))),
    Figure(r'\b(\d+) epochs\b', 'num_epochs',
           lambda c: c.num_epochs, lambda m: int(m[1])),
    Figure(r'\b(\d+) warm-up epochs\b|\((\d+) warm-up\)', 'warmup_epochs',
           lambda c: c.warmup_epochs, lambda m: int(m[1] or m[2])),
    Figure(r'(?i)\b(mae|mse|huber)\b', 'loss',
           lambda c: c.loss, lambda m: m[1].lower()),
    Figure(r'\b(\d+) (?:phantoms|phantom scans|synthetic scans)\b',
           'data.num_synthetic', _num_synthetic, lambda m: int(m[1])),
    Figure(r'\bwidths \((\d+(?:, \d+)*)\)', 'model_options.widths',
           lambda c: tuple(c.model_options.get('widths', ())),
           lambda m: tuple(int(w) for w in m[1].split(', '))),
    Figure(r'\b(\d+)-pixel margin\b', 'model_options.margin',
           lambda c: c.model_options.get('margin'), lambda m: int(m[1])),
    Figure(r'\bweight decay (\d[\d.e-]*\d)', 'weight_decay',
           lambda c: c.weight_decay, lambda m: float(m[1])),
    Figure(r'\bAdamW? (\d[\d.e-]*\d)', 'learning_rate',
           lambda c: c.learning_rate, lambda m: float(m[1])),
    Figure(r'\b(cosine) schedule\b', 'lr_schedule',
           lambda c: c.lr_schedule, lambda m: m[1]),
    Figure(r'\b[Ss]cale augmentation ([\d.]+)-([\d.]+)',
           'augment.scale_range', lambda c: c.augment.scale_range,
           lambda m: (float(m[1]), float(m[2]))),
    # Parameters: exact ('308,985 parameters'), or rounded ('the 263K CNN').
    Figure(r'\b(\d{1,3}(?:,\d{3})+|\d+) parameters\b', 'parameters',
           _params, lambda m: int(m[1].replace(',', ''))),
    Figure(r'\b(\d+)([KM])(?= CNN| parameters)', 'parameters',
           _params, lambda m: _about(int(m[1]), _UNITS[m[2]])),
)


def _docstrings(name):
  """{'': the module docstring, 'FUNCTION': each function's docstring}."""
  with open(os.path.join(CONFIGS_DIR, name), encoding='utf-8') as f:
    tree = ast.parse(f.read())
  docs = {'': ast.get_docstring(tree) or ''}
  for node in tree.body:
    if isinstance(node, ast.FunctionDef):
      docs[node.name] = ast.get_docstring(node) or ''
  return docs


def _sentences(doc):
  """The docstring's prose, without its command lines, as sentences."""
  lines, continued = [], False
  for line in doc.splitlines():
    stripped = line.strip()
    if stripped.startswith('python -m') or continued:
      continued = stripped.endswith('\\')
      continue
    lines.append(stripped)
  text = re.sub(r'\s+', ' ', ' '.join(lines)).strip()
  return [s for s in re.split(r'(?<=[.!?])\s+(?=[A-Z`(])', text) if s]


def _about_another_config(sentence, name):
  """Whether a sentence names another config file or a changed field."""
  named = {f for f in CONFIG_FILE.findall(sentence) if f in NAMES}
  return bool(named - {name}) or '--config.' in sentence


def _check_figures(sentence, config, where):
  """The failures, one line each, of the figures a sentence states."""
  failures = []
  for figure in FIGURES:
    for match in re.finditer(figure.pattern, sentence):
      actual, stated = figure.actual(config), figure.stated(match)
      same = stated(actual) if callable(stated) else stated == actual
      if not same:
        failures.append(f'{where}: "{match[0]}" but {figure.field} is '
                        f'{actual!r}, in: {sentence}')
  return failures


def test_every_config_file_has_a_docstring_and_a_command():
  assert NAMES and 'default.py' in NAMES
  for name in NAMES:
    doc = _docstrings(name)['']
    assert doc, f'configs/{name} has no docstring'
    commands = COMMAND.findall(doc)
    assert commands, f'configs/{name}: its docstring gives no command'
    # The first command runs this config.
    module, args = commands[0]
    assert module in ('hc_jax.main', 'hc_jax.grid'), (name, module)
    assert f'configs/{name}' in args, (name, args)


@pytest.mark.parametrize('name', NAMES)
def test_docstring_commands_parse(name, monkeypatch):
  """Each command's flags are its module's, its config files exist and its
  `--config.KEY=VALUE` overrides name fields of them with values of their
  types; so do the overrides the prose mentions."""
  monkeypatch.chdir(REPO)  # The commands' paths are relative to the checkout.
  doc = _docstrings(name)['']
  for module, args in COMMAND.findall(doc):
    argv = [arg for arg in shlex.split(args) if arg != '\\']
    assert module in PARSERS, f'configs/{name}: unknown command {module}'
    try:
      parsed = PARSERS[module](argv)
    except SystemExit:
      pytest.fail(f'configs/{name}: python -m {module} {" ".join(argv)}: '
                  'does not parse (see its error above)')
    if module == 'hc_jax.main':
      cli.load_config(parsed.config, parsed.overrides)
    elif module == 'hc_jax.grid':
      assert parsed.configs
      for path in parsed.configs:
        cli.load_config(path, parsed.override)
  for key, value in OVERRIDE.findall(doc):
    _config(name, [f'{key}={value}'])


@pytest.mark.parametrize('name', NAMES)
def test_summary_names_the_model(name):
  """The docstring's first sentence names the config's model first."""
  config = _config(name)
  summary = _sentences(_docstrings(name)[''])[0]
  named = MODEL.findall(summary)
  assert named and named[0] == config.model, (
      f'configs/{name}: model {config.model!r}, but the summary names '
      f'{named}: {summary}')


@pytest.mark.parametrize('name', NAMES)
def test_docstring_figures_match_the_config(name):
  config = _config(name)
  failures = []
  for sentence in _sentences(_docstrings(name)['']):
    if not _about_another_config(sentence, name):
      failures += _check_figures(sentence, config, f'configs/{name}')
  assert not failures, '\n'.join(failures)


def test_every_helper_is_checked():
  """Every function of a config file but get_config is in HELPERS."""
  helpers = {f'{name[:-3]}.{function}' for name in NAMES
             for function in _docstrings(name)
             if function not in ('', 'get_config')}
  assert helpers == set(HELPERS)


@pytest.mark.parametrize('helper', sorted(HELPERS))
def test_helper_docstring_figures(helper):
  """A helper's docstring states what it sets (checked on the helper applied
  to its HELPERS config) and what its file's get_config then changes (the
  sentences that name `get_config`)."""
  module_name, function = helper.split('.')
  name = f'{module_name}.py'
  module = importlib.import_module(f'configs.{module_name}')
  applied = getattr(module, function)(_config(HELPERS[helper]))
  final = _config(name)
  doc = _docstrings(name)[function]
  assert doc, f'configs/{name}: {function} has no docstring'
  failures = []
  for sentence in _sentences(doc):
    if 'get_config' in sentence:
      failures += _check_figures(sentence, final, f'configs/{name}')
    elif not _about_another_config(sentence, name):
      failures += _check_figures(sentence, applied, helper)
  assert not failures, '\n'.join(failures)


def test_figures_are_recognised():
  """The patterns read the phrases the docstrings use."""
  config = _config('hcnet_mask.py')
  sentence = ('A 128x192 input (HC18\'s 800x540 aspect kept), 50 epochs (3 '
              'warm-up), the mae, widths (8, 16, 32, 64, 64), 308,985 '
              'parameters.')
  assert not _check_figures(sentence, config, 'x')
  wrong = ('A 64x64 input, 40 epochs (2 warm-up), the mse, widths (8, 16), '
           '300K parameters.')
  assert len(_check_figures(wrong, config, 'x')) == 6
  assert _about_another_config('As configs/hcnet_label.py otherwise.',
                               'hcnet_mask.py')
  assert _about_another_config('(`--config.image_width=192`)', 'hcnet_mask.py')
  assert not _about_another_config('See hc_jax/nets/hcnet_mask.py.',
                                   'demo.py')
