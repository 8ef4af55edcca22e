"""What a killed hc_jax process leaves behind, and its removal.

A file that hc_jax writes whole or not at all is written first under a
temporary name carrying the writer's pid, `tmp_name(path)`:
`<name>.<pid>.tmp<suffix>` beside `<name>`, then renamed. A process killed
in between leaves that file; the next process writing the same kind of
file removes it with `remove_stale`, which takes only files whose writer no
longer runs on this host (never one a live process holds).

  tmp = leftovers.tmp_name(path, hidden=True)   # .out.csv.4242.tmp
  leftovers.remove_stale(folder, '.out.csv')
"""

import contextlib
import os
import re

# <stem>.<pid>.tmp<suffix>, the names `tmp_name` gives.
_TMP_NAME = re.compile(r'^(?P<stem>.+)\.(?P<pid>\d+)\.tmp(?P<suffix>[^/]*)$')


def pid_running(pid: int) -> bool:
  """Whether process `pid` runs on this host (as any user)."""
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Runs, as another user.
    return True
  return True


def tmp_name(path: str, suffix: str = '', hidden: bool = False) -> str:
  """The temporary name this process writes `path` under: `path` +
  `.<pid>.tmp` + `suffix`, in the same folder (its base name led by a dot
  when `hidden`)."""
  folder, name = os.path.split(path)
  if hidden and not name.startswith('.'):
    name = '.' + name
  return os.path.join(folder, f'{name}.{os.getpid()}.tmp{suffix}')


def remove_stale(folder: str, stem_prefix: str) -> list[str]:
  """Removes the temporary files (`tmp_name`) in `folder` whose stem starts
  with `stem_prefix` and whose writer no longer runs; best effort.

  Returns:
    The paths removed.
  """
  removed = []
  try:
    names = os.listdir(folder or '.')
  except OSError:
    return removed
  for name in names:
    match = _TMP_NAME.match(name)
    if not match or not match.group('stem').startswith(stem_prefix):
      continue
    pid = int(match.group('pid'))
    if pid == os.getpid() or pid_running(pid):
      continue
    path = os.path.join(folder, name)
    with contextlib.suppress(OSError):
      if os.path.isdir(path) and not os.path.islink(path):
        continue  # Only files carry these names.
      os.unlink(path)
      removed.append(path)
  return removed
