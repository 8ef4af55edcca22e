"""hc_jax.checkpoint: which best checkpoint survives kills and resumes."""

import numpy as np
import pytest

from hc_jax import checkpoint


def _state(value):
  return {'w': np.full((3,), float(value), np.float32)}


def _progress(epoch, best_epoch):
  return {'epoch': epoch, 'best': {'epoch': best_epoch, 'val_mae_mm': 1.0}}


def _run(workdir, epochs):
  """Saves (epoch, is_best, latest) as training does; returns the best epoch
  named by the last progress."""
  ckpt = checkpoint.Checkpoints(workdir)
  best = 0
  for epoch, is_best, latest in epochs:
    best = epoch if is_best else best
    ckpt.save(epoch, _state(epoch), _progress(epoch, best), is_best=is_best,
              latest=latest)
  return ckpt


def _resume(workdir):
  ckpt = checkpoint.Checkpoints(workdir)
  state, progress = ckpt.restore_latest(_state(-1))
  ckpt.drop_after(progress.get('epoch', 0))
  return ckpt, state, progress


def test_best_named_by_latest_survives_a_newer_best(tmp_path):
  # Latest at 6 names best 4; best improves at 8; killed at 9.
  _run(tmp_path, [(1, True, True), (2, False, False), (4, True, False),
                  (6, False, True), (8, True, False), (9, False, False)])
  ckpt, state, progress = _resume(tmp_path)
  assert progress['epoch'] == 6 and float(state['w'][0]) == 6
  assert ckpt.best.all_steps() == [4]
  assert float(ckpt.restore_best(_state(-1), 4)['w'][0]) == 4


def test_kill_between_best_and_latest_redoes_the_epoch(tmp_path):
  # Epoch 7 improves: its best checkpoint is written, the kill comes before
  # its latest one. The resumed run starts after 6 and must not keep 7.
  _run(tmp_path, [(3, True, True), (6, False, True), (7, True, False)])
  ckpt, _, progress = _resume(tmp_path)
  assert progress['epoch'] == 6 and progress['best']['epoch'] == 3
  assert ckpt.best.all_steps() == [3]


def test_latest_save_prunes_other_bests(tmp_path):
  ckpt = _run(tmp_path, [(1, True, False), (2, True, False), (3, True, True),
                         (4, False, True)])
  assert ckpt.best.all_steps() == [3]
  assert ckpt.latest.all_steps() == [4]


def test_restore_best_of_a_missing_epoch_is_a_clear_error(tmp_path):
  ckpt = _run(tmp_path, [(1, True, True)])
  with pytest.raises(FileNotFoundError, match='epoch 5'):
    ckpt.restore_best(_state(-1), 5)
  assert float(ckpt.restore_best(_state(-1))['w'][0]) == 1


def test_no_latest_drops_every_best(tmp_path):
  _run(tmp_path, [(1, True, False), (2, True, False)])
  ckpt, _, progress = _resume(tmp_path)
  assert progress == {} and ckpt.best.all_steps() == []
