"""Sparse copying: what of a buffer is data and what is zeroes.

Copiers (migration, the mirror's resync) send zeroes as WRITE_ZEROES, which
costs no bytes on the wire and leaves holes on targets that punch them, and
send only the rest as data. Where the source answers block status (NBD
base:allocation, SEEK_HOLE on a file), a range it reports as zeroes is not
even read. The caller asks while it
holds the range against writers (the interlock): an answer taken before a
write could call fresh data a hole. A buffer is judged in granules (64 KiB: a
filesystem's small files still leave most of a 1-2 MiB chunk empty), and
neighbouring granules of the same kind are merged into one run.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from dstfs.iotypes import EXTENT_ZERO, Buffer

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


async def reads_as_zeroes(
    block_status: Callable[[int, int], Awaitable[list[tuple[int, int]]]],
    offset: int,
    length: int,
) -> bool:
    """Whether the source says all of [offset, offset+length) reads as
    zeroes. False when it cannot tell (no block status, an error): then the
    caller reads the data and judges it itself."""
    pos, end = offset, offset + length
    try:
        while pos < end:
            extents = await block_status(pos, end - pos)
            if not extents:
                return False
            for n, flags in extents:
                if not flags & EXTENT_ZERO or n <= 0:
                    return False
                pos += n
                if pos >= end:
                    break
    except OSError:
        return False
    return True
