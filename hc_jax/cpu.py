"""Process settings that speed up training on a CPU.

XLA:CPU allocates large temporary buffers at every step; glibc's default
serves each with a fresh `mmap`, and the kernel then spends much of the step
faulting the pages in. `tune_malloc()` keeps freed memory in the heap
instead (the `mallopt` equivalent of
`GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4000000000`,
with the trim threshold capped at the largest C int). The setting holds for
the whole process once applied (a later run of a grid with
`tune_malloc=False` keeps it).
Measured in docs/benchmarks.md: the "1M" CNN trains about 1.3x faster with
it; the 263K CNN at batch 8 within a few per cent either way.
"""

import ctypes
import ctypes.util
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
            (_M_TRIM_THRESHOLD, 2**31 - 1))


def tune_malloc() -> bool:
  """Applies `SETTINGS` with glibc's `mallopt`; returns whether it could.

  A no-op returning False where the C library is not glibc (macOS, musl).
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  # A list, not a generator: every setting is applied even if one fails.
  results = [mallopt(option, value) == 1 for option, value in SETTINGS]
  return all(results)
