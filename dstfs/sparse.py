"""Sparse copying: what of a buffer is data and what is zeroes.

Copiers (migration, the mirror's resync) send zeroes as WRITE_ZEROES, which
costs no bytes on the wire and leaves holes on targets that punch them, and
send only the rest as data. A buffer is judged in granules (64 KiB: a
filesystem's small files still leave most of a 1-2 MiB chunk empty), and
neighbouring granules of the same kind are merged into one run.
"""

from __future__ import annotations

import functools

from dstfs.iotypes import Buffer

GRANULE = 64 << 10


@functools.lru_cache(maxsize=4)
def zeros(n: int) -> bytes:
    return bytes(n)


def runs(data: Buffer, granule: int = GRANULE) -> list[tuple[int, int, bool]]:
    """(offset, length, is_zero) runs covering `data`, in order."""
    # bytes == bytes is one memcmp; a memoryview compares item by item (slow).
    buf = data if isinstance(data, (bytes, bytearray)) else bytes(data)
    out: list[tuple[int, int, bool]] = []
    total = len(buf)
    if total and buf == zeros(total):  # the common case for a hole: one compare
        return [(0, total, True)]
    for off in range(0, total, granule):
        n = min(granule, total - off)
        zero = buf[off : off + n] == zeros(n)
        if out and out[-1][2] == zero:
            start, length, _ = out[-1]
            out[-1] = (start, length + n, zero)
        else:
            out.append((off, n, zero))
    return out
