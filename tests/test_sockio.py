"""SocketIO over its transport, on a socketpair: what is queued arrives in
order, file slices with sendfile(2) or, for a transport without it (TLS),
read and sent as bytes, zeroes past the end of a short file."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from dstfs.iotypes import FileSlice
from dstfs.nbd.sockio import SocketIO
from dstfs.nbd.transport import SocketTransport


class NoSendfile(SocketTransport):
    can_sendfile = False

    def sendfile(self, fd: int, offset: int, count: int) -> int:
        raise AssertionError("sendfile on a transport that cannot")


@pytest.mark.parametrize("transport", [SocketTransport, NoSendfile])
async def test_queued_buffers_and_file_slices_arrive_in_order(
    tmp_path: Path, transport: type[SocketTransport]
) -> None:
    content = os.urandom(700 * 1024)
    path = tmp_path / "f"
    path.write_bytes(content)
    a, b = socket.socketpair()
    fd = os.open(path, os.O_RDONLY)
    io = SocketIO(transport(a), "pair")
    peer = SocketIO(SocketTransport(b), "peer")
    try:
        expected = (
            b"head"
            + content[1000 : 1000 + 600 * 1024]
            + b"mid"
            + content[-100:]
            + bytes(5000)  # past the end of the file: zeroes
            + b"tail"
        )
        got = bytearray()
        done = trio.Event()

        async def receive() -> None:
            buf = memoryview(bytearray(65536))
            while len(got) < len(expected):
                n = await peer.recv_into(buf)
                assert n
                got.extend(buf[:n])
            done.set()

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                nursery.start_soon(io.run_sender)
                io.send_soon(b"head", FileSlice(fd, 1000, 600 * 1024), b"mid")
                io.send_soon(FileSlice(fd, len(content) - 100, 5100), b"tail")
                await done.wait()
                io.close()  # ends the sender
        assert bytes(got) == expected
        assert io.broken == "closed"
    finally:
        os.close(fd)
        peer.close()


async def test_send_soon_after_the_parked_sender_was_cancelled() -> None:
    """The sender parks when nothing is queued; cancelled there, a send_soon
    before it ran again must not reschedule it a second time (that crashed
    the whole server when a client's DISC ended its session while a FLUSH
    reply was being queued)."""
    a, b = socket.socketpair()
    io = SocketIO(SocketTransport(a), "pair")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(io.run_sender)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
            io.send_soon(b"late")  # before the sender has run again
        assert io.queued == 4  # queued, not sent, and nothing crashed
    finally:
        io.close()
        b.close()


async def test_send_now_keeps_the_order_when_the_kernel_takes_a_prefix() -> None:
    """send_now sends from the caller's task when the line is free; what the
    kernel does not take at once goes to the sender ahead of later sends,
    and a send while bytes are still queued queues behind them."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    io = SocketIO(SocketTransport(a), "pair")
    peer = SocketIO(SocketTransport(b), "peer")
    big = os.urandom(3 << 20)  # far more than the socket buffer holds
    expected = b"first" + big + b"second" + b"third"
    got = bytearray()
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(io.run_sender)
                await trio.testing.wait_all_tasks_blocked()
                io.send_now(b"first", big)
                assert io.queued > 0  # the kernel took a prefix; the rest waits
                io.send_now(b"second")  # behind the rest, not ahead of it
                io.send_soon(b"third")
                buf = memoryview(bytearray(65536))
                while len(got) < len(expected):
                    n = await peer.recv_into(buf)
                    assert n
                    got.extend(buf[:n])
                io.close()
        assert bytes(got) == expected
    finally:
        io.close()
        peer.close()


async def test_send_now_batches_a_burst_behind_the_first() -> None:
    """The first send on a free line goes at once; those made in the same
    scheduler round queue for the sender's one sendmsg (a burst of requests
    from one decode must not cost a system call each)."""
    a, b = socket.socketpair()
    io = SocketIO(SocketTransport(a), "pair")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(io.run_sender)
            await trio.testing.wait_all_tasks_blocked()
            io.send_now(b"one")
            assert io.queued == 0  # sent from this task
            io.send_now(b"two")
            io.send_now(b"three")
            assert io.queued == 8  # queued behind it, for one send
            await trio.testing.wait_all_tasks_blocked()
            assert io.queued == 0
            assert b.recv(100) == b"onetwothree"
            io.send_now(b"four")  # the burst is over: at once again
            assert io.queued == 0
            assert b.recv(100) == b"four"
            io.close()
    finally:
        io.close()
        b.close()
