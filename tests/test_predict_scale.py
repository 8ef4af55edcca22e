"""Predicting many scans: bounded chunks and the terminal progress line."""

import io

import numpy as np
from PIL import Image

from hc_jax import log
from hc_jax import predict
from hc_jax.evaluation import prediction_rows


class _CountingStub:
  """A label-model predictor that records how many images each call gets."""
  predicts_ellipse = False
  kind = 'hc'

  def __init__(self):
    self.calls = []

  def __call__(self, images, pixel_sizes_mm, **unused):
    del unused
    self.calls.append(len(images))
    n = len(images)
    return {'hc_px': np.full(n, 1000.0), 'hc_mm': np.full(n, 150.0),
            'hc_mm_sd': np.full(n, np.nan),
            'status': np.full(n, 'ok', object),
            'message': np.full(n, '', object)}


def test_a_large_folder_is_predicted_in_bounded_chunks(monkeypatch, tmp_path,
                                                       capsys):
  scans = tmp_path / 'scans'
  scans.mkdir()
  rng = np.random.default_rng(0)
  count = 2 * prediction_rows.PROGRESS_EVERY + 5
  for i in range(count):
    Image.fromarray(rng.integers(0, 255, (12, 16), np.uint8)).save(
        scans / f'{i:04d}.png')
  stub = _CountingStub()
  monkeypatch.setattr(predict, 'load', lambda *a, **k: stub)
  out = tmp_path / 'hc.csv'
  assert predict.main([f'--images={scans}', f'--out={out}']) == 0
  assert sum(stub.calls) == count
  assert max(stub.calls) <= prediction_rows.PROGRESS_EVERY  # Never all at once.
  assert 'images/s' not in capsys.readouterr().err  # Not a terminal.


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_progress_line_shows_rate_and_eta_only_on_a_terminal():
  now = [0.0]
  terminal = _Terminal()
  progress = log.Progress(1000, terminal, clock=lambda: now[0])
  now[0] = 10.0
  progress.update(200)
  progress.done()
  text = terminal.getvalue()
  assert '200/1000 images, 20.0 images/s, ETA 0:40' in text
  assert text.startswith('\r') and text.endswith('\n')
  stream = io.StringIO()  # Not a terminal: nothing.
  quiet = log.Progress(1000, stream)
  quiet.update(200)
  quiet.done()
  assert not stream.getvalue()
