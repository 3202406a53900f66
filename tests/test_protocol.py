"""Table-driven tests of the sans-I/O NBD codec `dstfs.nbd.protocol`, in the
style of h11's tests: tables pair hand-written wire bytes with events.

The expected bytes are written from the field layouts of nbd-protocol.md
(explicit hex or `struct.pack` of the spec's fields, with the magic numbers
copied from the spec), never produced by the module's encoders. Every decode
case is fed whole, one byte at a time, and split in two at every position,
both through `receive_data` and through the in-place `payload_buffer()` /
`payload_received()` path, and must give exactly the same events each time.
"""

from __future__ import annotations

import errno
import itertools
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dstfs.nbd.protocol import (
    BASE_ALLOCATION,
    MAX_OPTION_DATA,
    MAX_PAYLOAD,
    ClientConnection,
    ClientFlags,
    Cmd,
    CmdFlag,
    ExportInfo,
    ExportNameReply,
    Info,
    Opt,
    Option,
    OptionReply,
    OptionTooBig,
    ProtocolError,
    Rep,
    ReplyType,
    Request,
    ServerConnection,
    ServerGreeting,
    SimpleReply,
    StructuredChunk,
    TransmissionFlag,
    apply_info,
    decode_block_status_payload,
    decode_error_chunk_payload,
    decode_go_data,
    decode_meta_context_query,
    decode_rep_meta_context,
    decode_rep_server,
    encode_block_status_payload,
    encode_error_chunk_payload,
    encode_go_data,
    encode_info_block_size,
    encode_info_export,
    encode_info_string,
    encode_meta_context_query,
    encode_rep_meta_context,
    encode_rep_server,
    errno_to_nbd,
    nbd_to_errno,
    rep_is_error,
    reply_type_is_error,
)

Conn = ServerConnection | ClientConnection

# ------------------------------------------------------------ the wire, from the spec

NBDMAGIC = b"NBDMAGIC"  # 0x4e42444d41474943
IHAVEOPT = b"IHAVEOPT"  # 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

EXPORT_SIZE = 1 << 30
EXPORT_FLAGS = 0x000D  # HAS_FLAGS | SEND_FLUSH | SEND_FUA


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def opt(option: int, data: bytes = b"") -> bytes:
    """C: IHAVEOPT, 32-bit option, 32-bit length, data."""
    return IHAVEOPT + u32(option) + u32(len(data)) + data


def rep(option: int, reply: int, data: bytes = b"") -> bytes:
    """S: 64-bit reply magic, 32-bit option, 32-bit reply type, 32-bit length, data."""
    return u64(OPTION_REPLY_MAGIC) + u32(option) + u32(reply) + u32(len(data)) + data


def req(flags: int, cmd: int, cookie: int, offset: int, length: int, data: bytes = b"") -> bytes:
    """C: 32-bit magic, 16-bit flags, 16-bit type, 64-bit cookie, 64-bit offset, 32-bit length."""
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data


def simple(error: int, cookie: int, data: bytes = b"") -> bytes:
    """S: 32-bit magic, 32-bit error, 64-bit cookie, then READ data."""
    return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(flags: int, type_: int, cookie: int, payload: bytes = b"") -> bytes:
    """S: 32-bit magic, 16-bit flags, 16-bit type, 64-bit cookie, 32-bit length, payload."""
    return struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, type_, cookie, len(payload)) + (
        payload
    )


# Payloads of NBD_REP_INFO / NBD_OPT_GO / error chunks, written out in hex.
INFO_EXPORT = bytes.fromhex("0000 0000000040000000 000d")  # type 0, size 1 GiB, flags
INFO_BLOCK_SIZE = bytes.fromhex("0003 00000200 00001000 02000000")  # 512, 4 KiB, 32 MiB
INFO_NAME = bytes.fromhex("0001") + b"disk"
INFO_DESCRIPTION = bytes.fromhex("0002") + b"the disk"
GO_DISK = bytes.fromhex("00000004") + b"disk" + bytes.fromhex("0002 0003 0001")
GO_DEFAULT = bytes.fromhex("00000000 0000")
REP_SERVER_DISK = bytes.fromhex("00000004") + b"disk" + b"the disk"
ERROR_CHUNK_EIO = bytes.fromhex("00000005 000a") + b"bad sector"

# ------------------------------------------------------------ harness


def drain(conn: Conn) -> list[object]:
    events = []
    while (ev := conn.next_event()) is not None:
        events.append(ev)
    return events


def feed(conn: Conn, chunks: list[bytes]) -> list[object]:
    """Feed with receive_data, pulling events after every chunk."""
    events = []
    for chunk_ in chunks:
        conn.receive_data(chunk_)
        events += drain(conn)
    return events


def feed_in_place(conn: Conn, chunks: list[bytes]) -> list[object]:
    """Feed as an I/O layer using recv_into would: bytes of a pending payload
    go straight into `payload_buffer()`, the rest through receive_data."""
    events = []
    for chunk_ in chunks:
        view = memoryview(chunk_)
        while view:
            buf = conn.payload_buffer()
            if buf is None:
                conn.receive_data(view)
                view = view[:0]
            else:
                assert len(buf) > 0, "a drained decoder offered an empty payload buffer"
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                conn.payload_received(n)
                view = view[n:]
            events += drain(conn)
    return events


def splits(data: bytes) -> Iterator[list[bytes]]:
    """Whole, one byte at a time, and in two parts split at every position."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]


def check_decode(make_conn: Callable[[], Conn], wire: bytes, expected: list[object]) -> None:
    for chunks in splits(wire):
        for feeder in (feed, feed_in_place):
            conn = make_conn()
            assert feeder(conn, chunks) == expected, (feeder.__name__, [len(c) for c in chunks])
            assert conn.buffered == 0
            assert conn.payload_buffer() is None


def exchange(data: bytes, conn: Conn) -> list[object]:
    conn.receive_data(data)
    return drain(conn)


def server_in_options(client_flags: int = 3, handshake_flags: int = 3) -> ServerConnection:
    server = ServerConnection(handshake_flags)
    assert exchange(u32(client_flags), server) == [ClientFlags(client_flags)]
    return server


def client_in_options(client_flags: int = 3, server_flags: int = 3) -> ClientConnection:
    client = ClientConnection()
    assert exchange(NBDMAGIC + IHAVEOPT + u16(server_flags), client) == [
        ServerGreeting(server_flags)
    ]
    assert client.client_flags_message(client_flags) == u32(client_flags)
    return client


def connected(
    *, structured: bool = False, export_name: bool = False
) -> tuple[ClientConnection, ServerConnection]:
    """Drive a real handshake between the two ends, in memory, up to the
    transmission phase (with NBD_OPT_GO, or NBD_OPT_EXPORT_NAME)."""
    client, server = ClientConnection(), ServerConnection()
    assert exchange(server.greeting(), client) == [ServerGreeting(3)]
    assert exchange(client.client_flags_message(3), server) == [ClientFlags(3)]
    if structured:
        assert exchange(client.option(Opt.STRUCTURED_REPLY), server) == [Option(8, b"")]
        assert exchange(server.option_reply(Opt.STRUCTURED_REPLY, Rep.ACK), client) == [
            OptionReply(8, 1, b"")
        ]
    if export_name:
        assert exchange(client.option(Opt.EXPORT_NAME, b"disk"), server) == [Option(1, b"disk")]
        assert exchange(server.export_name_reply(EXPORT_SIZE, EXPORT_FLAGS), client) == [
            ExportNameReply(EXPORT_SIZE, EXPORT_FLAGS)
        ]
    else:
        assert exchange(client.option(Opt.GO, GO_DISK), server) == [Option(7, GO_DISK)]
        replies = server.option_reply(Opt.GO, Rep.INFO, INFO_EXPORT) + server.option_reply(
            Opt.GO, Rep.ACK
        )
        assert exchange(replies, client) == [OptionReply(7, 3, INFO_EXPORT), OptionReply(7, 1, b"")]
    assert client.structured_replies is server.structured_replies is structured
    return client, server


def transmitting_server() -> ServerConnection:
    return connected()[1]


def test_splits_cover_every_cut() -> None:
    assert list(splits(b"ab")) == [[b"ab"], [b"a", b"b"], [b"", b"ab"], [b"a", b"b"], [b"ab", b""]]


# ------------------------------------------------------------ greeting and client flags

GREETINGS = [
    pytest.param(
        bytes.fromhex("4e42444d41474943 49484156454f5054 0003"), 3, id="fixed-newstyle+no-zeroes"
    ),
    pytest.param(NBDMAGIC + IHAVEOPT + u16(1), 1, id="fixed-newstyle"),
    pytest.param(NBDMAGIC + IHAVEOPT + u16(0xFFFF), 0xFFFF, id="unknown-flags-ignored"),
]


@pytest.mark.parametrize(("wire", "flags"), GREETINGS)
def test_greeting_is_decoded_by_client(wire: bytes, flags: int) -> None:
    check_decode(ClientConnection, wire, [ServerGreeting(flags)])


@pytest.mark.parametrize(("wire", "flags"), GREETINGS[:2])
def test_greeting_is_encoded_by_server(wire: bytes, flags: int) -> None:
    assert ServerConnection(flags).greeting() == wire


CLIENT_FLAGS = [
    pytest.param(bytes.fromhex("00000003"), 3, id="fixed-newstyle+no-zeroes"),
    pytest.param(bytes.fromhex("00000001"), 1, id="fixed-newstyle"),
    pytest.param(bytes.fromhex("00000000"), 0, id="none"),
]


@pytest.mark.parametrize(("wire", "flags"), CLIENT_FLAGS)
def test_client_flags_are_decoded_by_server(wire: bytes, flags: int) -> None:
    check_decode(ServerConnection, wire, [ClientFlags(flags)])


@pytest.mark.parametrize(("wire", "flags"), CLIENT_FLAGS)
def test_client_flags_are_encoded_by_client(wire: bytes, flags: int) -> None:
    client = ClientConnection()
    assert exchange(NBDMAGIC + IHAVEOPT + u16(3), client) == [ServerGreeting(3)]
    assert client.client_flags_message(flags) == wire


# ------------------------------------------------------------ options

OPTIONS = [
    pytest.param(
        bytes.fromhex("49484156454f5054 00000001 00000004") + b"disk",
        Option(Opt.EXPORT_NAME, b"disk"),
        id="export-name",
    ),
    pytest.param(opt(2), Option(Opt.ABORT, b""), id="abort"),
    pytest.param(opt(3), Option(Opt.LIST, b""), id="list"),
    pytest.param(opt(6, GO_DEFAULT), Option(Opt.INFO, GO_DEFAULT), id="info-default-export"),
    pytest.param(opt(7, GO_DISK), Option(Opt.GO, GO_DISK), id="go-with-info-requests"),
    pytest.param(opt(8), Option(Opt.STRUCTURED_REPLY, b""), id="structured-reply"),
    pytest.param(opt(0xBEEF, b"\x01\x02\x03"), Option(0xBEEF, b"\x01\x02\x03"), id="unknown"),
]


@pytest.mark.parametrize(("wire", "event"), OPTIONS)
def test_option_is_decoded_by_server(wire: bytes, event: Option) -> None:
    check_decode(server_in_options, wire, [event])


@pytest.mark.parametrize(("wire", "event"), OPTIONS)
def test_option_is_encoded_by_client(wire: bytes, event: Option) -> None:
    assert client_in_options().option(event.opt, event.data) == wire


def test_options_back_to_back_are_decoded_in_order() -> None:
    wire = opt(3) + opt(8) + opt(7, GO_DISK)
    expected = [Option(3, b""), Option(8, b""), Option(7, GO_DISK)]
    check_decode(server_in_options, wire, expected)


def test_option_of_exactly_max_option_data_is_kept() -> None:
    data = bytes(range(256)) * (MAX_OPTION_DATA // 256)
    server = server_in_options()
    assert feed(server, [opt(0xBEEF, data)]) == [Option(0xBEEF, data)]


@pytest.mark.parametrize(
    ("data", "name", "info_requests"),
    [
        pytest.param(GO_DISK, "disk", (Info.BLOCK_SIZE, Info.NAME), id="disk"),
        pytest.param(GO_DEFAULT, "", (), id="default"),
        pytest.param(bytes.fromhex("00000005 64c3ad736b 0000"), "dísk", (), id="utf8"),
    ],
)
def test_go_data_encodes_and_decodes(data: bytes, name: str, info_requests: tuple) -> None:
    assert encode_go_data(name, info_requests) == data
    assert decode_go_data(data) == (name, info_requests)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(bytes(5), id="too-short"),
        pytest.param(u32(5) + b"disk" + u16(0), id="name-overruns"),
        pytest.param(u32(4097) + b"x" * 4097 + u16(0), id="name-over-4096"),
        pytest.param(u32(0) + u16(1), id="missing-info-request"),
        pytest.param(u32(0) + u16(0) + b"\x00", id="trailing-byte"),
        pytest.param(u32(0) + u16(1) + b"\x00", id="odd-info-request"),
        pytest.param(u32(1) + b"\xff" + u16(0), id="name-not-utf8"),
    ],
)
def test_decode_go_data_rejects_malformed_data(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_go_data(data)


# ------------------------------------------------------------ option replies

# (option the client sent, [(reply type, data)] the server sends, wire)
OPTION_REPLIES = [
    pytest.param(
        8,
        [(Rep.ACK, b"")],
        bytes.fromhex("0003e889045565a9 00000008 00000001 00000000"),
        id="ack-structured-reply",
    ),
    pytest.param(2, [(Rep.ACK, b"")], rep(2, 1), id="ack-abort"),
    pytest.param(
        3,
        [(Rep.SERVER, REP_SERVER_DISK), (Rep.SERVER, u32(0)), (Rep.ACK, b"")],
        rep(3, 2, REP_SERVER_DISK) + rep(3, 2, u32(0)) + rep(3, 1),
        id="list-server-server-ack",
    ),
    pytest.param(
        7,
        [
            (Rep.INFO, INFO_EXPORT),
            (Rep.INFO, INFO_BLOCK_SIZE),
            (Rep.INFO, INFO_NAME),
            (Rep.ACK, b""),
        ],
        rep(7, 3, INFO_EXPORT) + rep(7, 3, INFO_BLOCK_SIZE) + rep(7, 3, INFO_NAME) + rep(7, 1),
        id="go-info-export-block-size-name-ack",
    ),
    pytest.param(
        6,
        [(Rep.INFO, INFO_EXPORT), (Rep.INFO, INFO_DESCRIPTION), (Rep.ACK, b"")],
        rep(6, 3, INFO_EXPORT) + rep(6, 3, INFO_DESCRIPTION) + rep(6, 1),
        id="info-export-description-ack",
    ),
    pytest.param(7, [(Rep.ERR_UNSUP, b"")], rep(7, 0x80000001), id="go-err-unsup"),
    pytest.param(
        7,
        [(Rep.ERR_UNKNOWN, b"no such export")],
        rep(7, 0x80000006, b"no such export"),
        id="go-err-unknown-with-message",
    ),
    pytest.param(0xBEEF, [(Rep.ERR_UNSUP, b"")], rep(0xBEEF, 0x80000001), id="unknown-err-unsup"),
]


@pytest.mark.parametrize(("sent", "replies", "wire"), OPTION_REPLIES)
def test_option_replies_are_encoded_by_server(sent: int, replies: list, wire: bytes) -> None:
    server = server_in_options()
    assert b"".join(server.option_reply(sent, r, data) for r, data in replies) == wire


@pytest.mark.parametrize(("sent", "replies", "wire"), OPTION_REPLIES)
def test_option_replies_are_decoded_by_client(sent: int, replies: list, wire: bytes) -> None:
    def make() -> ClientConnection:
        client = client_in_options()
        client.option(sent)
        return client

    check_decode(make, wire, [OptionReply(sent, r, data) for r, data in replies])


@pytest.mark.parametrize(
    ("encoded", "wire"),
    [
        pytest.param(encode_info_export(EXPORT_SIZE, EXPORT_FLAGS), INFO_EXPORT, id="export"),
        pytest.param(encode_info_block_size(512, 4096, 32 << 20), INFO_BLOCK_SIZE, id="block"),
        pytest.param(encode_info_string(Info.NAME, "disk"), INFO_NAME, id="name"),
        pytest.param(encode_info_string(Info.DESCRIPTION, "the disk"), INFO_DESCRIPTION, id="desc"),
        pytest.param(encode_rep_server("disk", "the disk"), REP_SERVER_DISK, id="rep-server"),
        pytest.param(encode_error_chunk_payload(5, "bad sector"), ERROR_CHUNK_EIO, id="err-chunk"),
    ],
)
def test_reply_payload_encoders_match_the_spec_layout(encoded: bytes, wire: bytes) -> None:
    assert encoded == wire


def test_payload_decoders_invert_the_spec_layout() -> None:
    assert decode_rep_server(REP_SERVER_DISK) == ("disk", "the disk")
    assert decode_rep_server(u32(0)) == ("", "")
    assert decode_error_chunk_payload(ERROR_CHUNK_EIO) == (5, "bad sector")
    assert decode_error_chunk_payload(u32(22) + u16(0)) == (22, "")


@pytest.mark.parametrize("payload", [b"", bytes(5), u32(5) + u16(3) + b"ab"])
def test_malformed_error_chunk_payload_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_error_chunk_payload(payload)


@pytest.mark.parametrize("data", [b"", b"\x00\x00\x00", u32(5) + b"disk"])
def test_malformed_rep_server_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_rep_server(data)


def test_rep_and_reply_type_error_bits() -> None:
    assert [rep_is_error(r) for r in (1, 2, 3, 0x80000001, 0x8000000A)] == [0, 0, 0, 1, 1]
    assert [reply_type_is_error(t) for t in (0, 1, 2, 5, 0x8001, 0x8002)] == [0, 0, 0, 0, 1, 1]


def test_error_messages_are_cut_to_the_spec_string_length_at_a_character() -> None:
    """Strings SHOULD be at most 256 bytes (MUST 4096): a message quoting a
    long export name is cut, never in the middle of a UTF-8 character."""
    server = server_in_options()
    long = "\u00e9" * 3000  # 6000 bytes
    wire = server.option_reply(6, Rep.ERR_UNKNOWN, long.encode())
    magic, option, reply, length = struct.unpack(">QIII", wire[:20])
    assert magic == OPTION_REPLY_MAGIC
    assert (option, reply) == (6, 0x80000006) and length == len(wire) - 20 <= 256
    assert wire[20:].decode("utf-8").startswith("\u00e9" * 100)
    assert server.option_reply(6, Rep.ERR_UNKNOWN, b"short") == rep(6, 0x80000006, b"short")
    error, message = decode_error_chunk_payload(encode_error_chunk_payload(5, long))
    assert error == 5 and len(message.encode()) <= 256 and set(message) <= {"\u00e9", "."}


def test_client_may_send_another_option_after_a_final_error_reply() -> None:
    client = client_in_options()
    client.option(Opt.GO, GO_DISK)
    assert exchange(rep(7, 0x80000001), client) == [OptionReply(7, Rep.ERR_UNSUP, b"")]
    assert client.option(Opt.EXPORT_NAME, b"disk") == opt(1, b"disk")


def test_meta_context_replies_are_not_final() -> None:
    client = client_in_options()
    client.option(Opt.LIST_META_CONTEXT, u32(0) + u32(0))
    context = u32(1) + b"base:allocation"
    wire = rep(9, 4, context) + rep(9, 1)
    assert exchange(wire, client) == [OptionReply(9, 4, context), OptionReply(9, 1, b"")]


# ------------------------------------------------------------ NBD_OPT_EXPORT_NAME reply

EXPORT_NAME_REPLIES = [
    pytest.param(3, u64(EXPORT_SIZE) + u16(EXPORT_FLAGS), id="no-zeroes-10-bytes"),
    pytest.param(1, u64(EXPORT_SIZE) + u16(EXPORT_FLAGS) + bytes(124), id="zeroes-134-bytes"),
]


@pytest.mark.parametrize(("client_flags", "wire"), EXPORT_NAME_REPLIES)
def test_export_name_reply_is_encoded_by_server(client_flags: int, wire: bytes) -> None:
    server = server_in_options(client_flags)
    assert exchange(opt(1, b"disk"), server) == [Option(Opt.EXPORT_NAME, b"disk")]
    assert server.export_name_reply(EXPORT_SIZE, EXPORT_FLAGS) == wire
    assert exchange(req(0, 3, 1, 0, 0), server) == [Request(0, Cmd.FLUSH, 1, 0, 0)]


@pytest.mark.parametrize(("client_flags", "wire"), EXPORT_NAME_REPLIES)
def test_export_name_reply_is_decoded_by_client(client_flags: int, wire: bytes) -> None:
    def make() -> ClientConnection:
        client = client_in_options(client_flags)
        assert client.option(Opt.EXPORT_NAME, b"disk") == opt(1, b"disk")
        return client

    check_decode(make, wire, [ExportNameReply(EXPORT_SIZE, EXPORT_FLAGS)])
    client = make()
    assert exchange(wire, client) == [ExportNameReply(EXPORT_SIZE, EXPORT_FLAGS)]
    assert client.request(Cmd.FLUSH, 1, 0, 0) == req(0, 3, 1, 0, 0)


def test_export_name_reply_without_no_zeroes_waits_for_the_zeroes() -> None:
    client = client_in_options(client_flags=1)
    client.option(Opt.EXPORT_NAME, b"")
    assert exchange(u64(EXPORT_SIZE) + u16(EXPORT_FLAGS) + bytes(123), client) == []
    assert exchange(b"\x00", client) == [ExportNameReply(EXPORT_SIZE, EXPORT_FLAGS)]


def test_handshake_with_export_name_reaches_transmission() -> None:
    client, server = connected(export_name=True)
    assert exchange(client.request(Cmd.READ, 1, 0, 512), server) == [
        Request(0, Cmd.READ, 1, 0, 512)
    ]


# ------------------------------------------------------------ requests

REQUESTS = [
    pytest.param(
        bytes.fromhex("25609513 0000 0000 0102030405060708 0000000000001000 00000200"),
        Request(flags=0, type=Cmd.READ, cookie=0x0102030405060708, offset=4096, length=512),
        id="read",
    ),
    pytest.param(
        req(0, 1, 2, 1 << 40, 5, b"hello"),
        Request(flags=0, type=Cmd.WRITE, cookie=2, offset=1 << 40, length=5, data=b"hello"),
        id="write",
    ),
    pytest.param(
        req(1, 1, 3, 512, 3, b"fua"),
        Request(flags=CmdFlag.FUA, type=Cmd.WRITE, cookie=3, offset=512, length=3, data=b"fua"),
        id="write-fua",
    ),
    pytest.param(
        req(0, 1, 4, 0, 0),
        Request(flags=0, type=Cmd.WRITE, cookie=4, offset=0, length=0, data=b""),
        id="write-empty",
    ),
    pytest.param(
        req(0, 3, 5, 0, 0),
        Request(flags=0, type=Cmd.FLUSH, cookie=5, offset=0, length=0),
        id="flush",
    ),
    pytest.param(
        req(0, 4, 6, 1 << 20, 1 << 16),
        Request(flags=0, type=Cmd.TRIM, cookie=6, offset=1 << 20, length=1 << 16),
        id="trim",
    ),
    pytest.param(
        req(2, 6, 7, 8192, 1 << 31),
        Request(
            flags=CmdFlag.NO_HOLE, type=Cmd.WRITE_ZEROES, cookie=7, offset=8192, length=1 << 31
        ),
        id="write-zeroes-no-hole",
    ),
    pytest.param(
        req(1, 6, 8, 0, 4096),
        Request(flags=CmdFlag.FUA, type=Cmd.WRITE_ZEROES, cookie=8, offset=0, length=4096),
        id="write-zeroes-fua",
    ),
    pytest.param(
        req(0, 2, 2**64 - 1, 0, 0),
        Request(flags=0, type=Cmd.DISC, cookie=2**64 - 1, offset=0, length=0),
        id="disc",
    ),
    pytest.param(
        req(0, 0x1234, 9, 2**64 - 1, 2**32 - 1),
        Request(flags=0, type=0x1234, cookie=9, offset=2**64 - 1, length=2**32 - 1),
        id="unknown-command-max-fields",
    ),
]


@pytest.mark.parametrize(("wire", "event"), REQUESTS)
def test_request_is_encoded_by_client(wire: bytes, event: Request) -> None:
    client, _ = connected()
    header = client.request(event.type, event.cookie, event.offset, event.length, event.flags)
    assert header + event.data == wire


@pytest.mark.parametrize(("wire", "event"), REQUESTS)
def test_request_is_decoded_by_server(wire: bytes, event: Request) -> None:
    check_decode(transmitting_server, wire, [event])


def test_pipelined_requests_are_decoded_in_order() -> None:
    wire = req(0, 1, 1, 0, 4, b"abcd") + req(0, 0, 2, 0, 4) + req(1, 1, 3, 4, 2, b"ef")
    wire += req(0, 3, 4, 0, 0) + req(0, 2, 5, 0, 0)
    expected = [
        Request(0, Cmd.WRITE, 1, 0, 4, b"abcd"),
        Request(0, Cmd.READ, 2, 0, 4),
        Request(1, Cmd.WRITE, 3, 4, 2, b"ef"),
        Request(0, Cmd.FLUSH, 4, 0, 0),
        Request(0, Cmd.DISC, 5, 0, 0),
    ]
    check_decode(transmitting_server, wire, expected)


def test_server_decodes_nothing_after_disc() -> None:
    server = transmitting_server()
    assert exchange(req(0, 2, 1, 0, 0) + req(0, 0, 2, 0, 512), server) == [
        Request(0, Cmd.DISC, 1, 0, 0)
    ]
    assert server.next_event() is None


# ------------------------------------------------------------ replies

# (structured?, requests the client sent, server encoding, wire, events)
REPLIES = [
    pytest.param(
        False,
        [(Cmd.READ, 1, 0, 4)],
        lambda s: s.read_data_header(1, 0, 4) + b"data",
        bytes.fromhex("67446698 00000000 0000000000000001") + b"data",
        [SimpleReply(1, 0, b"data")],
        id="simple-read",
    ),
    pytest.param(
        False,
        [(Cmd.READ, 2, 0, 4)],
        lambda s: s.error_reply(2, errno.EIO, "ignored without structured replies"),
        simple(5, 2),
        [SimpleReply(2, 5)],
        id="simple-read-error-without-data",
    ),
    pytest.param(
        False,
        [(Cmd.WRITE, 3, 0, 4)],
        lambda s: s.simple_reply_header(3),
        simple(0, 3),
        [SimpleReply(3, 0)],
        id="simple-write-ack",
    ),
    pytest.param(
        False,
        [(Cmd.READ, 4, 0, 2), (Cmd.TRIM, 5, 0, 9), (Cmd.READ, 6, 0, 0)],
        lambda s: (
            s.simple_reply_header(6)
            + s.simple_reply_header(5, errno.EPERM)
            + s.read_data_header(4, 0, 2)
            + b"ab"
        ),
        simple(0, 6) + simple(1, 5) + simple(0, 4, b"ab"),
        [SimpleReply(6, 0, b""), SimpleReply(5, 1), SimpleReply(4, 0, b"ab")],
        id="simple-out-of-order",
    ),
    pytest.param(
        True,
        [(Cmd.READ, 7, 4096, 3)],
        lambda s: s.read_data_header(7, 4096, 3) + b"xyz",
        bytes.fromhex("668e33ef 0001 0001 0000000000000007 0000000b 0000000000001000") + b"xyz",
        [StructuredChunk(1, ReplyType.OFFSET_DATA, 7, u64(4096) + b"xyz")],
        id="structured-offset-data-done",
    ),
    pytest.param(
        True,
        [(Cmd.READ, 8, 0, 512)],
        lambda s: s.error_reply(8, errno.EIO, "bad sector"),
        chunk(1, 0x8001, 8, ERROR_CHUNK_EIO),
        [StructuredChunk(1, ReplyType.ERROR, 8, ERROR_CHUNK_EIO)],
        id="structured-error-with-message",
    ),
    pytest.param(
        True,
        [(Cmd.READ, 9, 100, 4)],
        lambda s: (
            s.chunk_header(0, ReplyType.OFFSET_DATA, 9, 10)
            + u64(100)
            + b"ab"
            + s.chunk_header(0, ReplyType.OFFSET_DATA, 9, 10)
            + u64(102)
            + b"cd"
            + s.chunk_header(1, ReplyType.NONE, 9, 0)
        ),
        chunk(0, 1, 9, u64(100) + b"ab") + chunk(0, 1, 9, u64(102) + b"cd") + chunk(1, 0, 9),
        [
            StructuredChunk(0, 1, 9, u64(100) + b"ab"),
            StructuredChunk(0, 1, 9, u64(102) + b"cd"),
            StructuredChunk(1, 0, 9, b""),
        ],
        id="structured-fragmented-read",
    ),
    pytest.param(
        True,
        [(Cmd.FLUSH, 10, 0, 0)],
        lambda s: s.chunk_header(1, ReplyType.NONE, 10, 0),
        chunk(1, 0, 10),
        [StructuredChunk(1, ReplyType.NONE, 10, b"")],
        id="structured-flush-ack",
    ),
]


def client_awaiting(structured: bool, sent: list[tuple[int, int, int, int]]) -> ClientConnection:
    client, _ = connected(structured=structured)
    for cmd, cookie, offset, length in sent:
        client.request(cmd, cookie, offset, length)
    return client


@pytest.mark.parametrize(("structured", "sent", "encode", "wire", "events"), REPLIES)
def test_reply_is_encoded_by_server(
    structured: bool, sent: list, encode: Callable, wire: bytes, events: list
) -> None:
    _, server = connected(structured=structured)
    assert encode(server) == wire


@pytest.mark.parametrize(("structured", "sent", "encode", "wire", "events"), REPLIES)
def test_reply_is_decoded_by_client(
    structured: bool, sent: list, encode: Callable, wire: bytes, events: list
) -> None:
    check_decode(lambda: client_awaiting(structured, sent), wire, events)


# ------------------------------------------------------------ in-place payloads


def test_payload_buffer_is_a_writable_view_of_a_pending_write() -> None:
    server = transmitting_server()
    assert server.payload_buffer() is None
    server.receive_data(req(0, 1, 7, 0, 5)[:-1])
    assert server.next_event() is None
    assert server.payload_buffer() is None  # header incomplete: bytes are still buffered
    server.receive_data(b"\x05")
    assert server.next_event() is None
    view = server.payload_buffer()
    assert isinstance(view, memoryview) and not view.readonly and len(view) == 5
    view[:2] = b"he"
    server.payload_received(2)
    assert server.next_event() is None
    view = server.payload_buffer()
    assert view is not None and len(view) == 3
    view[:] = b"llo"
    server.payload_received(3)
    assert server.next_event() == Request(0, Cmd.WRITE, 7, 0, 5, b"hello")
    assert server.payload_buffer() is None


def test_payload_buffer_receives_read_data_in_place() -> None:
    client = client_awaiting(False, [(Cmd.READ, 1, 0, 6)])
    client.receive_data(simple(0, 1, b"ab"))
    assert client.next_event() is None
    view = client.payload_buffer()
    assert view is not None and len(view) == 4
    view[:] = b"cdef"
    client.payload_received(4)
    assert client.next_event() == SimpleReply(1, 0, b"abcdef")


# ------------------------------------------------------------ bad input

BAD_INPUT = [
    pytest.param(ClientConnection, b"NBDMAGIX" + IHAVEOPT + u16(3), "magic", id="bad-server-magic"),
    pytest.param(
        ClientConnection,
        NBDMAGIC + bytes.fromhex("0000420281861253") + u16(0),
        "newstyle",
        id="oldstyle-server",
    ),
    pytest.param(
        lambda: ServerConnection(handshake_flags=1), u32(3), "NO_ZEROES", id="no-zeroes-unoffered"
    ),
    pytest.param(server_in_options, b"IHAVEOPX" + u32(1) + u32(0), "magic", id="bad-option-magic"),
    pytest.param(
        server_in_options, IHAVEOPT + u32(1) + u32(4097), "too long", id="export-name-over-4096"
    ),
    pytest.param(
        transmitting_server,
        struct.pack(">IHHQQI", 0x25609514, 0, 0, 1, 0, 512),
        "magic",
        id="bad-request-magic",
    ),
    pytest.param(
        lambda: client_awaiting(False, [(Cmd.READ, 1, 0, 4)]),
        struct.pack(">IIQ", 0x67446699, 0, 1),
        "magic",
        id="bad-reply-magic",
    ),
    pytest.param(
        lambda: client_awaiting(True, [(Cmd.READ, 1, 0, 4)]),
        struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, 1, 1, 1, MAX_PAYLOAD + 9),
        "too big",
        id="structured-chunk-too-big",
    ),
    pytest.param(
        client_in_options,
        rep(7, 1),
        "not asked",
        id="option-reply-with-no-option-sent",
    ),
    pytest.param(
        lambda: _client_sent(Opt.LIST),
        rep(7, 1),
        "not asked",
        id="option-reply-to-another-option",
    ),
    pytest.param(
        lambda: _client_sent(Opt.LIST),
        struct.pack(">QIII", OPTION_REPLY_MAGIC + 1, 3, 1, 0),
        "magic",
        id="bad-option-reply-magic",
    ),
    pytest.param(
        lambda: _client_sent(Opt.LIST),
        struct.pack(">QIII", OPTION_REPLY_MAGIC, 3, 2, MAX_OPTION_DATA + 1),
        "too big",
        id="option-reply-too-big",
    ),
]


def _client_sent(option: int) -> ClientConnection:
    client = client_in_options()
    client.option(option)
    return client


@pytest.mark.parametrize(("make", "wire", "match"), BAD_INPUT)
def test_bad_input_is_a_protocol_error(make: Callable[[], Conn], wire: bytes, match: str) -> None:
    for chunks in splits(wire):
        with pytest.raises(ProtocolError, match=match):
            feed(make(), chunks)


@pytest.mark.parametrize("flags", [0x4, 0x7, 0x80000001])
def test_unknown_client_flags_are_a_protocol_error(flags: int) -> None:
    with pytest.raises(ProtocolError, match="unknown client flags"):
        feed(ServerConnection(), [u32(flags)])


def test_oversized_option_is_reported_then_discarded_without_buffering() -> None:
    server = server_in_options()
    size = 1 << 20
    stream = IHAVEOPT + u32(3) + u32(size) + bytes(size) + opt(7, GO_DISK)
    piece = 64 * 1024
    events = []
    for i in range(0, len(stream), piece):
        events += feed(server, [stream[i : i + piece]])
        assert server.buffered < 64
        assert server.payload_buffer() is None
    assert events == [OptionTooBig(Opt.LIST, size), Option(Opt.GO, GO_DISK)]
    assert server.buffered == 0


def test_option_one_byte_over_max_option_data_is_too_big() -> None:
    server = server_in_options()
    size = MAX_OPTION_DATA + 1
    wire = opt(0xBEEF, bytes(size)) + opt(8)
    assert feed(server, [wire]) == [OptionTooBig(0xBEEF, size), Option(8, b"")]


def test_oversized_write_is_discarded_without_buffering_then_reported() -> None:
    """Reported only once its payload went past: a reply sent before would
    reach a client still sending that payload."""
    server = transmitting_server()
    size = MAX_PAYLOAD + 1
    assert feed(server, [req(0, 1, 9, 0, size)]) == []
    zeroes, piece = memoryview(bytes(1 << 20)), 1 << 20
    left = size
    while left > piece:
        assert feed(server, [zeroes]) == []
        assert server.buffered == 0
        assert server.payload_buffer() is None
        left -= piece
    assert feed(server, [bytes(left - 1)]) == []
    tail = bytes(1) + req(0, 0, 10, 0, 512)
    assert feed(server, [tail]) == [
        Request(0, Cmd.WRITE, 9, 0, size, None),
        Request(0, Cmd.READ, 10, 0, 512),
    ]
    assert server.buffered == 0


# ------------------------------------------------------------ phase errors

PHASE_ERRORS = [
    pytest.param(lambda: ClientConnection().client_flags_message(1), id="flags-before-greeting"),
    pytest.param(lambda: ClientConnection().option(Opt.LIST), id="option-before-greeting"),
    pytest.param(lambda: client_in_options().request(Cmd.READ, 1, 0, 512), id="request-before-go"),
    pytest.param(lambda: _client_sent(Opt.LIST).option(Opt.GO), id="option-before-final-reply"),
    pytest.param(lambda: connected()[0].option(Opt.LIST), id="option-after-go"),
    pytest.param(lambda: connected()[0].client_flags_message(1), id="flags-after-go"),
    pytest.param(lambda: _after_disc().request(Cmd.READ, 2, 0, 512), id="request-after-disc"),
    pytest.param(lambda: ServerConnection().option_reply(3, Rep.ACK), id="reply-before-flags"),
    pytest.param(lambda: connected()[1].option_reply(3, Rep.ACK), id="option-reply-after-go"),
    pytest.param(lambda: connected()[1].export_name_reply(1, 1), id="export-reply-after-go"),
    pytest.param(lambda: connected()[1].chunk_header(1, 0, 1, 0), id="chunk-unnegotiated"),
]


def _after_disc() -> ClientConnection:
    client, _ = connected()
    client.request(Cmd.DISC, 1, 0, 0)
    return client


@pytest.mark.parametrize("call", PHASE_ERRORS)
def test_encoding_in_the_wrong_phase_is_a_runtime_error(call: Callable[[], object]) -> None:
    with pytest.raises(RuntimeError):
        call()


# ------------------------------------------------------------ round trips (hypothesis)

U16 = st.integers(0, 2**16 - 1)
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)

WRITES = st.builds(
    lambda flags, cookie, offset, data: Request(flags, Cmd.WRITE, cookie, offset, len(data), data),
    U16,
    U64,
    U64,
    st.binary(max_size=300),
)
OTHER_REQUESTS = st.builds(
    Request,
    flags=U16,
    type=st.sampled_from([Cmd.READ, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES])
    | U16.filter(lambda t: t not in (Cmd.WRITE, Cmd.DISC)),
    cookie=U64,
    offset=U64,
    length=U32,
)


def pieces(data: st.DataObject, wire: bytes) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=16), label="cuts"))
    bounds = [0, *cuts, len(wire)]
    return [wire[a:b] for a, b in itertools.pairwise(bounds)]


@settings(deadline=None)
@given(
    requests=st.lists(WRITES | OTHER_REQUESTS, max_size=12),
    disc=st.booleans(),
    in_place=st.booleans(),
    data=st.data(),
)
def test_random_requests_round_trip(
    requests: list[Request], disc: bool, in_place: bool, data: st.DataObject
) -> None:
    client, server = connected()
    if disc:
        requests = [*requests, Request(0, Cmd.DISC, 0, 0, 0)]
    wire = b"".join(
        client.request(r.type, r.cookie, r.offset, r.length, r.flags) + r.data for r in requests
    )
    events = (feed_in_place if in_place else feed)(server, pieces(data, wire))
    assert events == requests
    assert server.buffered == 0


NBD_ERRORS = st.sampled_from([1, 5, 12, 22, 28, 75, 95, 108])


def _reply_parts(
    data: st.DataObject, server: ServerConnection, cmd: int, cookie: int, offset: int, length: int
) -> list[tuple[bytes, object]]:
    """The (bytes, event) pairs the server answers one request with."""
    draw = data.draw
    error = draw(st.none() | NBD_ERRORS)
    if not server.structured_replies:
        if error:
            return [(server.error_reply(cookie, error), SimpleReply(cookie, error))]
        if cmd == Cmd.READ:
            payload = draw(st.binary(min_size=length, max_size=length))
            header = server.read_data_header(cookie, offset, length)
            return [(header + payload, SimpleReply(cookie, 0, payload))]
        return [(server.simple_reply_header(cookie), SimpleReply(cookie, 0))]
    if error:
        raw = draw(st.text(max_size=20)).encode()
        body = u32(error) + u16(len(raw)) + raw
        wire = server.error_reply(cookie, error, raw.decode())
        return [(wire, StructuredChunk(1, ReplyType.ERROR, cookie, body))]
    if cmd != Cmd.READ:
        return [(server.chunk_header(1, 0, cookie, 0), StructuredChunk(1, 0, cookie, b""))]
    payload = draw(st.binary(min_size=length, max_size=length))
    if not length:  # no data chunk (it would be under the 9 bytes minimum)
        wire = server.read_data_header(cookie, offset, 0)
        return [(wire, StructuredChunk(1, ReplyType.NONE, cookie, b""))]
    if length < 2 or draw(st.booleans()):
        wire = server.read_data_header(cookie, offset, length) + payload
        return [(wire, StructuredChunk(1, 1, cookie, u64(offset) + payload))]
    cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=3)))  # no empty fragments
    bounds = [0, *cuts, length]
    parts = []
    for a, b in itertools.pairwise(bounds):
        body = u64(offset + a) + payload[a:b]
        header = server.chunk_header(0, ReplyType.OFFSET_DATA, cookie, len(body))
        parts.append((header + body, StructuredChunk(0, 1, cookie, body)))
    parts.append((server.chunk_header(1, 0, cookie, 0), StructuredChunk(1, 0, cookie, b"")))
    return parts


@settings(deadline=None)
@given(
    structured=st.booleans(),
    cookies=st.lists(U64, max_size=8, unique=True),
    in_place=st.booleans(),
    data=st.data(),
)
def test_random_replies_round_trip(
    structured: bool, cookies: list[int], in_place: bool, data: st.DataObject
) -> None:
    client, server = connected(structured=structured)
    queues = []
    for cookie in cookies:
        cmd = data.draw(st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM]))
        length = data.draw(st.integers(0, 64) if cmd == Cmd.READ else U32)
        offset = data.draw(st.integers(0, 2**63))
        client.request(cmd, cookie, offset, length)
        queues.append(_reply_parts(data, server, cmd, cookie, offset, length))
    # Replies come in any order; structured chunks of different requests interleave.
    wire, expected = b"", []
    while queues:
        i = data.draw(st.integers(0, len(queues) - 1))
        part, event = queues[i].pop(0)
        wire += part
        expected.append(event)
        if not queues[i]:
            del queues[i]
    events = (feed_in_place if in_place else feed)(client, pieces(data, wire))
    assert events == expected
    assert client.buffered == 0


# ------------------------------------------------------------ errors, info, constants


@pytest.mark.parametrize(
    ("err", "nbd"),
    [
        (errno.EPERM, 1),
        (errno.EIO, 5),
        (errno.ENOMEM, 12),
        (errno.EINVAL, 22),
        (errno.ENOSPC, 28),
        (errno.EOVERFLOW, 75),
        (errno.ENOTSUP, 95),
        (errno.ESHUTDOWN, 108),
        (errno.EDQUOT, 28),
        (errno.EFBIG, 28),
        (errno.EROFS, 1),
        (errno.EACCES, 1),
        (errno.EOPNOTSUPP, 95),
        (errno.ENOENT, 5),
        (errno.EBADF, 5),
        (errno.ETIMEDOUT, 5),
    ],
)
def test_errno_to_nbd(err: int, nbd: int) -> None:
    assert errno_to_nbd(err) == nbd


@pytest.mark.parametrize(
    ("nbd", "err"),
    [
        (1, errno.EPERM),
        (5, errno.EIO),
        (12, errno.ENOMEM),
        (22, errno.EINVAL),
        (28, errno.ENOSPC),
        (75, errno.EOVERFLOW),
        (95, errno.ENOTSUP),
        (108, errno.ESHUTDOWN),
        (0, errno.EIO),
        (2, errno.EIO),
        (999, errno.EIO),
    ],
)
def test_nbd_to_errno(nbd: int, err: int) -> None:
    assert nbd_to_errno(nbd) == err


BASE = ExportInfo(size=100, flags=1, name="old")

APPLY_INFO = [
    pytest.param(None, INFO_EXPORT, ExportInfo(EXPORT_SIZE, EXPORT_FLAGS), id="export-new"),
    pytest.param(
        BASE, INFO_EXPORT, ExportInfo(EXPORT_SIZE, EXPORT_FLAGS, name="old"), id="export-update"
    ),
    pytest.param(
        BASE,
        INFO_BLOCK_SIZE,
        ExportInfo(100, 1, min_block=512, preferred_block=4096, max_payload=32 << 20, name="old"),
        id="block-size",
    ),
    pytest.param(BASE, INFO_NAME, ExportInfo(100, 1, name="disk"), id="name"),
    pytest.param(
        BASE, INFO_DESCRIPTION, ExportInfo(100, 1, name="old", description="the disk"), id="desc"
    ),
    pytest.param(None, INFO_NAME, ExportInfo(-1, 0, name="disk"), id="name-before-export"),
    pytest.param(BASE, u16(1) + b"\xff", ExportInfo(100, 1, name="\ufffd"), id="name-bad-utf8"),
    pytest.param(BASE, u16(0x00FF) + b"future", BASE, id="unknown-type-ignored"),
    pytest.param(None, u16(0x00FF), None, id="unknown-type-before-export"),
]


@pytest.mark.parametrize(("info", "data", "expected"), APPLY_INFO)
def test_apply_info(info: ExportInfo | None, data: bytes, expected: ExportInfo | None) -> None:
    assert apply_info(info, data) == expected


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00", id="half-type"),
        pytest.param(INFO_EXPORT[:-1], id="export-short"),
        pytest.param(INFO_EXPORT + b"\x00", id="export-long"),
        pytest.param(INFO_BLOCK_SIZE[:-1], id="block-size-short"),
        pytest.param(INFO_BLOCK_SIZE + b"\x00", id="block-size-long"),
    ],
)
def test_apply_info_rejects_malformed_info(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        apply_info(BASE, data)


def test_constants_match_the_spec() -> None:
    assert [int(o) for o in Opt] == list(range(1, 12))
    assert [int(r) for r in Rep if r < 2**31] == [1, 2, 3, 4]
    assert [int(r) - 2**31 for r in Rep if r >= 2**31] == list(range(1, 11))
    assert [int(c) for c in Cmd] == list(range(9))
    assert [int(f) for f in CmdFlag] == [1, 2, 4, 8, 16]
    assert [int(f) for f in TransmissionFlag] == [1 << i for i in range(12)]
    assert [int(i) for i in Info] == [0, 1, 2, 3]
    assert (ReplyType.OFFSET_HOLE, ReplyType.BLOCK_STATUS) == (2, 5)
    assert (ReplyType.ERROR, ReplyType.ERROR_OFFSET) == (32769, 32770)
    assert MAX_PAYLOAD == 64 << 20  # nbdkit's limit


# ---------------------------------------------------------------- reads into caller buffers


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("split", [True, False])
def test_read_reply_scatters_into_caller_views(piece: int, in_place: bool, split: bool) -> None:
    """Fed whole (one view: the one-copy path) and in pieces."""
    client, _ = connected()
    data = bytes(range(256)) * 40  # 10240 bytes
    target = bytearray(len(data))
    view = memoryview(target)
    # Out of order on purpose: the views, not the buffer, set where bytes go.
    views = [view[5000:], view[0:5000]] if split else [view]
    client.request(0, 77, 0, len(data), into=views)
    wire = struct.pack(">IIQ", 0x67446698, 0, 77) + data + struct.pack(">IIQ", 0x67446698, 0, 78)
    events = []
    pos = 0
    while pos < len(wire):
        bufs = client.payload_buffers() if in_place else None
        if bufs:
            n = 0
            for b in bufs:
                take = min(len(b), piece - n, len(wire) - pos - n)
                b[:take] = wire[pos + n : pos + n + take]
                n += take
                if n == piece or pos + n == len(wire):
                    break
            client.payload_received(n)
        else:
            n = min(piece, len(wire) - pos)
            client.receive_data(wire[pos : pos + n])
        pos += n
        while (ev := client.next_event()) is not None:
            events.append(ev)
    assert events == [SimpleReply(77, 0), SimpleReply(78, 0)]
    if split:
        assert bytes(target[5000:]) == data[:5240]
        assert bytes(target[:5000]) == data[5240:]
    else:
        assert bytes(target) == data


def test_read_into_views_must_add_up() -> None:
    client, _ = connected()
    with pytest.raises(ValueError, match="add up"):
        client.request(0, 1, 0, 100, into=[memoryview(bytearray(99))])


# ------------------------------------------------------------ metadata contexts, block status

# NBD_OPT_{LIST,SET}_META_CONTEXT data: 32-bit export name length, name,
# 32-bit number of queries, each a 32-bit length and the query.
META_QUERY_DISK = (
    bytes.fromhex("00000004") + b"disk" + bytes.fromhex("00000001 0000000f") + (b"base:allocation")
)
META_QUERY_ALL = bytes.fromhex("00000000 00000000")  # default export, every context
META_QUERY_TWO = (
    bytes.fromhex("00000000 00000002 00000005")
    + b"base:"
    + bytes.fromhex("00000009")
    + b"qemu:dirt"
)
# NBD_REP_META_CONTEXT: 32-bit context id, then the name.
REP_META_BASE = bytes.fromhex("00000001") + b"base:allocation"
# NBD_REPLY_TYPE_BLOCK_STATUS: 32-bit context id, then (32-bit length, 32-bit flags) each.
BLOCK_STATUS_PAYLOAD = bytes.fromhex(
    "00000001  00010000 00000000  00100000 00000003  00000200 00000002"
)
EXTENTS = [(0x10000, 0), (0x100000, 3), (0x200, 2)]


@pytest.mark.parametrize(
    ("data", "export", "queries"),
    [
        pytest.param(META_QUERY_DISK, "disk", [BASE_ALLOCATION], id="disk-base-allocation"),
        pytest.param(META_QUERY_ALL, "", [], id="default-all"),
        pytest.param(META_QUERY_TWO, "", ["base:", "qemu:dirt"], id="two-queries"),
    ],
)
def test_meta_context_query_encodes_and_decodes(data: bytes, export: str, queries: list) -> None:
    assert encode_meta_context_query(export, queries) == data
    assert decode_meta_context_query(data) == (export, queries)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(7),
        u32(5) + b"disk" + u32(0),  # name overruns
        u32(0) + u32(1),  # one query announced, none there
        u32(0) + u32(1) + u32(20) + b"base:allocation",  # query overruns
        META_QUERY_DISK + b"x",  # trailing bytes
    ],
)
def test_malformed_meta_context_query_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_meta_context_query(data)


@pytest.mark.parametrize("optnum", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_meta_context_option_is_decoded_by_server(optnum: int) -> None:
    check_decode(server_in_options, opt(optnum, META_QUERY_DISK), [Option(optnum, META_QUERY_DISK)])
    assert opt(optnum, META_QUERY_DISK)[8:12] == u32(optnum)


@pytest.mark.parametrize("optnum", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_meta_context_replies_are_encoded_and_decoded(optnum: int) -> None:
    server = server_in_options()
    wire = server.option_reply(
        optnum, Rep.META_CONTEXT, encode_rep_meta_context(1, BASE_ALLOCATION)
    )
    wire += server.option_reply(optnum, Rep.ACK)
    assert wire == rep(optnum, 4, REP_META_BASE) + rep(optnum, 1)

    def make() -> ClientConnection:
        client = client_in_options()
        client.option(optnum, META_QUERY_DISK)
        return client

    check_decode(
        make,
        wire,
        [OptionReply(optnum, Rep.META_CONTEXT, REP_META_BASE), OptionReply(optnum, 1, b"")],
    )
    assert decode_rep_meta_context(REP_META_BASE) == (1, BASE_ALLOCATION)


@pytest.mark.parametrize("data", [b"", u32(1)])
def test_malformed_rep_meta_context_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_rep_meta_context(data)


def test_block_status_request_is_encoded_and_decoded() -> None:
    wire = req(CmdFlag.REQ_ONE, Cmd.BLOCK_STATUS, 7, 4096, 1 << 20)
    assert wire == bytes.fromhex("25609513 0008 0007 0000000000000007 0000000000001000 00100000")
    client, _ = connected(structured=True)
    assert client.request(Cmd.BLOCK_STATUS, 7, 4096, 1 << 20, CmdFlag.REQ_ONE) == wire
    check_decode(transmitting_server, wire, [Request(8, Cmd.BLOCK_STATUS, 7, 4096, 1 << 20)])


def test_block_status_payload_encodes_and_decodes() -> None:
    assert encode_block_status_payload(1, EXTENTS) == BLOCK_STATUS_PAYLOAD
    assert decode_block_status_payload(BLOCK_STATUS_PAYLOAD) == (1, EXTENTS)


@pytest.mark.parametrize(
    "payload",
    [b"", u32(1), u32(1) + u32(512), u32(1) + u32(0) + u32(0), BLOCK_STATUS_PAYLOAD + b"\0"],
    ids=["empty", "no-extent", "half-extent", "zero-length", "trailing"],
)
def test_malformed_block_status_payload_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_block_status_payload(payload)


def test_block_status_reply_is_one_final_chunk() -> None:
    _, server = connected(structured=True)
    wire = server.block_status_reply(7, 1, EXTENTS)
    assert wire == chunk(1, 5, 7, BLOCK_STATUS_PAYLOAD)

    def make() -> ClientConnection:
        c, _ = connected(structured=True)
        c.request(Cmd.BLOCK_STATUS, 7, 0, 0x110200)
        return c

    check_decode(make, wire, [StructuredChunk(1, ReplyType.BLOCK_STATUS, 7, BLOCK_STATUS_PAYLOAD)])


def test_block_status_reply_needs_structured_replies() -> None:
    _, server = connected()
    with pytest.raises(RuntimeError):
        server.block_status_reply(7, 1, EXTENTS)


def test_zero_length_read_with_structured_replies_is_a_none_chunk() -> None:
    _, server = connected(structured=True)
    assert server.read_data_header(3, 4096, 0) == chunk(1, 0, 3)
    _, simple_server = connected()
    assert simple_server.read_data_header(3, 4096, 0) == simple(0, 3)
