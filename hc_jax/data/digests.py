"""Digests of an HC18 copy: of its names and sizes, and of its content.

`source_digest` is cheap (the CSVs' bytes, the images' names and sizes);
`content_digest` hashes the bytes of every file, once: `HASHES_FILE` in the
cache directory remembers each file's SHA-256 by its path, size and
modification and change times, so unchanged files are not read again.
`hc_jax.data.cache` keys its cache by the content digest, and runs record
both.
"""

import contextlib
import hashlib
import json
import os

from hc_jax import leftovers
from hc_jax.data import hc18

# In the cache directory: each source file's SHA-256 by path, size and times.
HASHES_FILE = 'file_hashes.json'


def source_digest(root: str) -> str:
  """A digest of an HC18 directory: CSV bytes, image names and sizes.

  Cheap (file sizes, not image bytes), and it changes when a file is added,
  removed, renamed, truncated or replaced by one of another size, or when a
  label changes; not when an image changes in place at the same size
  (`content_digest` does). Runs record it ('source_digest'), and
  `hc_jax.cv_score` compares a run's with an HC18 copy's.
  """
  digest = hashlib.sha256()
  for _, csv_name in hc18.SPLITS.values():
    path = os.path.join(root, csv_name)
    digest.update(csv_name.encode())
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        digest.update(hashlib.sha256(f.read()).digest())
  for folder, _ in hc18.SPLITS.values():
    for name in (folder, folder + '.zip'):
      path = os.path.join(root, name)
      if os.path.isfile(path):
        digest.update(f'{name}:{os.path.getsize(path)}\n'.encode())
      elif os.path.isdir(path):
        for directory, dirs, files in os.walk(path):
          dirs.sort()
          for file in sorted(files):
            full = os.path.join(directory, file)
            try:
              size = os.path.getsize(full)
            except OSError:
              size = -1  # A broken link: the check reports it.
            digest.update(
                f'{os.path.relpath(full, root)}:{size}\n'.encode())
  return digest.hexdigest()[:16]


def _sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def _source_files(root: str) -> list[tuple[str, str]]:
  """(name relative to `root`, path) of every file of an HC18 copy: its CSVs,
  its image folders' files and its zips, sorted."""
  files = [(csv_name, os.path.join(root, csv_name))
           for _, csv_name in hc18.SPLITS.values()]
  for folder, _ in hc18.SPLITS.values():
    for name in (folder, folder + '.zip'):
      path = os.path.join(root, name)
      if os.path.isfile(path):
        files.append((name, path))
      elif os.path.isdir(path):
        for directory, dirs, names in os.walk(path):
          dirs.sort()
          files += [(os.path.relpath(os.path.join(directory, n), root),
                     os.path.join(directory, n)) for n in sorted(names)]
  return files


def _read_hashes(path: str) -> dict[str, list]:
  try:
    with open(path) as f:
      hashes = json.load(f)
    return hashes if isinstance(hashes, dict) else {}
  except (OSError, ValueError):  # None yet, or damaged: hash again.
    return {}


def _write_hashes(path: str, hashes: dict[str, list]) -> None:
  """Best effort: without the file, files are only hashed again."""
  leftovers.remove_stale(os.path.dirname(path), os.path.basename(path))
  tmp = leftovers.tmp_name(path)
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, 'w') as f:
      json.dump(hashes, f)
    os.replace(tmp, path)
  except OSError:
    with contextlib.suppress(OSError):
      os.remove(tmp)


def content_digest(root: str, hashes_path: str | None = None,
                   recheck: bool = False) -> str:
  """A digest of the bytes of every file of an HC18 directory.

  It changes with any change to a file's content, even one that keeps the
  file's name and size (an image corrupted in place, or replaced by another
  of the same size).

  Args:
    root: an HC18 directory in the Zenodo layout.
    hashes_path: a JSON file remembering each file's SHA-256 by its path,
      size, mtime_ns and ctime_ns (None: hash every file); a file whose four
      are unchanged is not read again.
    recheck: hash every file, whatever `hashes_path` remembers, and
      remember the hashes found (the remembered ones may be wrong).
  """
  return files_digest(_source_files(root), hashes_path, recheck)


def files_digest(files: list[tuple[str, str]],
                 hashes_path: str | None = None,
                 recheck: bool = False) -> str:
  """A digest of the names and bytes of `files`, (name, path) pairs in
  order; `hashes_path` and `recheck` as in `content_digest`."""
  hashes = _read_hashes(hashes_path) if hashes_path else {}
  digest = hashlib.sha256()
  changed = False
  for name, path in files:
    key = os.path.abspath(path)
    try:
      stat = os.stat(path)
      signature = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
      entry = hashes.get(key)
      if (not recheck and isinstance(entry, list) and len(entry) == 4
          and entry[:3] == signature):
        file_hash = entry[3]
      else:
        file_hash = _sha256_file(path)
        changed = changed or entry != signature + [file_hash]
        hashes[key] = signature + [file_hash]
    except OSError as e:  # Missing or unreadable: the check reports it.
      file_hash = f'unreadable ({type(e).__name__})'
    digest.update(f'{name}:{file_hash}\n'.encode())
  if changed and hashes_path:
    _write_hashes(hashes_path, hashes)
  return digest.hexdigest()[:16]
