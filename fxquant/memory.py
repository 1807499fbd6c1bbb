"""Give memory freed by large temporaries back to the operating system.

Loading or compiling a model allocates and frees many tensors of a few MiB (unpacked codes,
packing scratch). glibc's allocator keeps such freed blocks in the process heap (its mmap
threshold grows after the first large free), so resident memory stays at the peak although the
model itself needs far less. `trim_heap()` asks glibc to return the free pages (`malloc_trim`).
It is a no-op elsewhere (macOS, musl, Windows) and never fails.

Example:
    >>> trim_heap() in (True, False)
    True
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_LIBC = None


def trim_heap() -> bool:
    """Release free heap pages to the OS (glibc malloc_trim(0)); True when it ran."""
    global _LIBC
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(None)     # the process's own symbols (libc): no ldconfig subprocess
        trim = getattr(_LIBC, "malloc_trim", None)
        if trim is None:
            return False
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        trim(0)
        return True
    except OSError:
        return False
