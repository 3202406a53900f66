"""Sans-I/O codec of the NBD protocol (fixed newstyle handshake, simple and
structured replies, metadata contexts and block status).

Rules of this module:
- Bytes in, events out; events in, bytes out. No sockets, no trio, no clocks.
- Two connection objects, one per role: `ServerConnection` decodes what a
  client sends and encodes what a server sends; `ClientConnection` the other
  way round. Each tracks the phase (handshake, options, transmission) so the
  caller cannot decode a message in the wrong phase.
- Decoders never buffer without bound: option data over `MAX_OPTION_DATA` and
  write payloads over `MAX_PAYLOAD` are discarded as they stream past, never
  stored (a too big WRITE is reported once its payload has gone past). A
  WRITE payload's buffer comes from the server's `alloc`, which may say "not
  now": decoding then pauses with `payload_wanted` set (back-pressure).
- Error messages and export descriptions we send are cut to MAX_MESSAGE
  bytes at a UTF-8 character boundary: the spec's strings.
- A violation of the protocol raises `ProtocolError`; the caller must drop
  the connection (the spec allows a hard disconnect for it).
- Payloads (READ replies on the client, WRITE requests on the server) are
  collected into one bytearray per message that the I/O layer may fill in
  place (`payload_buffer()` / `payload_received()`), so a 1 MiB payload is
  copied once, from the kernel into its final buffer.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from collections.abc import Callable, Sequence

import attrs

from dstfs.iotypes import EXTENT_HOLE, EXTENT_ZERO

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: Largest READ/WRITE payload we accept or send (nbdkit's limit; the server
#: advertises it with NBD_INFO_BLOCK_SIZE).
MAX_PAYLOAD = 64 * 1024 * 1024
#: The maximum payload a client may assume of a server that advertises none.
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
#: Largest option data we keep; options carry names (<= 4096) and small lists.
MAX_OPTION_DATA = 64 * 1024
#: The spec's limit on strings (export names, descriptions).
MAX_STRING = 4096
#: The length the spec says strings SHOULD keep to; what our error messages
#: are cut to (one that quotes a 4096-byte name would break the limit).
MAX_MESSAGE = 256


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 2**31 + 1
    ERR_POLICY = 2**31 + 2
    ERR_INVALID = 2**31 + 3
    ERR_PLATFORM = 2**31 + 4
    ERR_TLS_REQD = 2**31 + 5
    ERR_UNKNOWN = 2**31 + 6
    ERR_SHUTDOWN = 2**31 + 7
    ERR_BLOCK_SIZE_REQD = 2**31 + 8
    ERR_TOO_BIG = 2**31 + 9
    ERR_EXT_HEADER_REQD = 2**31 + 10


def rep_is_error(rep: int) -> bool:
    return bool(rep & 2**31)


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


REPLY_FLAG_DONE = 1


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = 2**15 + 1
    ERROR_OFFSET = 2**15 + 2


def reply_type_is_error(reply_type: int) -> bool:
    return bool(reply_type & 2**15)


# NBD error values are the Linux errno numbers for this fixed set.
NBD_ERRORS = frozenset(
    {
        _errno.EPERM,
        _errno.EIO,
        _errno.ENOMEM,
        _errno.EINVAL,
        _errno.ENOSPC,
        _errno.EOVERFLOW,
        _errno.ENOTSUP,
        _errno.ESHUTDOWN,
    }
)


def errno_to_nbd(err: int) -> int:
    """The NBD error to send for a local errno (the spec's mapping rules)."""
    if err in NBD_ERRORS:
        return err
    if err in (_errno.EDQUOT, _errno.EFBIG):
        return _errno.ENOSPC
    if err in (_errno.EROFS, _errno.EACCES):
        return _errno.EPERM
    if err == _errno.EOPNOTSUPP:
        return _errno.ENOTSUP
    return _errno.EIO


def nbd_to_errno(err: int) -> int:
    """The local errno for an NBD error; unknown values are treated as EIO."""
    return err if err in NBD_ERRORS else _errno.EIO


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must be dropped."""


# ---------------------------------------------------------------- events


@attrs.frozen
class ServerGreeting:
    flags: int


@attrs.frozen
class ClientFlags:
    flags: int


@attrs.frozen
class Option:
    opt: int
    data: bytes


@attrs.frozen
class OptionTooBig:
    """An option whose data exceeded MAX_OPTION_DATA; its data is discarded."""

    opt: int
    length: int


@attrs.frozen
class OptionReply:
    opt: int
    rep: int
    data: bytes


@attrs.frozen
class ExportNameReply:
    size: int
    flags: int


@attrs.frozen
class Request:
    """A transmission request. `data` is the WRITE payload (None when the
    payload exceeded MAX_PAYLOAD and was discarded, b"" for other commands)."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int
    data: bytes | bytearray | memoryview | None = b""


@attrs.frozen
class SimpleReply:
    cookie: int
    error: int
    data: bytes | bytearray = b""


@attrs.frozen
class StructuredChunk:
    flags: int
    type: int
    cookie: int
    payload: bytes | bytearray


@attrs.frozen
class ExportInfo:
    """What GO/INFO/EXPORT_NAME tell about an export."""

    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = DEFAULT_MAX_PAYLOAD
    name: str | None = None
    description: str | None = None


# ---------------------------------------------------------------- encoders

_GREETING = struct.Struct(">QQH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_STRUCTURED = struct.Struct(">IHHQI")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_OFFSET = struct.Struct(">Q")
_ERROR_CHUNK = struct.Struct(">IH")


def encode_go_data(name: str, info_requests: tuple[int, ...] = ()) -> bytes:
    """Data of NBD_OPT_GO / NBD_OPT_INFO."""
    raw = name.encode()
    return (
        _U32.pack(len(raw))
        + raw
        + _U16.pack(len(info_requests))
        + b"".join(_U16.pack(i) for i in info_requests)
    )


def decode_go_data(data: bytes) -> tuple[str, tuple[int, ...]]:
    """Parse NBD_OPT_GO / NBD_OPT_INFO data; ValueError if malformed."""
    if len(data) < 6:
        raise ValueError("option data too short")
    (name_len,) = _U32.unpack_from(data, 0)
    if name_len > len(data) - 6 or name_len > MAX_STRING:
        raise ValueError("export name length out of range")
    name = bytes(data[4 : 4 + name_len]).decode("utf-8")
    (count,) = _U16.unpack_from(data, 4 + name_len)
    rest = data[6 + name_len :]
    if len(rest) != 2 * count:
        raise ValueError("information request list has the wrong length")
    return name, tuple(_U16.unpack_from(rest, 2 * i)[0] for i in range(count))


def encode_info_export(size: int, flags: int) -> bytes:
    return _INFO_EXPORT.pack(Info.EXPORT, size, flags)


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def encode_info_string(kind: int, text: str) -> bytes:
    raw = message_bytes(text) if kind == Info.DESCRIPTION else text.encode()
    return _U16.pack(kind) + raw


def encode_rep_server(name: str, description: str = "") -> bytes:
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + message_bytes(description)


def decode_rep_server(data: bytes) -> tuple[str, str]:
    if len(data) < 4:
        raise ValueError("NBD_REP_SERVER too short")
    (n,) = _U32.unpack_from(data, 0)
    if n > len(data) - 4:
        raise ValueError("NBD_REP_SERVER name length out of range")
    return bytes(data[4 : 4 + n]).decode(), bytes(data[4 + n :]).decode()


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_block_size(minimum: int, preferred: int, maximum: int) -> None:
    """ProtocolError unless the sizes obey the spec: minimum a power of two
    <= 64 KiB, preferred a power of two >= max(minimum, 512), maximum >=
    preferred and a multiple of the minimum (or 0xffffffff: no limit)."""
    if not _power_of_two(minimum) or minimum > 1 << 16:
        raise ProtocolError(f"NBD_INFO_BLOCK_SIZE: bad minimum block size {minimum}")
    if not _power_of_two(preferred) or preferred < max(minimum, 512):
        raise ProtocolError(f"NBD_INFO_BLOCK_SIZE: bad preferred block size {preferred}")
    if maximum != 0xFFFFFFFF and (maximum < preferred or maximum % minimum):
        raise ProtocolError(f"NBD_INFO_BLOCK_SIZE: bad maximum payload {maximum}")


def apply_info(info: ExportInfo | None, data: bytes) -> ExportInfo | None:
    """Fold one NBD_REP_INFO payload into what is known of the export.
    Unknown information types are ignored, as the spec requires."""
    if len(data) < 2:
        raise ProtocolError("NBD_REP_INFO without a type")
    (kind,) = _U16.unpack_from(data, 0)
    if kind == Info.EXPORT:
        if len(data) != 12:
            raise ProtocolError("NBD_INFO_EXPORT must be 12 bytes")
        _, size, flags = _INFO_EXPORT.unpack(data)
        if info is None:
            return ExportInfo(size=size, flags=flags)
        return attrs.evolve(info, size=size, flags=flags)
    base = info if info is not None else ExportInfo(size=-1, flags=0)
    if kind == Info.BLOCK_SIZE:
        if len(data) != 14:
            raise ProtocolError("NBD_INFO_BLOCK_SIZE must be 14 bytes")
        _, mn, pref, mx = _INFO_BLOCK_SIZE.unpack(data)
        check_block_size(mn, pref, mx)
        return attrs.evolve(base, min_block=mn, preferred_block=pref, max_payload=mx)
    if kind == Info.NAME:
        return attrs.evolve(base, name=bytes(data[2:]).decode(errors="replace"))
    if kind == Info.DESCRIPTION:
        return attrs.evolve(base, description=bytes(data[2:]).decode(errors="replace"))
    return info


#: The one metadata context dstfs knows: allocation state per extent.
BASE_ALLOCATION = "base:allocation"
#: base:allocation flags of an extent (0: data, allocated).
STATE_HOLE = EXTENT_HOLE
STATE_ZERO = EXTENT_ZERO
_EXTENT = struct.Struct(">II")


def encode_meta_context_query(export: str, queries: Sequence[str]) -> bytes:
    """Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    raw = export.encode()
    out = [_U32.pack(len(raw)), raw, _U32.pack(len(queries))]
    for q in queries:
        rq = q.encode()
        out += [_U32.pack(len(rq)), rq]
    return b"".join(out)


def decode_meta_context_query(data: bytes) -> tuple[str, list[str]]:
    """Parse LIST/SET_META_CONTEXT data; ValueError if malformed."""
    if len(data) < 8:
        raise ValueError("meta context option data too short")
    (n,) = _U32.unpack_from(data, 0)
    if n > MAX_STRING or n > len(data) - 8:
        raise ValueError("export name length out of range")
    export = bytes(data[4 : 4 + n]).decode("utf-8")
    pos = 4 + n
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        if len(data) - pos < 4:
            raise ValueError("query list shorter than its count")
        (k,) = _U32.unpack_from(data, pos)
        pos += 4
        if k > MAX_STRING or k > len(data) - pos:
            raise ValueError("query length out of range")
        queries.append(bytes(data[pos : pos + k]).decode("utf-8"))
        pos += k
    if pos != len(data):
        raise ValueError("trailing bytes after the query list")
    return export, queries


def encode_rep_meta_context(context_id: int, name: str) -> bytes:
    return _U32.pack(context_id) + name.encode()


def decode_rep_meta_context(data: bytes) -> tuple[int, str]:
    if len(data) < 5:
        raise ProtocolError("NBD_REP_META_CONTEXT too short")
    (context_id,) = _U32.unpack_from(data, 0)
    return context_id, bytes(data[4:]).decode(errors="replace")


def encode_block_status_payload(context_id: int, extents: Sequence[tuple[int, int]]) -> bytes:
    """Payload of an NBD_REPLY_TYPE_BLOCK_STATUS chunk: (length, flags) pairs."""
    return _U32.pack(context_id) + b"".join(_EXTENT.pack(n, f) for n, f in extents)


def decode_block_status_payload(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """(context id, [(length, flags)]); ProtocolError if malformed (no
    extent, a partial one, or one of length 0, which the spec forbids)."""
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise ProtocolError(f"block status chunk of {len(payload)} bytes")
    (context_id,) = _U32.unpack_from(payload, 0)
    extents = [_EXTENT.unpack_from(payload, pos) for pos in range(4, len(payload), 8)]
    if any(n == 0 for n, _ in extents):
        raise ProtocolError("block status extent of length 0")
    return context_id, extents


def message_bytes(message: str | bytes) -> bytes:
    """An error message or a description as the spec's string: at most
    MAX_MESSAGE bytes of UTF-8, cut at a character boundary (libnbd drops
    a server whose string is over 4096 bytes)."""
    raw = message.encode() if isinstance(message, str) else bytes(message)
    if len(raw) <= MAX_MESSAGE:
        return raw
    return raw[: MAX_MESSAGE - 3].decode("utf-8", "ignore").encode() + b"..."


def encode_error_chunk_payload(error: int, message: str = "") -> bytes:
    raw = message_bytes(message)
    return _ERROR_CHUNK.pack(error, len(raw)) + raw


def decode_error_chunk_payload(payload: bytes) -> tuple[int, str]:
    if len(payload) < 6:
        raise ProtocolError("error chunk too short")
    error, n = _ERROR_CHUNK.unpack_from(payload, 0)
    if 6 + n > len(payload):
        raise ProtocolError("error chunk message overruns the chunk")
    return error, bytes(payload[6 : 6 + n]).decode(errors="replace")


# ---------------------------------------------------------------- decoding core


class _Decoder:
    """Shared buffer handling: fixed-size headers from a bytearray read at a
    moving position (no memmove per message), payloads straight into their
    own bytearray, discards without storing."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._payload: bytearray | memoryview | None = None
        self._filled = 0
        self._discard = 0
        #: A payload received in place into the caller's buffers (scatter).
        self._segs: list[memoryview] | None = None
        self._seg = 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._discard:
            n = min(self._discard, len(data))
            self._discard -= n
            data = memoryview(data)[n:]
            if not data:
                return
        if self._segs is not None and self._pos == len(self._buf):
            data = self._scatter(memoryview(data))
            if not data:
                return
        if self._payload is not None and self._pos == len(self._buf):
            want = len(self._payload) - self._filled
            n = min(want, len(data))
            self._payload[self._filled : self._filled + n] = data[:n]
            self._filled += n
            data = memoryview(data)[n:]
            if not data:
                return
        buf = self._buf
        if self._pos:
            if self._pos == len(buf):
                buf.clear()
                self._pos = 0
            elif self._pos > 65536:
                del buf[: self._pos]
                self._pos = 0
        buf += data

    def payload_buffer(self) -> memoryview | None:
        """A writable view of the rest of the payload being received, or None.
        Fill it (e.g. with recv_into) and call `payload_received(n)`."""
        if self._pos < len(self._buf):
            return None
        if self._segs is not None:
            return self._segs[self._seg][self._filled :] if self._seg < len(self._segs) else None
        if self._payload is None:
            return None
        return memoryview(self._payload)[self._filled :]

    def payload_buffers(self) -> list[memoryview] | None:
        """Like payload_buffer(), but every remaining piece of a scattered
        payload, for one recvmsg_into(); then `payload_received(n)`."""
        if self._segs is None or self._pos < len(self._buf) or self._seg >= len(self._segs):
            view = self.payload_buffer()
            return None if view is None else [view]
        rest = self._segs[self._seg : self._seg + 64]
        return [rest[0][self._filled :], *rest[1:]]

    def payload_received(self, n: int) -> None:
        segs = self._segs
        if segs is not None:
            while n:
                take = min(n, len(segs[self._seg]) - self._filled)
                self._filled += take
                n -= take
                self._next_seg()
            return
        assert self._payload is not None and self._filled + n <= len(self._payload)
        self._filled += n

    def _next_seg(self) -> None:
        segs = self._segs
        assert segs is not None
        while self._seg < len(segs) and self._filled == len(segs[self._seg]):
            self._seg += 1
            self._filled = 0

    def _scatter(self, data: memoryview) -> memoryview:
        """Copy data into the scatter segments; return what is left over."""
        segs = self._segs
        assert segs is not None
        while data and self._seg < len(segs):
            seg = segs[self._seg]
            n = min(len(seg) - self._filled, len(data))
            seg[self._filled : self._filled + n] = data[:n]
            self._filled += n
            data = data[n:]
            self._next_seg()
        return data

    def _start_scatter(self, segs: list[memoryview]) -> None:
        self._segs = segs
        self._seg = 0
        self._filled = 0
        self._next_seg()
        pos = self._pos
        if pos < len(self._buf):
            rest = self._scatter(memoryview(self._buf)[pos:])
            self._pos = len(self._buf) - len(rest)

    def _scatter_done(self) -> bool:
        segs = self._segs
        if segs is None or self._seg < len(segs):
            return False
        self._segs = None
        self._filled = 0
        return True

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded (for bounds checks and tests)."""
        return len(self._buf) - self._pos

    def _take(self, n: int) -> bytes | None:
        pos = self._pos
        if len(self._buf) - pos < n:
            return None
        out = bytes(memoryview(self._buf)[pos : pos + n])
        self._pos = pos + n
        return out

    def _start_payload(self, n: int, payload: bytearray | memoryview | None = None) -> None:
        self._payload = payload = bytearray(n) if payload is None else payload
        pos = self._pos
        k = min(n, len(self._buf) - pos)
        if k:
            payload[:k] = memoryview(self._buf)[pos : pos + k]
            self._pos = pos + k
        self._filled = k

    def _payload_done(self) -> bytearray | memoryview | None:
        """The payload if it is complete (and reset), else None."""
        p = self._payload
        if p is None or self._filled < len(p):
            return None
        self._payload = None
        self._filled = 0
        return p

    def _start_discard(self, n: int) -> None:
        k = min(n, len(self._buf) - self._pos)
        self._pos += k
        self._discard = n - k


def _check_nothing_buffered(decoder: _Decoder, who: str) -> None:
    if decoder.buffered or decoder._payload is not None or decoder._discard:
        raise ProtocolError(f"{who} sent plain-text bytes past STARTTLS, before the TLS handshake")


class _Phase(enum.Enum):
    GREETING = "greeting"
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    EXPORT_NAME_REPLY = "export-name-reply"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


# ---------------------------------------------------------------- server side


class ServerConnection(_Decoder):
    """The server's end: decodes client bytes, encodes server messages.

    Usage: send `greeting()`, feed received bytes with `receive_data()`, and
    pull events with `next_event()` until it returns None (needs more data).
    """

    def __init__(
        self, handshake_flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    ):
        super().__init__()
        self.handshake_flags = handshake_flags
        self.phase = _Phase.CLIENT_FLAGS
        self.client_flags = 0
        self.structured_replies = False
        self._request: tuple[int, int, int, int, int] | None = None
        self._too_big: Request | None = None
        #: Bytes of a WRITE payload that waits for a buffer (`alloc` said None).
        self.payload_wanted = 0

    #: Gives a WRITE payload its buffer of exactly n bytes, or None when no
    #: memory may be committed now: decoding then pauses (`payload_wanted`)
    #: until the caller frees memory and calls `next_event()` again.
    alloc: Callable[[int], bytearray | memoryview | None] = bytearray

    def supply_payload(self, buf: bytearray | memoryview) -> None:
        """The buffer for the WRITE payload that waits (`payload_wanted` bytes)."""
        assert len(buf) == self.payload_wanted
        self.payload_wanted = 0
        self._start_payload(len(buf), buf)

    @property
    def payload_pending(self) -> int:
        """Bytes of a WRITE payload still to come into its buffer."""
        p = self._payload
        return 0 if p is None or self._request is None else len(p) - self._filled

    def take_payload(self) -> bytearray | memoryview | None:
        """The buffer of a payload being received, now the caller's (the
        connection is ending); None if there is none."""
        p, self._payload = self._payload, None
        return p

    def greeting(self) -> bytes:
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, self.handshake_flags)

    def next_event(self) -> ClientFlags | Option | OptionTooBig | Request | None:
        if self.phase is _Phase.CLIENT_FLAGS:
            raw = self._take(4)
            if raw is None:
                return None
            (flags,) = _U32.unpack(raw)
            # Client flags mirror handshake flags: only offered ones may be set.
            offered = int(self.handshake_flags) & 0b11
            if flags & ~offered:
                raise ProtocolError(
                    f"unknown client flags {flags:#x} (offered {offered:#x}; NO_ZEROES is bit 1)"
                )
            self.client_flags = flags
            self.phase = _Phase.OPTIONS
            return ClientFlags(flags)
        if self.phase is _Phase.OPTIONS:
            return self._next_option()
        if self.phase is _Phase.TRANSMISSION:
            return self._next_request()
        return None

    def _next_option(self) -> Option | OptionTooBig | None:
        if self._payload is not None:
            data = self._payload_done()
            if data is None:
                return None
            opt = self._option_opt
            return Option(opt, bytes(data))
        raw = self._take(16)
        if raw is None:
            return None
        magic, opt, length = _OPTION.unpack(raw)
        if magic != IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}")
        if opt == Opt.EXPORT_NAME and length > MAX_STRING:
            raise ProtocolError("export name too long")  # it has no error reply
        if length > MAX_OPTION_DATA:
            self._start_discard(length)
            return OptionTooBig(opt, length)
        self._option_opt = opt
        self._start_payload(length)
        return self._next_option()

    def _next_request(self) -> Request | None:
        if self._too_big is not None:
            if self._discard:
                return None
            ev, self._too_big = self._too_big, None
            return ev
        if self._request is not None:
            if self.payload_wanted:
                buf = self.alloc(self.payload_wanted)
                if buf is None:
                    return None
                self.supply_payload(buf)
            data = self._payload_done()
            if data is None:
                return None
            flags, cmd, cookie, offset, length = self._request
            self._request = None
            return Request(flags, cmd, cookie, offset, length, data)
        raw = self._take(28)
        if raw is None:
            return None
        magic, flags, cmd, cookie, offset, length = _REQUEST.unpack(raw)
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic {magic:#x}")
        if cmd == Cmd.WRITE:
            if length > MAX_PAYLOAD:
                # Reported once its payload has streamed past: a reply sent
                # earlier reaches a client still sending it (libnbd then
                # drops the connection).
                self._start_discard(length)
                self._too_big = Request(flags, cmd, cookie, offset, length, None)
                return self._next_request()
            self._request = (flags, cmd, cookie, offset, length)
            if length:
                self.payload_wanted = length
            else:
                self._start_payload(0)
            return self._next_request()
        if cmd == Cmd.DISC:
            self.phase = _Phase.CLOSED
        return Request(flags, cmd, cookie, offset, length)

    def tls_started(self) -> None:
        """STARTTLS was acknowledged: what was negotiated before is gone (the
        spec), and bytes received past the option came in plain text before
        TLS: accepting them would let a man in the middle inject options."""
        _check_nothing_buffered(self, "client")
        self.structured_replies = False

    # -- encoders

    def option_reply(self, opt: int, rep: int, data: bytes = b"") -> bytes:
        if self.phase is not _Phase.OPTIONS:
            raise RuntimeError(f"option reply in phase {self.phase.value}")
        if rep == Rep.ACK:
            if opt == Opt.GO:
                self.phase = _Phase.TRANSMISSION
            elif opt == Opt.STRUCTURED_REPLY:
                self.structured_replies = True
            elif opt == Opt.ABORT:
                self.phase = _Phase.CLOSED
        elif rep_is_error(rep):
            data = message_bytes(data)  # an error's data is its message
        return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, opt, rep, len(data)) + data

    def export_name_reply(self, size: int, flags: int) -> bytes:
        if self.phase is not _Phase.OPTIONS:
            raise RuntimeError(f"export name reply in phase {self.phase.value}")
        self.phase = _Phase.TRANSMISSION
        out = _EXPORT_NAME_REPLY.pack(size, flags)
        if not self.client_flags & ClientFlag.NO_ZEROES:
            out += bytes(124)
        return out

    def simple_reply_header(self, cookie: int, error: int = 0) -> bytes:
        """Header of a simple reply; a successful READ's data follows it."""
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)

    def chunk_header(self, flags: int, reply_type: int, cookie: int, length: int) -> bytes:
        if not self.structured_replies:
            raise RuntimeError("structured replies were not negotiated")
        return _STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie, length)

    def read_data_header(self, cookie: int, offset: int, length: int) -> bytes:
        """Header before `length` bytes of READ data, in whichever reply
        style was negotiated (one final OFFSET_DATA chunk if structured;
        for 0 bytes a final NONE chunk, as a data chunk has at least 1)."""
        if self.structured_replies:
            if not length:
                return self.chunk_header(REPLY_FLAG_DONE, ReplyType.NONE, cookie, 0)
            return self.chunk_header(
                REPLY_FLAG_DONE, ReplyType.OFFSET_DATA, cookie, 8 + length
            ) + _OFFSET.pack(offset)
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def block_status_reply(
        self, cookie: int, context_id: int, extents: Sequence[tuple[int, int]]
    ) -> bytes:
        """The one, final BLOCK_STATUS chunk answering NBD_CMD_BLOCK_STATUS."""
        payload = encode_block_status_payload(context_id, extents)
        return self.chunk_header(REPLY_FLAG_DONE, ReplyType.BLOCK_STATUS, cookie, len(payload)) + (
            payload
        )

    def error_reply(self, cookie: int, error: int, message: str = "") -> bytes:
        """A failed request's reply (an ERROR chunk if structured replies)."""
        if self.structured_replies:
            payload = encode_error_chunk_payload(error, message)
            return self.chunk_header(REPLY_FLAG_DONE, ReplyType.ERROR, cookie, len(payload)) + (
                payload
            )
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


# ---------------------------------------------------------------- client side


class ClientConnection(_Decoder):
    """The client's end: decodes server bytes, encodes client messages."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = _Phase.GREETING
        self.server_flags = 0
        self.client_flags = 0
        self._last_opt: int | None = None
        self._reads: dict[int, int | list[memoryview]] = {}
        self._reply: tuple[int, ...] | None = None
        self.structured_replies = False

    def tls_started(self) -> None:
        """The server acknowledged STARTTLS (see ServerConnection.tls_started)."""
        _check_nothing_buffered(self, "server")
        self.structured_replies = False

    # -- encoders

    def client_flags_message(self, flags: int) -> bytes:
        if self.phase is not _Phase.CLIENT_FLAGS:
            raise RuntimeError("client flags before the server greeting")
        self.client_flags = flags
        self.phase = _Phase.OPTIONS
        return _U32.pack(flags)

    def option(self, opt: int, data: bytes = b"") -> bytes:
        if self.phase is not _Phase.OPTIONS or self._last_opt is not None:
            raise RuntimeError("an option must wait for the final reply to the previous one")
        if opt == Opt.EXPORT_NAME:
            self.phase = _Phase.EXPORT_NAME_REPLY
        else:
            self._last_opt = opt
        return _OPTION.pack(IHAVEOPT, opt, len(data)) + data

    def request(
        self,
        cmd: int,
        cookie: int,
        offset: int,
        length: int,
        flags: int = 0,
        into: list[memoryview] | None = None,
    ) -> bytes:
        """A request header; a WRITE's `length` bytes of data must follow it.
        A READ with `into` (views adding up to `length`) has its data placed
        there as it arrives; its reply event then carries no data."""
        if self.phase is not _Phase.TRANSMISSION:
            raise RuntimeError(f"request in phase {self.phase.value}")
        if cmd == Cmd.READ:
            if into is not None:
                if (len(into[0]) if len(into) == 1 else sum(len(v) for v in into)) != length:
                    raise ValueError("read buffers do not add up to the length")
                self._reads[cookie] = into
            else:
                self._reads[cookie] = length
        elif cmd == Cmd.DISC:
            self.phase = _Phase.CLOSED
        return _REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)

    def forget_read(self, cookie: int) -> None:
        """The caller of READ `cookie` gave up: its data, if it still comes,
        goes to a scratch buffer, never into the caller's buffers."""
        wanted = self._reads.get(cookie)
        if type(wanted) is list:
            self._reads[cookie] = sum(len(v) for v in wanted)
        elif (
            wanted is None
            and self._segs is not None  # being received into the caller's views now
            and self._reply is not None
            and self._reply[0] == cookie
        ):
            self._segs = [memoryview(bytearray(len(v))) for v in self._segs]

    # -- decoding

    def next_event(
        self,
    ) -> ServerGreeting | OptionReply | ExportNameReply | SimpleReply | StructuredChunk | None:
        phase = self.phase
        if phase is _Phase.TRANSMISSION or phase is _Phase.CLOSED:
            return self._next_reply()
        if phase is _Phase.GREETING:
            raw = self._take(18)
            if raw is None:
                return None
            magic, ihaveopt, flags = _GREETING.unpack(raw)
            if magic != NBDMAGIC:
                raise ProtocolError(f"bad server magic {magic:#x}")
            if ihaveopt != IHAVEOPT:
                raise ProtocolError("server does not speak newstyle negotiation")
            self.server_flags = flags
            self.phase = _Phase.CLIENT_FLAGS
            return ServerGreeting(flags)
        if phase is _Phase.OPTIONS:
            return self._next_option_reply()
        if phase is _Phase.EXPORT_NAME_REPLY:
            n = 10 if self.client_flags & ClientFlag.NO_ZEROES else 134
            raw = self._take(n)
            if raw is None:
                return None
            size, flags = _EXPORT_NAME_REPLY.unpack_from(raw)
            self.phase = _Phase.TRANSMISSION
            return ExportNameReply(size, flags)
        return None

    def _next_option_reply(self) -> OptionReply | None:
        if self._reply is not None:
            data = self._payload_done()
            if data is None:
                return None
            opt, rep = self._reply
            self._reply = None
            if rep not in (Rep.SERVER, Rep.INFO, Rep.META_CONTEXT):  # the final reply
                self._last_opt = None
                if opt == Opt.GO and rep == Rep.ACK:
                    self.phase = _Phase.TRANSMISSION
                elif opt == Opt.STRUCTURED_REPLY and rep == Rep.ACK:
                    self.structured_replies = True
            return OptionReply(opt, rep, bytes(data))
        raw = self._take(20)
        if raw is None:
            return None
        magic, opt, rep, length = _OPTION_REPLY.unpack(raw)
        if magic != OPTION_REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic {magic:#x}")
        if opt != self._last_opt:
            raise ProtocolError(f"reply to option {opt} that was not asked")
        if length > MAX_OPTION_DATA:
            raise ProtocolError(f"option reply of {length} bytes is too big")
        self._reply = (opt, rep)
        self._start_payload(length)
        return self._next_option_reply()

    def _next_reply(self) -> SimpleReply | StructuredChunk | None:
        if self._reply is not None:
            if self._segs is not None:
                if not self._scatter_done():
                    return None
                cookie = self._reply[0]
                self._reply = None
                return SimpleReply(cookie, 0)  # the data is in the caller's buffers
            data = self._payload_done()
            if data is None:
                return None
            reply = self._reply
            self._reply = None
            if len(reply) == 2:
                return SimpleReply(reply[0], 0, data)
            return StructuredChunk(reply[0], reply[1], reply[2], data)
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 16:
            return None
        (magic,) = _U32.unpack_from(buf, pos)
        if magic == SIMPLE_REPLY_MAGIC:
            _, error, cookie = _SIMPLE_REPLY.unpack_from(buf, pos)
            self._pos = pos + 16
            wanted = self._reads.pop(cookie, None)
            if wanted is None or error:
                return SimpleReply(cookie, error)
            if type(wanted) is list and len(wanted) == 1:
                view = wanted[0]
                end = pos + 16 + len(view)
                if end <= len(buf):
                    # The common small read: all of it is here, one copy.
                    view[:] = memoryview(buf)[pos + 16 : end]
                    self._pos = end
                    return SimpleReply(cookie, 0)
            self._reply = (cookie, 0)
            if type(wanted) is int:
                self._start_payload(wanted)
            else:
                self._start_scatter(wanted)  # type: ignore[arg-type]
            return self._next_reply()
        if magic == STRUCTURED_REPLY_MAGIC:
            if not self.structured_replies:
                raise ProtocolError("structured reply, but structured replies were not negotiated")
            if len(buf) - pos < 20:
                return None
            _, flags, rtype, cookie, length = _STRUCTURED.unpack_from(buf, pos)
            if length > MAX_PAYLOAD + 8:
                raise ProtocolError(f"structured reply of {length} bytes is too big")
            self._pos = pos + 20
            if flags & REPLY_FLAG_DONE:
                self._reads.pop(cookie, None)
            self._reply = (flags, rtype, cookie)
            self._start_payload(length)
            return self._next_reply()
        raise ProtocolError(f"bad reply magic {magic:#x}")
