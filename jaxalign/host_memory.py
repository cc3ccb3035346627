"""Keep freed host memory for reuse: fewer page faults per XLA:CPU step.

XLA:CPU allocates each execution's temporary buffers afresh and frees them at the end. glibc serves
such large blocks with mmap (always, from threads other than the main one) and unmaps them on free,
so every step faults its whole temp arena in again, page by page: 73K minor faults per step of the
DPO benchmark (298 MB of temporaries), ~10% of its step time on 2 cores
(experiments/benchmarks/RESULTS.md). `reuse_freed_memory()` makes glibc serve all threads from its
main heap, without mmap, and never give freed memory back, so the next step reuses pages that are
already mapped. The process's resident size then stays at its peak, which is what a training
process needs anyway. This changes process-wide allocator settings, so the library never calls it
on import: the command-line entry points (`jaxalign.train`, `jaxalign.rl`, `jaxalign.demo`) call
it first thing, unless the environment sets JAXALIGN_SYSTEM_MALLOC=1; call it yourself (before
JAX starts its threads) elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def reuse_freed_memory() -> bool:
    """Sets glibc's malloc to one arena, no mmap, no trimming. Returns True when applied; False
    (and changes nothing) without glibc, or when JAXALIGN_SYSTEM_MALLOC=1."""
    if os.environ.get("JAXALIGN_SYSTEM_MALLOC") == "1":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl/macOS: AttributeError)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_ARENA_MAX, 1) and mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
    return bool(ok)
