"""The manifest of a checkpoint: the size and CRC32 of each of its files.

After orbax has written a step directory, `write` records the size and CRC32
of every file in it in `MANIFEST_FILE`, and `verify` checks them before a
restore (orbax itself does not notice some damage to array data). It also
records the digest of the run's model config (`config_digest`,
`workdir.model_config_digest`), which a restore for prediction compares
with the run's config.json now. A step
directory without its manifest (a save cut short after orbax finished it) is
`UnverifiedError`: it cannot be checked. Both errors are
`hc_jax.training.checkpoint`'s own (`checkpoint.CheckpointError`).
"""

import json
import os
import zlib

from hc_jax import log

# Written in each step directory after orbax has finished it.
MANIFEST_FILE = 'hc_jax_manifest.json'


class CheckpointError(ValueError):
  """A checkpoint cannot be written or restored."""


class UnverifiedError(CheckpointError):
  """A checkpoint has no manifest to check it against."""


def _crc32(path: str) -> int:
  crc = 0
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(step_dir: str) -> list[str]:
  """Paths (relative to `step_dir`) of its files, but the manifest."""
  found = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      relative = os.path.relpath(os.path.join(root, name), step_dir)
      if relative != MANIFEST_FILE:
        found.append(relative)
  return sorted(found)


def write(step_dir: str, config_digest: str | None = None) -> None:
  """Records the size and CRC32 of every file of a finished step directory,
  and `config_digest` (the run's model config) where given."""
  files = {}
  for relative in _files(step_dir):
    path = os.path.join(step_dir, relative)
    files[relative] = {'size': os.path.getsize(path), 'crc32': _crc32(path)}
  path = os.path.join(step_dir, MANIFEST_FILE)
  record = {'files': files}
  if config_digest is not None:
    record['config_digest'] = config_digest
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + '.tmp', path)


def config_digest(step_dir: str) -> str | None:
  """The model-config digest a step's manifest records (None: none, or no
  readable manifest; `verify` reports the latter)."""
  try:
    with open(os.path.join(step_dir, MANIFEST_FILE)) as f:
      value = json.load(f).get('config_digest')
  except (OSError, ValueError, AttributeError):
    return None
  return value if isinstance(value, str) else None


def verify(step_dir: str) -> None:
  """Checks a step directory against its manifest.

  Raises:
    UnverifiedError: it has no manifest (the process was killed after orbax
      finished it, before the manifest was written): it cannot be checked.
    CheckpointError: naming the first file that is missing or differs.
  """
  path = os.path.join(step_dir, MANIFEST_FILE)
  try:
    with open(path) as f:
      files = json.load(f)['files']
  except FileNotFoundError:
    raise UnverifiedError(f'{step_dir} has no {MANIFEST_FILE}: its save was '
                          'cut short, so it cannot be verified') from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
        f'{path} is unreadable ({log.error_line(e)})') from None
  try:
    for relative, expected in sorted(files.items()):
      file = os.path.join(step_dir, relative)
      if not os.path.isfile(file):
        raise CheckpointError(f'{file} is missing')
      size = os.path.getsize(file)
      if size != expected['size']:
        raise CheckpointError(f'{file} has {size} bytes, '
                              f'{expected["size"]} were written')
      if _crc32(file) != expected['crc32']:
        raise CheckpointError(f'{file} differs from what was written '
                              '(CRC32 mismatch)')
  except (OSError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(f'{step_dir} cannot be checked ({log.error_line(e)})'
                          ) from None
