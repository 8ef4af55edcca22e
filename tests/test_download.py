"""HC18 from Zenodo: md5 checks, the download through an injected opener,
unpacking and the check of the copy, all without a network."""

import errno
import hashlib
import io
import json
import os
import re
import zipfile

import pytest

from conftest import ZENODO_API
from conftest import fake_zenodo
from hc_jax.data import download
from hc_jax.data import hc18
from hc_jax.data import phantom_set

NAMES = hc18.ZENODO_FILES


@pytest.fixture(scope='module')
def small_hc18(tmp_path_factory):
  """A phantom HC18 copy of 5 training and 2 test images."""
  root = tmp_path_factory.mktemp('small_hc18') / 'hc18'
  phantom_set.write_hc18(str(root), num_train=5, num_test=2, seed=3)
  return str(root)


class FakeOpener:
  """Serves {url: local file} as `urllib.request.urlopen` would, counting
  requests; `damage` changes one byte of a file, `cut_after` stops it short
  with an OSError."""

  def __init__(self, urls, damage=None, cut_after=None):
    self.urls, self.damage, self.cut_after = urls, damage, cut_after
    self.requested = []

  def __call__(self, url):
    self.requested.append(url)
    if url not in self.urls:
      raise OSError(f'HTTP Error 404: {url}')
    with open(self.urls[url], 'rb') as f:
      data = bytearray(f.read())
    name = url.rsplit('/', 2)[-2]
    if name == self.damage:
      data[len(data) // 2] ^= 0x01
    if name == self.cut_after:
      return _CutStream(bytes(data[:len(data) // 2]))
    return io.BytesIO(bytes(data))


class _CutStream(io.BytesIO):

  def read(self, size=-1):
    data = super().read(size)
    if not data:
      raise ConnectionResetError(104, 'Connection reset by peer')
    return data


def _md5(path):
  with open(path, 'rb') as f:
    return hashlib.md5(f.read()).hexdigest()


def _listing(folder):
  return sorted(os.listdir(folder))


# --- verify ---


def _copy_with_checksums(tmp_path):
  dest = tmp_path / 'copy'
  dest.mkdir()
  checksums = {}
  for name, text in (('a.csv', b'filename,pixel size(mm)\n'),
                     ('b.zip', bytes(range(256)) * 8)):
    (dest / name).write_bytes(text)
    checksums[name] = 'md5:' + hashlib.md5(text).hexdigest()
  return dest, checksums


def test_verify_passes_files_whose_md5_matches(tmp_path):
  dest, checksums = _copy_with_checksums(tmp_path)
  download.verify(str(dest), checksums)
  # The bare hex, as `md5sum` prints it, is taken too.
  download.verify(str(dest), {name: value.split(':')[1]
                              for name, value in checksums.items()})


def test_verify_refuses_a_changed_byte_in_one_line(tmp_path):
  dest, checksums = _copy_with_checksums(tmp_path)
  data = bytearray((dest / 'b.zip').read_bytes())
  data[100] ^= 0x80
  (dest / 'b.zip').write_bytes(bytes(data))
  with pytest.raises(download.DownloadError) as error:
    download.verify(str(dest), checksums)
  message = str(error.value)
  assert '\n' not in message
  assert 'b.zip has md5 ' + _md5(dest / 'b.zip') in message
  assert checksums['b.zip'][4:] in message and 'a.csv' not in message


def test_verify_names_a_missing_file(tmp_path):
  dest, checksums = _copy_with_checksums(tmp_path)
  (dest / 'a.csv').unlink()
  with pytest.raises(download.DownloadError,
                     match=r'does not match the Zenodo record: a\.csv is '
                     r'missing$'):
    download.verify(str(dest), checksums)


def test_verify_refuses_a_checksum_that_is_not_md5(tmp_path):
  dest, _ = _copy_with_checksums(tmp_path)
  with pytest.raises(download.DownloadError, match='not an md5 checksum'):
    download.verify(str(dest), {'a.csv': 'sha256:' + '0' * 64})


# --- fetch_hc18 ---


def test_fetch_downloads_verifies_unpacks_and_checks(tmp_path, small_hc18,
                                                     capsys):
  urls = fake_zenodo(small_hc18, str(tmp_path / 'zenodo'))
  opener = FakeOpener(urls)
  dest = tmp_path / 'hc18'
  assert download.fetch_hc18(str(dest), opener=opener) == str(dest)
  assert opener.requested[0] == ZENODO_API
  assert sorted(opener.requested[1:]) == sorted(
      f'{ZENODO_API}/files/{name}/content' for name in NAMES)
  assert _listing(dest) == sorted(NAMES + ('training_set', 'test_set'))
  for folder in ('training_set', 'test_set'):
    assert _listing(dest / folder) == _listing(os.path.join(small_hc18,
                                                            folder))
  for name in NAMES:
    assert _md5(dest / name) == _md5(tmp_path / 'zenodo' / name)
  out = capsys.readouterr().out
  assert 'training_set.zip: ' in out and 'md5 matches the record' in out
  assert 'HC18 at' in out and '5 train, 2 test images, checked' in out
  assert len(hc18.scan(str(dest))['train']) == 5

  # Again: only the record is read, the files are checked and kept.
  opener.requested.clear()
  before = {name: os.stat(dest / name).st_mtime_ns for name in NAMES}
  download.fetch_hc18(str(dest), opener=opener)
  assert opener.requested == [ZENODO_API]
  assert {name: os.stat(dest / name).st_mtime_ns for name in NAMES} == before
  assert 'already in' in capsys.readouterr().out


def test_fetch_takes_zips_without_a_top_folder(tmp_path, small_hc18):
  urls = fake_zenodo(small_hc18, str(tmp_path / 'zenodo'),
                     zip_top_folder=False)
  dest = tmp_path / 'hc18'
  download.fetch_hc18(str(dest), opener=FakeOpener(urls))
  assert _listing(dest / 'test_set') == _listing(
      os.path.join(small_hc18, 'test_set'))


def test_fetch_works_through_urllib(tmp_path, small_hc18):
  """The default opener (urllib) on file:// links: the real reading path."""
  urls = fake_zenodo(small_hc18, str(tmp_path / 'zenodo'))
  record = json.loads((tmp_path / 'zenodo' / 'record.json').read_text())
  for entry in record['files']:
    entry['links'] = {'self': 'file://' + urls[entry['links']['self']]}
  (tmp_path / 'zenodo' / 'record.json').write_text(json.dumps(record))
  dest = tmp_path / 'hc18'
  download.fetch_hc18(str(dest), api_url='file://' + str(
      tmp_path / 'zenodo' / 'record.json'), check=False)
  assert _listing(dest / 'training_set') == _listing(
      os.path.join(small_hc18, 'training_set'))


def test_a_download_whose_md5_differs_is_not_kept(tmp_path, small_hc18):
  urls = fake_zenodo(small_hc18, str(tmp_path / 'zenodo'))
  dest = tmp_path / 'hc18'
  with pytest.raises(download.DownloadError) as error:
    download.fetch_hc18(str(dest), opener=FakeOpener(
        urls, damage='training_set.zip'))
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith('training_set.zip from ')
  assert f'md5 {_md5(tmp_path / "zenodo" / "training_set.zip")}' in message
  assert 'nothing was kept' in message
  assert 'training_set.zip' not in _listing(dest)
  assert not [name for name in _listing(dest) if '.tmp' in name]
  # Fixed at the source, the same call finishes.
  download.fetch_hc18(str(dest), opener=FakeOpener(urls))
  assert 'training_set' in _listing(dest)


def test_a_cut_connection_keeps_nothing(tmp_path, small_hc18):
  urls = fake_zenodo(small_hc18, str(tmp_path / 'zenodo'))
  dest = tmp_path / 'hc18'
  with pytest.raises(download.DownloadError,
                     match=r'^cannot download test_set\.zip from .*'
                     r'ConnectionResetError.*run again to retry$'):
    download.fetch_hc18(str(dest), opener=FakeOpener(
        urls, cut_after='test_set.zip'))
  assert 'test_set.zip' not in _listing(dest)
  assert not [name for name in _listing(dest) if '.tmp' in name]


def test_a_differing_file_of_the_user_is_left_as_it_is(tmp_path, small_hc18):
  urls = fake_zenodo(small_hc18, str(tmp_path / 'zenodo'))
  dest = tmp_path / 'hc18'
  dest.mkdir()
  mine = dest / 'test_set_pixel_size.csv'
  mine.write_text('filename,pixel size(mm)\nmine.png,0.1\n')
  opener = FakeOpener(urls)
  with pytest.raises(download.DownloadError) as error:
    download.fetch_hc18(str(dest), opener=opener)
  message = str(error.value)
  assert '\n' not in message
  assert 'test_set_pixel_size.csv has md5' in message
  assert 'left as it is: move it away' in message
  assert mine.read_text() == 'filename,pixel size(mm)\nmine.png,0.1\n'


def test_an_existing_image_folder_is_kept(tmp_path, small_hc18):
  urls = fake_zenodo(small_hc18, str(tmp_path / 'zenodo'))
  dest = tmp_path / 'hc18'
  (dest / 'test_set').mkdir(parents=True)
  (dest / 'test_set' / 'notes.txt').write_text('mine')
  with pytest.raises(hc18.HC18Error, match='test_set/.*image is missing'):
    download.fetch_hc18(str(dest), opener=FakeOpener(urls))
  assert _listing(dest / 'test_set') == ['notes.txt']


def test_a_record_without_a_file_is_named(tmp_path, small_hc18):
  urls = fake_zenodo(small_hc18, str(tmp_path / 'zenodo'))
  record_path = tmp_path / 'zenodo' / 'record.json'
  record = json.loads(record_path.read_text())
  record['files'] = [entry for entry in record['files']
                     if entry['key'] != 'test_set.zip']
  record_path.write_text(json.dumps(record))
  with pytest.raises(download.DownloadError,
                     match=r'lists no test_set\.zip \(it lists '
                     r'test_set_pixel_size\.csv, training_set'):
    download.fetch_hc18(str(tmp_path / 'hc18'), opener=FakeOpener(urls))
  assert not (tmp_path / 'hc18').exists()


def test_a_destination_that_is_a_file_is_refused(tmp_path, small_hc18):
  urls = fake_zenodo(small_hc18, str(tmp_path / 'zenodo'))
  (tmp_path / 'hc18').write_text('mine')
  with pytest.raises(download.DownloadError,
                     match=r'hc18 exists and is not a folder; give another '
                     'destination$'):
    download.fetch_hc18(str(tmp_path / 'hc18'), opener=FakeOpener(urls))
  assert (tmp_path / 'hc18').read_text() == 'mine'


def test_a_full_disk_is_named_as_such(tmp_path, small_hc18, monkeypatch):
  urls = fake_zenodo(small_hc18, str(tmp_path / 'zenodo'))

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device', args[0])

  real_open = open
  monkeypatch.setattr('builtins.open', lambda path, mode='r', *args, **kw: (
      full_disk(path) if 'w' in mode else real_open(path, mode, *args, **kw)))
  with pytest.raises(download.DownloadError,
                     match=r'^cannot write training_set\.zip: .*no space left '
                     'on the device'):
    download.fetch_hc18(str(tmp_path / 'hc18'), opener=FakeOpener(urls))


def test_an_unreachable_record_is_one_line(tmp_path):
  with pytest.raises(download.DownloadError,
                     match=r'^cannot read the Zenodo record https://zenodo'
                     r'\.org/api/records/1327317 \(OSError: HTTP Error 404'):
    download.fetch_hc18(str(tmp_path / 'hc18'), opener=FakeOpener({}))


def test_the_record_in_inveniordm_shape_is_read(tmp_path, small_hc18):
  urls = fake_zenodo(small_hc18, str(tmp_path / 'zenodo'))
  record_path = tmp_path / 'zenodo' / 'record.json'
  record = json.loads(record_path.read_text())
  record['files'] = {'enabled': True, 'entries': {
      entry['key']: entry for entry in record['files']}}
  record_path.write_text(json.dumps(record))
  files = download.record_files(FakeOpener(urls))
  assert sorted(files) == sorted(NAMES)
  assert files['test_set.zip']['md5'] == _md5(tmp_path / 'zenodo' /
                                              'test_set.zip')


def test_a_copy_that_disagrees_with_its_csv_fails_the_check(tmp_path,
                                                           small_hc18):
  """md5s match the record, but an annotation's HC is not the CSV's: the
  check training makes stops it, naming the image."""
  copy = tmp_path / 'changed'
  copy.mkdir()
  for name in os.listdir(small_hc18):
    source = os.path.join(small_hc18, name)
    if os.path.isdir(source):
      os.symlink(source, copy / name)
    else:
      (copy / name).write_bytes(open(source, 'rb').read())
  csv_path = copy / 'training_set_pixel_size_and_HC.csv'
  lines = csv_path.read_text().splitlines()
  filename, pixel_size, hc_mm = lines[1].split(',')
  lines[1] = f'{filename},{pixel_size},{float(hc_mm) + 20:.2f}'
  csv_path.write_text('\n'.join(lines) + '\n')
  urls = fake_zenodo(str(copy), str(tmp_path / 'zenodo'))
  with pytest.raises(hc18.HC18Error) as error:
    download.fetch_hc18(str(tmp_path / 'hc18'), opener=FakeOpener(urls))
  [problem] = error.value.problems
  assert re.fullmatch(
      f'training_set/{filename}: annotation {filename[:-4]}_Annotation.png: '
      r'fitted ellipse gives HC [\d.]+ mm, the CSV says '
      f'{float(hc_mm) + 20:.2f} mm', problem), problem


def test_a_zip_reaching_outside_its_folder_is_refused(tmp_path, small_hc18):
  urls = fake_zenodo(small_hc18, str(tmp_path / 'zenodo'))
  zip_path = urls[f'{ZENODO_API}/files/test_set.zip/content']
  with zipfile.ZipFile(zip_path, 'a') as archive:
    archive.writestr('../escaped.txt', 'x')
  record_path = tmp_path / 'zenodo' / 'record.json'
  record = json.loads(record_path.read_text())
  for entry in record['files']:
    if entry['key'] == 'test_set.zip':
      entry['checksum'] = 'md5:' + _md5(zip_path)
      entry['size'] = os.path.getsize(zip_path)
  record_path.write_text(json.dumps(record))
  with pytest.raises(download.DownloadError,
                     match=r"holds a file outside its folder \('\.\./"
                     r"escaped\.txt'\)"):
    download.fetch_hc18(str(tmp_path / 'hc18'), opener=FakeOpener(urls))
  assert not (tmp_path / 'escaped.txt').exists()
  assert not (tmp_path / 'hc18' / 'test_set').exists()
