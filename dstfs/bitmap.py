"""Write-intent bitmaps: durable sets of regions, one file each.

Rules:
- A file is a plain bit array (bit r of byte r // 8, low bit first), padded
  to whole pages; nothing else, so a torn page write can only lose or add
  marks of the regions in that page, never corrupt a header.
- `mark()` returns only once the marks are on stable storage (pwrite of the
  changed pages, then fdatasync, in a worker thread). Concurrent markers share
  one write and one sync: the flusher takes every page changed so far, and a
  marker waits for the first flush that started after its change. A region
  already marked costs nothing: only the first write to a region pays.
- `clear()` is lazy: it changes memory at once and reaches the file with the
  next flush. Losing a clear in a crash only makes a later resync copy more.
- Memory and I/O are bounded by the disk's region count: 64 GiB of 1 MiB
  regions is 8 KiB, and a flush writes only the pages that changed.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import trio

log = logging.getLogger(__name__)

PAGE = 4096


class RegionBitmap:
    def __init__(self, path: Path | None, regions: int) -> None:
        """An in-memory bitmap (`path` None: an array without a state dir);
        `open()` for one kept in a file."""
        self.path = path
        self.regions = regions
        nbytes = -(-max(regions, 1) // 8)
        self._bytes = bytearray(-(-nbytes // PAGE) * PAGE)
        self._count = 0
        self._fd: int | None = None
        self._changed: set[int] = set()  # pages not yet written
        self._flushing = False
        self._writing: set[int] = set()  # pages the running flush writes
        self._flushed = trio.Event()  # set when a flush ends
        self._generation = 0  # flushes started
        self.error: OSError | None = None

    @classmethod
    def open(cls, path: Path, regions: int) -> RegionBitmap:
        """Load `path` (created empty if missing); marks past `regions` are
        dropped (the disk shrank or the region size changed: never here)."""
        bm = cls(path, regions)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            data = os.pread(fd, len(bm._bytes), 0)
            bm._bytes[: len(data)] = data
            # Bits beyond the last region are noise: drop them.
            for r in range(regions, len(bm._bytes) * 8):
                if bm._bytes[r >> 3] & (1 << (r & 7)):
                    bm._bytes[r >> 3] &= ~(1 << (r & 7)) & 0xFF
            if os.fstat(fd).st_size < len(bm._bytes):
                os.ftruncate(fd, len(bm._bytes))
        except BaseException:
            os.close(fd)
            raise
        bm._fd = fd
        bm._count = sum(bin(b).count("1") for b in bm._bytes)
        return bm

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- reading

    def __contains__(self, region: int) -> bool:
        return bool(self._bytes[region >> 3] & (1 << (region & 7)))

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        """Marked regions, ascending."""
        b = self._bytes
        for i, byte in enumerate(b):
            if byte:
                for bit in range(8):
                    if byte & (1 << bit):
                        yield i * 8 + bit

    # -- changing

    def _set(self, region: int, on: bool) -> bool:
        i, bit = region >> 3, 1 << (region & 7)
        byte = self._bytes[i]
        if bool(byte & bit) == on:
            return False
        self._bytes[i] = byte | bit if on else byte & ~bit & 0xFF
        self._count += 1 if on else -1
        self._changed.add(i // PAGE)
        return True

    async def mark(self, regions: Iterable[int]) -> None:
        """Mark `regions` and return once that is durable; OSError if the
        bitmap cannot be written (the caller must not acknowledge then)."""
        need = False
        for r in regions:
            self._set(r, True)
            # Marked now, or earlier by a writer whose flush has not ended.
            page = (r >> 3) // PAGE
            need = need or page in self._changed or page in self._writing
        if need:
            await self.flush()

    def add(self, regions: Iterable[int]) -> None:
        """Mark `regions`; durable only after the next `flush()`."""
        for r in regions:
            self._set(r, True)

    def mark_all(self) -> None:
        """Every region (a full sync); reaches the file with the next flush."""
        self.add(range(self.regions))

    def clear(self, regions: Iterable[int]) -> None:
        for r in regions:
            self._set(r, False)

    def clear_all(self) -> None:
        self.clear(list(self))

    async def flush(self) -> None:
        """Write every change made before this call, durably."""
        want = self._generation + 1  # a flush that starts after now
        while True:
            if not self._flushing:
                if self._generation >= want or not self._changed:
                    if self.error is not None:
                        raise self.error
                    return
                await self._flush_once()
                continue
            await self._flushed.wait()

    async def _flush_once(self) -> None:
        self._flushing = True
        self._generation += 1
        pages, self._changed = self._changed, set()
        self._writing = pages
        snapshot = [(p, bytes(self._bytes[p * PAGE : (p + 1) * PAGE])) for p in sorted(pages)]
        fd = self._fd
        try:
            if fd is not None:
                await trio.to_thread.run_sync(_write_pages, fd, snapshot)
            elif self.path is not None:
                raise OSError(errno.EBADF, f"{self.path}: closed")
            self.error = None
        except OSError as e:
            self._changed |= pages  # try again next time
            self.error = e
            log.error("%s: cannot write the bitmap: %s", self.path, e)
        finally:
            self._flushing = False
            self._writing = set()
            ev, self._flushed = self._flushed, trio.Event()
            ev.set()
        if self.error is not None:
            raise self.error


def _write_pages(fd: int, pages: list[tuple[int, bytes]]) -> None:
    for page, data in pages:
        os.pwrite(fd, data, page * PAGE)
    os.fdatasync(fd)
