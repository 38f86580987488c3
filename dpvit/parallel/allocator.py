"""Keep freed memory in the process so numpy's large temporaries do not page-fault every step.

Every forward/backward pass allocates and frees the same few-megabyte temporaries (attention
scores, GEMM outputs). They are above glibc's default mmap threshold, so each one is a fresh
``mmap`` whose pages fault on first touch and are unmapped again on free: about 19,000 page
faults and a fifth of the time of a default-model training step on one core. Raising glibc's
mmap and trim thresholds serves them from the heap instead, reusing the same pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit systems
_TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Raise glibc's mmap/trim thresholds; returns False where that is not possible (not
    Linux, or a libc other than glibc), which only costs speed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.debug("mallopt unavailable; large temporaries stay mmap-backed")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
