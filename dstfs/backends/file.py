"""A local regular file or block device as a backend.

Rules:
- Regular files are read and written inline on the event loop: they go
  through the page cache and a 1 MiB copy costs tens of microseconds, far less
  than a thread hop. Block devices, whose I/O can take milliseconds, and every
  fsync go to a worker thread so one slow disk cannot stall the other nodes.
- TRIM punches a hole (fallocate PUNCH_HOLE) in regular files; on block
  devices it is a no-op (TRIM is advisory). WRITE_ZEROES punches a hole
  unless the caller forbids it, then writes zeroes.
- Block status comes from SEEK_DATA/SEEK_HOLE, inline (no data is read).
- OSError leaves here with its errno; nothing else does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
import struct

import trio

from dstfs.backends.base import BackendBase
from dstfs.iotypes import EXTENT_HOLE, EXTENT_ZERO, Buffer, FileSlice, write_zero_bytes

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_BLKGETSIZE64 = 0x80081272
#: Extents one block_status call reports at most (a prefix of the range).
MAX_EXTENTS = 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def device_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("Q", buf)[0]
    return st.st_size


def create_sparse(path: str, size: int) -> None:
    """Create a sparse file of `size` bytes; FileExistsError if it exists."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


class FileBackend(BackendBase):
    """A file or block device opened read-write (or read-only)."""

    def __init__(self, path: str, *, read_only: bool = False, size: int | None = None) -> None:
        self.name = path
        self.path = path
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(path, flags)
        try:
            st = os.fstat(self.fd)
            self.is_block = stat.S_ISBLK(st.st_mode)
            if not (self.is_block or stat.S_ISREG(st.st_mode)):
                raise OSError(errno.EINVAL, f"{path}: not a regular file or block device")
            real = device_size(self.fd)
            if size is not None and size > real:
                raise OSError(errno.ENOSPC, f"{path}: {real} bytes, smaller than {size} asked")
            self._size = real if size is None else size
        except BaseException:
            os.close(self.fd)
            raise
        self._can_punch = not self.is_block

    @classmethod
    def create(cls, path: str, size: int) -> FileBackend:
        """Create a sparse file of `size` bytes (it must not exist), then open it."""
        create_sparse(path, size)
        return cls(path)

    @property
    def size(self) -> int:
        return self._size

    async def pread(self, offset: int, length: int) -> Buffer:
        if self.is_block:
            return await trio.to_thread.run_sync(self._pread, offset, length)
        return self._pread(offset, length)

    def _pread(self, offset: int, length: int) -> Buffer:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # a file shorter than its export reads as zeroes
            data += bytes(length - len(data))
        return data

    async def pread_into(self, offset: int, views: list[memoryview]) -> None:
        if self.is_block:
            await trio.to_thread.run_sync(self._preadv, offset, views)
        else:
            self._preadv(offset, views)

    def _preadv(self, offset: int, views: list[memoryview]) -> None:
        want = sum(len(v) for v in views)
        n = os.preadv(self.fd, views, offset)
        if n < want:  # short file, or a short read: finish piece by piece
            data = self._pread(offset + n, want - n)
            pos = 0
            for v in views:
                if n >= len(v):
                    n -= len(v)
                    continue
                take = len(v) - n
                v[n:] = data[pos : pos + take]
                pos += take
                n = 0

    def file_slice(self, offset: int, length: int) -> FileSlice | None:
        """The range as a FileSlice for sendfile(2) (regular files only)."""
        if self.is_block or self.fd < 0:
            return None
        return FileSlice(self.fd, offset, length)

    can_block_status = True

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) extents from `offset`, covering at least a prefix
        of `length` bytes: holes (SEEK_HOLE/SEEK_DATA) are HOLE|ZERO, the rest
        data (0). A block device, or a file system without SEEK_DATA, is all
        data; past the end of a short file is a hole."""
        end = min(offset + length, self._size)
        if offset >= end:
            return []
        if self.is_block:
            return [(end - offset, 0)]
        return self._extents(offset, end)

    def _extents(self, offset: int, end: int) -> list[tuple[int, int]]:
        hole = EXTENT_HOLE | EXTENT_ZERO
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end and len(out) < MAX_EXTENTS:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data from here to the end of the file
                    out.append((end - pos, hole))
                    break
                if e.errno == errno.EINVAL:  # no SEEK_DATA here: say "data"
                    out.append((end - pos, 0))
                    break
                raise
            if data > pos:
                out.append((min(data, end) - pos, hole))
                pos = min(data, end)
                continue
            next_hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            out.append((next_hole - pos, 0))
            pos = next_hole
        return out

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path} is read-only")
        if self.is_block:
            await trio.to_thread.run_sync(self._pwrite, offset, data)
        else:
            self._pwrite(offset, data)
        if fua:
            await trio.to_thread.run_sync(os.fdatasync, self.fd)

    def _pwrite(self, offset: int, data: Buffer) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    async def flush(self) -> None:
        await trio.to_thread.run_sync(os.fsync, self.fd)

    async def trim(self, offset: int, length: int) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path} is read-only")
        self._punch(offset, length)  # TRIM is advisory: nothing to do if unsupported

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path} is read-only")
        if not (may_trim and self._punch(offset, length)):
            await write_zero_bytes(self.pwrite, offset, length)

    def _punch(self, offset: int, length: int) -> bool:
        """Punch a hole; False where the file system cannot (then never again)."""
        if not self._can_punch:
            return False
        try:
            punch_hole(self.fd, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._can_punch = False
            return False
        return True

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
