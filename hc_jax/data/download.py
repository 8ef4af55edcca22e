"""Fetches HC18 from Zenodo and checks the copy, without TensorFlow.

  from hc_jax.data import download
  hc18_dir = download.fetch_hc18('/content/hc18')

The files' links and md5 sums are read from the record's API (`RECORD_API`,
Zenodo record 1327317); only their names are fixed here
(`hc18.ZENODO_FILES`). Each file is streamed to a temporary name beside its
destination and gets its own name only once its md5 matches the record's,
so a cut or damaged download never passes for a good one. A file already at
the destination is kept when its md5 matches and refused, left as it is,
when it does not. The zips are unpacked to `training_set/` and `test_set/`
(an existing folder is kept), and the copy is then checked as training
reads it (`hc18.scan_split`: every image decoded, every annotation fitted
and its HC compared with the CSV's).

The URL opener is an argument, so the whole path runs in the tests without
a network.
"""

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import time
from typing import Any, BinaryIO, Callable
import urllib.error
import urllib.request
import zipfile

from hc_jax import leftovers
from hc_jax import log
from hc_jax.data import hc18

RECORD_API = 'https://zenodo.org/api/records/1327317'
# What a download reads at a time, and how often it says how far it got.
_CHUNK_BYTES = 1 << 20
_PROGRESS_EVERY_S = 30.0
_TIMEOUT_S = 60.0

Opener = Callable[[str], BinaryIO]


class DownloadError(ValueError):
  """A download that fails, or a file that differs from the record; the
  message is one line saying which file and what to do."""


def _megabytes(num_bytes: int) -> str:
  return f'{num_bytes / 1e6:.1f} MB' if num_bytes >= 1e5 else (
      f'{num_bytes} bytes')


def default_opener(url: str) -> BinaryIO:
  """`urllib.request.urlopen(url)` with a timeout: a stalled connection is
  an error, not a hang."""
  return urllib.request.urlopen(url, timeout=_TIMEOUT_S)  # pylint: disable=consider-using-with


def md5_of(path: str) -> str:
  """The md5 of a file, as 32 lowercase hex digits."""
  digest = hashlib.md5()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(_CHUNK_BYTES), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _bare_md5(checksum: str) -> str:
  """'md5:abc...' or 'abc...' as 'abc...'; DownloadError for another kind."""
  kind, _, value = checksum.rpartition(':')
  value = value.strip().lower()
  if kind.lower() not in ('', 'md5') or not re.fullmatch(r'[0-9a-f]{32}',
                                                         value):
    raise DownloadError(f'not an md5 checksum: {checksum!r}')
  return value


def verify(dest: str, checksums: dict[str, str]) -> None:
  """Checks that each file of `checksums` is in `dest` with its md5.

  Args:
    dest: the folder holding the files.
    checksums: {file name: md5} ('md5:<hex>', as Zenodo writes it, or the
      bare hex).

  Raises:
    DownloadError: in one line naming every missing file and every file whose
      md5 differs.
  """
  problems = []
  for name, checksum in sorted(checksums.items()):
    want = _bare_md5(checksum)
    path = os.path.join(dest, name)
    if not os.path.isfile(path):
      problems.append(f'{name} is missing')
      continue
    got = md5_of(path)
    if got != want:
      problems.append(f'{name} has md5 {got}, the record says {want}')
  if problems:
    raise DownloadError(f'HC18 at {dest} does not match the Zenodo record: '
                        + '; '.join(problems))


def _read_json(opener: Opener, url: str) -> Any:
  try:
    with opener(url) as response:
      return json.loads(response.read())
  except (OSError, http.client.HTTPException, ValueError) as e:
    raise DownloadError(f'cannot read the Zenodo record {url} '
                        f'({log.error_line(e)}); check the connection and '
                        'run again') from None


def record_files(opener: Opener | None = None, api_url: str = RECORD_API
                 ) -> dict[str, dict[str, Any]]:
  """The files of the Zenodo record, as its API lists them.

  Args:
    opener: opens a URL for reading (`default_opener` when None).
    api_url: the record's API address.

  Returns:
    {file name: {'url': its download link, 'md5': its md5 (hex),
    'size': its size in bytes or None}}.

  Raises:
    DownloadError: the record cannot be read, or lists a file without a link
      or an md5.
  """
  record = _read_json(opener or default_opener, api_url)
  files = record.get('files') if isinstance(record, dict) else None
  if isinstance(files, dict):  # InvenioRDM's own shape: {'entries': ...}.
    files = files.get('entries')
  if isinstance(files, dict):
    files = list(files.values())
  if not isinstance(files, list):
    raise DownloadError(f'the Zenodo record {api_url} lists no files')
  out = {}
  for entry in files:
    name = entry.get('key') or entry.get('filename')
    links = entry.get('links') or {}
    url = links.get('content') or links.get('self') or links.get('download')
    checksum = entry.get('checksum')
    if not (name and url and checksum):
      raise DownloadError(f'the Zenodo record {api_url} lists a file without '
                          f'a name, a link or a checksum: {entry!r:.200}')
    size = entry.get('size', entry.get('filesize'))
    out[name] = {'url': url, 'md5': _bare_md5(checksum),
                 'size': int(size) if size is not None else None}
  return out


def _remove_stale(dest: str, names) -> None:
  """Removes what a killed earlier fetch left in `dest`: the temporary files
  and folders named by `leftovers.tmp_name` whose writer no longer runs."""
  stems = tuple('.' + name for name in names)
  with contextlib.suppress(OSError):
    for entry in os.listdir(dest):
      match = re.fullmatch(r'(.+)\.(\d+)\.tmp', entry)
      if not match or not match.group(1).startswith(stems):
        continue
      pid = int(match.group(2))
      if pid == os.getpid() or leftovers.pid_running(pid):
        continue
      path = os.path.join(dest, entry)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        with contextlib.suppress(OSError):
          os.unlink(path)


def _download(name: str, entry: dict, path: str, opener: Opener) -> None:
  """Streams `entry['url']` to `path` through a temporary file, which gets
  its name only when its md5 (and size) match the record's."""
  size = entry['size']
  what = _megabytes(size) if size is not None else 'size unknown'
  log.info(f'downloading {name} ({what}) from {entry["url"]}')
  tmp = leftovers.tmp_name(path, hidden=True)
  digest, received = hashlib.md5(), 0
  started = last_report = time.monotonic()
  try:
    with opener(entry['url']) as response, open(tmp, 'wb') as out:
      for chunk in iter(lambda: response.read(_CHUNK_BYTES), b''):
        out.write(chunk)
        digest.update(chunk)
        received += len(chunk)
        now = time.monotonic()
        if now - last_report >= _PROGRESS_EVERY_S:
          last_report = now
          share = f' of {size / 1e6:.1f}' if size else ''
          log.info(f'  {name}: {received / 1e6:.1f}{share} MB')
    got = digest.hexdigest()
    if got != entry['md5'] or (size is not None and received != size):
      raise DownloadError(
          f'{name} from {entry["url"]}: got {received} bytes with md5 {got}, '
          f'the record says {size} bytes with md5 {entry["md5"]}; nothing was '
          'kept, run again to retry')
    if os.path.lexists(path):  # Written by someone else meanwhile: theirs.
      raise DownloadError(f'{path} appeared while it was downloaded; it is '
                          'left as it is, run again to check it')
    os.replace(tmp, path)
  except (OSError, http.client.HTTPException) as e:
    local = (None if isinstance(e, urllib.error.URLError) else
             log.storage_error_text(e, tmp))
    if local:  # This machine's disk, not the network.
      raise DownloadError(f'cannot write {name}: {local}') from None
    raise DownloadError(f'cannot download {name} from {entry["url"]} '
                        f'({log.error_line(e)}); run again to retry'
                        ) from None
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
  seconds = time.monotonic() - started
  log.info(f'{name}: {_megabytes(received)} in {seconds:.0f} s, md5 '
           'matches the record')


def _safe_members(archive: zipfile.ZipFile, zip_path: str) -> None:
  for member in archive.namelist():
    parts = member.replace('\\', '/').split('/')
    if member.startswith(('/', '\\')) or '..' in parts or ':' in parts[0]:
      raise DownloadError(f'{zip_path} holds a file outside its folder '
                          f'({member!r}); it is not unpacked')


def _unpack(zip_path: str, target: str) -> None:
  """Unpacks a Zenodo zip to `target` (its images directly inside, whether
  or not the zip has a top folder), through a temporary folder; an existing
  `target` is kept as it is."""
  name = os.path.basename(target)
  if os.path.isdir(target):
    log.info(f'{name}/ is there already: kept as it is (delete it to unpack '
             f'{os.path.basename(zip_path)} again)')
    return
  if os.path.lexists(target):
    raise DownloadError(f'{target} exists and is not a folder; move it away '
                        'and run again')
  tmp = leftovers.tmp_name(target, hidden=True)
  try:
    with zipfile.ZipFile(zip_path) as archive:
      _safe_members(archive, zip_path)
      archive.extractall(tmp)
    inner = os.path.join(tmp, name)
    os.rename(inner if os.path.isdir(inner) else tmp, target)
  except (zipfile.BadZipFile, OSError) as e:
    raise DownloadError(f'cannot unpack {zip_path} ({log.error_line(e)})'
                        ) from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  log.info(f'{os.path.basename(zip_path)} unpacked to {name}/')


def fetch_hc18(dest: str, *, opener: Opener | None = None,
               api_url: str = RECORD_API,
               names: tuple[str, ...] = hc18.ZENODO_FILES,
               check: bool = True) -> str:
  """Downloads HC18 from Zenodo into `dest`, verifies it and unpacks it.

  Running it again downloads only what is missing: a file already in `dest`
  whose md5 matches the record is kept.

  Args:
    dest: the folder to fill (created if missing), which then holds the
      Zenodo layout (`hc18.SPLITS`) and the zips.
    opener: opens a URL for reading, e.g. `urllib.request.urlopen`
      (`default_opener` when None).
    api_url: the Zenodo record's API address.
    names: the record's files to fetch; zips among them are unpacked.
    check: check the copy as training reads it (`hc18.scan_split` of each
      split whose CSV is fetched; a minute or two for the whole data set).

  Returns:
    `dest`, absolute: the `data.hc18_dir` of a config.

  Raises:
    DownloadError: in one line, when the record cannot be read or lacks a
      file, a download fails or does not match the record's md5, or a file
      already in `dest` differs from the record (it is left as it is).
    hc18.HC18Error: the unpacked copy fails the checks of training, listing
      every bad file.
  """
  dest = os.path.abspath(dest)
  files = record_files(opener, api_url)
  lacking = [name for name in names if name not in files]
  if lacking:
    raise DownloadError(f'the Zenodo record {api_url} lists no '
                        f'{", ".join(lacking)} (it lists '
                        f'{", ".join(sorted(files)) or "nothing"})')
  if os.path.lexists(dest) and not os.path.isdir(dest):
    raise DownloadError(f'{dest} exists and is not a folder; give another '
                        'destination')
  try:
    os.makedirs(dest, exist_ok=True)
  except OSError as e:
    raise DownloadError(f'cannot make {dest}: '
                        f'{log.storage_error_text(e, dest) or log.error_line(e)}'
                        ) from None
  _remove_stale(dest, names + tuple(folder for folder, _ in
                                    hc18.SPLITS.values()))
  for name in names:
    path = os.path.join(dest, name)
    if os.path.lexists(path):
      try:
        verify(dest, {name: files[name]['md5']})
      except DownloadError as e:
        raise DownloadError(f'{e}; it is left as it is: move it away and run '
                            'again to download it') from None
      log.info(f'{name}: already in {dest}, md5 matches the record')
      continue
    _download(name, files[name], path, opener or default_opener)
  for name in names:
    if name.endswith('.zip'):
      _unpack(os.path.join(dest, name), os.path.join(dest, name[:-4]))
  if check:
    _check(dest, names)
  return dest


def _check(dest: str, names) -> None:
  """`hc18.scan_split` of each split whose CSV is among `names`."""
  log.info(f'checking every image and annotation in {dest} ...')
  counts, problems = [], []
  for split, (_, csv_name) in hc18.SPLITS.items():
    if csv_name in names:
      records, split_problems = hc18.scan_split(dest, split)
      counts.append(f'{len(records)} {split}')
      problems += split_problems
  if problems:
    raise hc18.HC18Error(dest, problems)
  log.info(f'HC18 at {dest}: {", ".join(counts)} images, checked against '
           'their CSVs')
