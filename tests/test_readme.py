"""The README's set-up commands and CI agree."""

import os
import re

from conftest import REPO


def _set_up_commands():
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  section = readme.split('## Set up', 1)[1].split('\n## ', 1)[0]
  return re.findall(r'```bash\n(.*?)\n```', section, re.S)


def test_ci_runs_the_readmes_test_command():
  install_and_predict, install_and_demo, tests = _set_up_commands()
  with open(os.path.join(REPO, '.ci', 'run')) as f:
    ci = re.search(r'^TEST_COMMAND="(.*)"$', f.read(), re.M).group(1)
  assert ci == tests
  assert 'pytest' in tests and 'hc_jax.main' in install_and_demo
  # The first command needs no data: the shipped model on the samples
  # (tests/test_shipped.py runs the same predict command).
  assert install_and_predict.endswith(
      'python -m hc_jax.predict --samples --out=hc.csv --overlays=overlays')


def test_both_commands_work_from_a_fresh_shell():
  # Each line makes (or reuses) the venv and activates it, so neither depends
  # on a shell left activated by the other.
  for command in _set_up_commands():
    assert command.startswith('python3 -m venv .venv && . .venv/bin/activate')
    assert '\n' not in command


def _readme_section(title):
  with open(os.path.join(REPO, 'README.md')) as f:
    return f.read().split(f'## {title}', 1)[1].split('\n## ', 1)[0]


def test_readme_documents_predicts_csv_statuses_and_exit_codes():
  # pylint: disable-next=import-outside-toplevel
  from hc_jax.evaluation import prediction_rows
  section = _readme_section('Predicting HC for new scans')
  assert 'python -m hc_jax.predict --workdir=' in section
  for column in prediction_rows.COLUMNS:
    assert f'`{column}`' in section, column
  for status in ('ok', 'uncertain', 'implausible', 'refused', 'error'):
    assert f'| `{status}` |' in section, status
  for code in ('0', '1', '2'):
    assert re.search(rf'\b{code}\s+(when|for)\b', section), code


def test_docs_speak_of_the_project_alone():
  # How the project was developed is no part of its documentation.
  banned = re.compile(r'\bbrief\b|\bsessions?\b|\bissue \d|#\d+\b|'
                      r'run\(command=|carry=|\bnot retrieved\b|/work/',
                      re.I)
  paths = ['README.md'] + [os.path.join('docs', name) for name in
                           sorted(os.listdir(os.path.join(REPO, 'docs')))
                           if name.endswith('.md')]
  for path in paths:
    with open(os.path.join(REPO, path)) as f:
      for number, line in enumerate(f, 1):
        line = line.replace('jax-ml/jax#13800', '')
        assert not banned.search(line), f'{path}:{number}: {line.strip()}'
