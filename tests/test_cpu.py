"""hc_jax.cpu: the malloc settings for CPU training."""

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_tune_malloc_applies_on_glibc():
  # In a fresh process, as training does: every mallopt call must succeed.
  out = subprocess.run(
      [sys.executable, '-c',
       'from hc_jax import cpu; print(cpu.tune_malloc())'],
      capture_output=True, text=True, check=True).stdout
  assert out.strip() == 'True'


def test_tune_malloc_is_a_no_op_off_linux(monkeypatch):
  from hc_jax import cpu  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(cpu.sys, 'platform', 'darwin')
  assert cpu.tune_malloc() is False
