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
  install_and_demo, tests = _set_up_commands()
  with open(os.path.join(REPO, '.ci', 'run')) as f:
    ci = re.search(r'^TEST_COMMAND="(.*)"$', f.read(), re.M).group(1)
  assert ci == tests
  assert 'pytest' in tests and 'hc_jax.main' in install_and_demo


def test_both_commands_work_from_a_fresh_shell():
  # Each line makes (or reuses) the venv and activates it, so neither depends
  # on a shell left activated by the other.
  for command in _set_up_commands():
    assert command.startswith('python3 -m venv .venv && . .venv/bin/activate')
    assert '\n' not in command
