"""Keep freed memory for reuse: large CPU tensors without page faults (glibc only).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` when freed, so each large tensor of an inference
pass (a 1x128x512x512 float32 activation is 128 MiB) is faulted in page by page again on
every call: cloning one took 41 ms against 8 ms with this setting (2-core Zen 5; see
``benchmarks/results/app_x4_256_zen5.md`` for what it does to a demo request).
:func:`keep_freed_memory` tells glibc to take everything from one heap and never give it
back to the system, so a process keeps its peak resident memory between calls in exchange.
Servers and command lines that run many passes call it once at start-up, before they start
threads; it does nothing on other C libraries.
"""

import ctypes
import platform

__all__ = ["keep_freed_memory"]

# mallopt(3) parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt's int takes: 2 GiB of free top kept


def keep_freed_memory():
    """Make glibc serve large blocks from its heap and keep freed ones (no ``munmap``, no
    trim), in one arena shared by all threads created afterwards. Returns True when glibc
    took the settings, False where there is no glibc (the call changes nothing there)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
