"""Tell glibc's allocator to keep freed request buffers.

Why: every 1 MiB request buffer (a read reply, pyfuse3's copy of a write) is
above glibc's mmap threshold at first and is later carved from the heap top,
which free() trims again. Each request then faults its pages back in: about
40 minor faults and a kernel page-zeroing per MiB read. Keeping freed memory
in the heap turns that into reuse. The heap's peak does not grow: what is
kept is what the requests in flight already needed.

Rules: best effort, called once at process start; on a libc without
mallopt (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit; also dstfs's largest request.
MMAP_THRESHOLD = 32 << 20
#: Free memory at the heap top kept before giving it back to the kernel.
TRIM_THRESHOLD = 256 << 20


def keep_freed_memory() -> bool:
    """True when the allocator took the settings."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    log.debug("mallopt: keep freed memory up to %d bytes: %s", TRIM_THRESHOLD, ok)
    return ok
