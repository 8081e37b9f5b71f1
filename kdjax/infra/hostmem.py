"""Host-memory settings for running XLA on CPU: reuse freed buffers instead of page-faulting them in again.

XLA:CPU allocates each executable run's temporary buffer afresh and frees it when the run ends: 2.7 GB for a
SmolLM2-135M LoRA KD step on 4x256 tokens. Its worker threads allocate from glibc's per-thread arenas, which
cannot hold a block over 64 MB and hand it to `mmap` whatever `M_MMAP_MAX` says; `free` gives it back with
`munmap`. So every step faults its whole working set in again, one zeroed 4 KiB page at a time (what that costs:
docs/benchmarks.md).

`keep_freed_memory()` makes every thread allocate from the main heap (`M_ARENA_MAX` 1), never through `mmap`
(`M_MMAP_MAX` 0), and never shrink that heap (`M_TRIM_THRESHOLD` -1), so the next run reuses the same pages.
The cost: resident memory stays at its peak instead of falling after it, and the heap can first grow by a few
buffers (small allocations in between split a freed block, so the next buffer no longer fits) before it settles. `kdjax.main` applies it
when JAX runs on CPU; accelerators keep their buffers in device memory and need none of it.

Kept for a whole run, the heap would hold the union of every stage's buffers and fragments. So the pipeline calls `release_freed_memory()` (glibc's `malloc_trim`) after each stage: the pages reused within
a stage stay, what a finished stage freed goes back to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
  """Tunes glibc's malloc as described above; returns whether every setting took (False off glibc/Linux).

  Call it before JAX starts its CPU backend: a thread picks its arena at its first allocation, and threads
  that already have one keep it.
  """
  mallopt = getattr(_libc(), "mallopt", None)  # None off Linux, or in a libc without mallopt (musl)
  if mallopt is None:
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim (mallopt(3))
  return all(mallopt(param, value) == 1 for param, value in settings)


def _libc():
  if not sys.platform.startswith("linux"):
    return None
  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None


def release_freed_memory() -> bool:
  """Returns the heap's free pages to the system (`malloc_trim(0)`, which also releases free pages inside the
  heap, not only at its top); True if any went back. A no-op returning False off glibc."""
  trim = getattr(_libc(), "malloc_trim", None)
  if trim is None:
    return False
  trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
  return trim(0) == 1


def resident_bytes() -> tuple[int, int]:
  """(resident now, peak resident) of this process in bytes, from /proc/self/status; (0, 0) where it is absent."""
  try:
    status = open("/proc/self/status").read()
  except OSError:
    return 0, 0
  fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
  kib = lambda name: int(fields.get(name, "0 kB").split()[0]) * 1024
  return kib("VmRSS"), kib("VmHWM")
