"""The control tree without FUSE, over a real Array: one local file node and
one node served over NBD by an in-process server, 800 sectors each (the
seed's example). Every file's content and format is checked against
DESIGN.md, and every bad write against its errno; a refused write must
change nothing (the rendered tree, the node objects and the state file)."""

from __future__ import annotations

import errno
import logging
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio
from helpers.procs import free_port

import dstfs.backends.registry
from dstfs import state
from dstfs.array import Array
from dstfs.backends.file import FileBackend
from dstfs.control import MAX_WRITE, Attr, ControlError, ControlTree, parse_number
from dstfs.nbd.server import Export, NbdServer

SECTORS = 800
NODE_BYTES = SECTORS * 512
NODE_FILES = {"type", "start", "size", "state", "stats", "timeout", "suspend", "migrate", "target"}
NODE_STATS = [
    "reads",
    "writes",
    "read_bytes",
    "write_bytes",
    "flushes",
    "errors",
    "reconnects",
    "failures",
    "latency_avg_us",
    "latency_max_us",
]
ARRAY_STATS = ["reads", "writes", "read_bytes", "write_bytes", "flushes", "errors"]


@attrs.define
class Ctl:
    tree: ControlTree
    array: Array
    tmp: Path
    local: Path
    port: int

    def read(self, *path: str) -> str:
        return self.tree.read(path)

    async def write(self, text: str, *path: str) -> None:
        await self.tree.write(path, text)

    def node_file(self, name: str) -> Path:
        path = self.tmp / name
        path.write_bytes(bytes(NODE_BYTES))
        return path


@pytest.fixture
async def ctl(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Ctl]:
    local = tmp_path / "local.img"
    local.write_bytes(bytes(NODE_BYTES))
    remote = tmp_path / "remote.img"
    remote.write_bytes(bytes(NODE_BYTES))
    server = NbdServer([Export("", FileBackend(str(remote)))])
    listeners = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    array = Array("storage", nursery, state_dir=tmp_path / "state")
    await array.add_node(f"file://{local}")
    await array.add_node(f"nbd://127.0.0.1:{port}")
    yield Ctl(ControlTree(array), array, tmp_path, local, port)
    await array.aclose()


def render(tree: ControlTree, skip_stats: bool = True) -> dict[str, str]:
    """path -> content of every readable file (stats left out: they count)."""
    out: dict[str, str] = {}

    def walk(node: dict, prefix: tuple[str, ...]) -> None:
        for name, child in node.items():
            path = (*prefix, name)
            if isinstance(child, dict):
                walk(child, path)
            elif child.show is not None and not (skip_stats and name == "stats"):
                out["/".join(path)] = child.show()

    walk(tree.tree(), ())
    return out


def snapshot(c: Ctl) -> tuple:
    saved = (c.tmp / "state" / "array.json").read_text()
    return render(c.tree), list(c.array.nodes), c.array.alg_name, saved


# -- content and format


async def test_root_files_show_name_alg_size_and_the_seed_nodes_line(ctl: Ctl) -> None:
    assert ctl.read("name") == "storage\n"
    assert ctl.read("alg") == "alg_linear\n"
    assert ctl.read("size") == "1600\n"
    assert ctl.read("nodes") == "sectors (start [size]): 0 [800] | 800 [800]\n"


async def test_tree_has_the_designed_files_and_node_dirs_named_by_start(ctl: Ctl) -> None:
    tree = ctl.tree.tree()
    assert set(tree) == {
        "name",
        "alg",
        "size",
        "nodes",
        "add_node",
        "remove_all_nodes",
        "stats",
        "jobs",
        "metrics",
        "n-0",
        "n-800",
    }
    assert set(tree["n-0"]) == set(tree["n-800"]) == NODE_FILES


async def test_modes_read_only_write_only_and_read_write(ctl: Ctl) -> None:
    tree = ctl.tree.tree()
    modes = {name: a.mode for name, a in tree.items() if isinstance(a, Attr)}
    assert modes == {
        "name": 0o444,
        "alg": 0o644,
        "size": 0o444,
        "nodes": 0o444,
        "add_node": 0o200,
        "remove_all_nodes": 0o200,
        "stats": 0o444,
        "jobs": 0o444,
        "metrics": 0o444,
    }
    node = {name: a.mode for name, a in tree["n-800"].items()}
    assert node == {
        "type": 0o444,
        "start": 0o444,
        "size": 0o444,
        "state": 0o444,
        "stats": 0o444,
        "timeout": 0o644,
        "suspend": 0o644,
        "migrate": 0o644,
        "target": 0o644,
    }


async def test_node_files_show_type_start_size_state(ctl: Ctl) -> None:
    assert ctl.read("n-0", "type") == f"L: {ctl.local}\n"
    assert ctl.read("n-800", "type") == f"R: 127.0.0.1:{ctl.port}\n"
    for d, start in (("n-0", 0), ("n-800", 800)):
        assert ctl.read(d, "start") == f"{start}\n"
        assert ctl.read(d, "size") == "800\n"
        assert ctl.read(d, "state") == "online\n"
        assert ctl.read(d, "suspend") == "0\n"
        assert ctl.read(d, "timeout") == "30\n"


def parse_stats(text: str) -> dict[str, float]:
    assert text.endswith("\n")
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z_]+) (\d+(?:\.\d+)?)", line)
        assert m, f"not a `key value` line: {line!r}"
        out[m[1]] = float(m[2])
    return out


async def test_stats_are_key_value_lines_that_count_io(ctl: Ctl) -> None:
    await ctl.array.write(NODE_BYTES - 512, b"x" * 1024)  # one sector on each node
    await ctl.array.read(0, 4096)
    await ctl.array.flush()
    root = parse_stats(ctl.read("stats"))
    assert list(root) == ARRAY_STATS
    assert root == {
        "reads": 1,
        "writes": 1,
        "read_bytes": 4096,
        "write_bytes": 1024,
        "flushes": 1,
        "errors": 0,
    }
    for d, reads in (("n-0", 1), ("n-800", 0)):
        s = parse_stats(ctl.read(d, "stats"))
        assert list(s) == NODE_STATS
        assert (s["reads"], s["writes"], s["write_bytes"], s["flushes"]) == (reads, 1, 512, 1)
        assert s["errors"] == s["reconnects"] == s["failures"] == 0
        assert s["latency_max_us"] >= s["latency_avg_us"] > 0


async def test_empty_array_shows_no_nodes(nursery: trio.Nursery) -> None:
    tree = ControlTree(Array("empty", nursery))
    assert tree.read(("size",)) == "0\n"
    assert tree.read(("nodes",)).rstrip() == "sectors (start [size]):"
    assert not [k for k in tree.tree() if k.startswith("n-")]


# -- good writes (a trailing newline is accepted)


async def test_add_node_appends_a_node_dir_and_persists(ctl: Ctl) -> None:
    extra = ctl.node_file("extra.img")
    await ctl.write(f"file://{extra},size=400\n", "add_node")
    assert ctl.read("nodes") == "sectors (start [size]): 0 [800] | 800 [800] | 1600 [400]\n"
    assert ctl.read("size") == "2000\n"
    assert ctl.read("n-1600", "type") == f"L: {extra}\n"
    saved = state.load(ctl.tmp / "state")
    assert saved is not None and saved.nodes[-1] == state.NodeEntry(uri=f"file://{extra},size=400")


async def test_add_node_accepts_a_plain_path_and_the_space_size_syntax(ctl: Ctl) -> None:
    extra = ctl.node_file("extra.img")
    await ctl.write(f"{extra} size=8", "add_node")
    assert ctl.read("n-1600", "size") == "8\n"


async def test_remove_all_nodes_then_change_alg_then_stripe_dirs_by_index(ctl: Ctl) -> None:
    await ctl.write("1\n", "remove_all_nodes")
    assert ctl.read("size") == "0\n"
    assert not [k for k in ctl.tree.tree() if k.startswith("n-")]
    await ctl.write("alg_stripe\n", "alg")
    assert ctl.read("alg") == "alg_stripe\n"
    for name in ("s0.img", "s1.img"):
        await ctl.write(f"file://{ctl.node_file(name)}\n", "add_node")
    assert ctl.read("nodes") == "sectors (start [size]): 0 [768] | 0 [768]\n"  # 64K chunks
    assert {"n-0", "n-1"} <= set(ctl.tree.tree())
    assert ctl.read("n-1", "start") == "0\n"
    saved = state.load(ctl.tmp / "state")
    assert saved is not None
    assert (saved.alg, saved.options, len(saved.nodes)) == ("alg_stripe", {"chunk": 65536}, 2)


async def test_suspend_and_resume_show_in_state(ctl: Ctl) -> None:
    await ctl.write("1\n", "n-800", "suspend")
    assert ctl.read("n-800", "suspend") == "1\n"
    assert ctl.read("n-800", "state") == "suspended\n"
    assert ctl.read("n-0", "state") == "online\n"
    await ctl.write("0", "n-800", "suspend")
    assert ctl.read("n-800", "state") == "online\n"


@pytest.mark.parametrize(
    ("text", "shown", "seconds"),
    [
        ("5\n", "5\n", 5),
        ("0", "0\n", 0),
        ("2.5", "2.5\n", 2.5),
        ("007", "7\n", 7),
        ("0.000001", "0.000001\n", 0.000001),
        ("31536000", "31536000\n", 31536000),  # a year: the largest
        ("31535999.999999", "31535999.999999\n", 31535999.999999),
    ],
)
async def test_timeout_takes_seconds_and_saves_them_with_the_node(
    ctl: Ctl, text: str, shown: str, seconds: float
) -> None:
    await ctl.write(text, "n-0", "timeout")
    assert ctl.read("n-0", "timeout") == shown
    assert ctl.array.nodes[0].timeout == seconds
    assert ctl.read("n-800", "timeout") == "30\n"
    saved = state.load(ctl.tmp / "state")
    assert saved is not None
    assert saved.nodes[0] == state.NodeEntry(uri=f"file://{ctl.local}", timeout=seconds)
    assert saved.nodes[1].timeout is None
    # What is shown can be written back unchanged.
    await ctl.write(shown, "n-0", "timeout")
    assert ctl.read("n-0", "timeout") == shown


BAD_NUMBERS = [
    "-0",
    "-1",
    "+5",
    "\u0663",  # ARABIC-INDIC DIGIT THREE: int() and float() take it
    "\uff15",  # FULLWIDTH DIGIT FIVE
    "1e3",
    "1E3",
    "inf",
    "Infinity",
    "nan",
    "-nan",
    str(2**64 + 1),
    "9" * 4000,
    "31536000.000001",  # a year and a microsecond
    "31536001",
    "1_000",
    "0x10",
    "1.",
    ".5",
    "1.2.3",
    "1.0000001",  # seven decimals
    "5 s",
    "",
]


@pytest.mark.parametrize("text", BAD_NUMBERS)
async def test_timeout_takes_only_ascii_decimal_in_range(ctl: Ctl, text: str) -> None:
    await ctl.write("7", "n-0", "timeout")
    before = snapshot(ctl)
    with pytest.raises(ControlError) as e:
        await ctl.write(text, "n-0", "timeout")
    assert e.value.errno == errno.EINVAL, e.value.message
    assert ctl.read("n-0", "timeout") == "7\n"
    assert ctl.array.nodes[0].timeout == 7
    assert snapshot(ctl) == before


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0), ("12", 12), ("3.25", 3.25), ("0010.50", 10.5)]
)
def test_parse_number_reads_ascii_decimal(text: str, value: float) -> None:
    assert parse_number(text, "x", 100) == value


@pytest.mark.parametrize("text", ["3.5", "101", "-0", "\u0663"])
def test_parse_number_of_a_whole_number_refuses_fractions_and_range(text: str) -> None:
    with pytest.raises(ControlError) as e:
        parse_number(text, "count", 100, fraction=False)
    assert e.value.errno == errno.EINVAL and "count" in e.value.message


async def test_a_timeout_that_cannot_be_saved_is_not_set(ctl: Ctl) -> None:
    # The tests run as root, who ignores modes: a file where the dir was.
    shutil.rmtree(ctl.tmp / "state")
    (ctl.tmp / "state").write_text("in the way\n")
    with pytest.raises(ControlError):
        await ctl.write("9", "n-0", "timeout")
    assert ctl.read("n-0", "timeout") == "30\n"
    assert ctl.array.nodes[0].timeout == 30
    assert ctl.array.entries[0].timeout is None


# -- bad writes: the right errno, and nothing changes

BAD = [
    ("alg", "garbage", errno.EINVAL),
    ("alg", "alg_raid5", errno.EINVAL),  # not an algorithm
    ("alg", "linear", errno.EINVAL),
    ("alg", "alg_stripe", errno.EBUSY),  # nodes exist
    ("alg", "", errno.EINVAL),
    ("alg", "\n", errno.EINVAL),
    ("alg", "alg_stripe\nalg_linear\n", errno.EINVAL),
    ("alg", "alg_stripe\n\n", errno.EINVAL),
    ("alg", "alg_stripe\x00", errno.EINVAL),
    ("alg", "x" * (MAX_WRITE + 1), errno.EINVAL),
    ("add_node", "nbd://", errno.EINVAL),
    ("add_node", "bogus://host/x", errno.EINVAL),
    ("add_node", "nbd://127.0.0.1:0", errno.EINVAL),
    ("add_node", "nbd://127.0.0.1:1/x,size=-1", errno.EINVAL),
    ("add_node", "nbd://127.0.0.1:1\nnbd://127.0.0.1:2", errno.EINVAL),
    ("add_node", "UNREACHABLE", errno.ECONNREFUSED),
    ("add_node", "file:///no/such/dstfs/node.img", errno.ENOENT),
    ("remove_all_nodes", "0", errno.EINVAL),
    ("remove_all_nodes", "2", errno.EINVAL),
    ("remove_all_nodes", "yes", errno.EINVAL),
    ("remove_all_nodes", "", errno.EINVAL),
    ("remove_all_nodes", "1\n1\n", errno.EINVAL),
    ("n-0/suspend", "2", errno.EINVAL),
    ("n-0/suspend", "on", errno.EINVAL),
    ("n-0/timeout", "abc", errno.EINVAL),
    ("n-0/timeout", "-1", errno.EINVAL),
    ("n-0/timeout", "nan", errno.EINVAL),
    ("n-0/timeout", "inf", errno.EINVAL),
    ("name", "other", errno.EACCES),
    ("size", "1", errno.EACCES),
    ("nodes", "x", errno.EACCES),
    ("stats", "0", errno.EACCES),
    ("n-0/type", "L: /x", errno.EACCES),
    ("n-0/start", "8", errno.EACCES),
    ("n-0/size", "8", errno.EACCES),
    ("n-0/state", "online", errno.EACCES),
    ("n-0/stats", "0", errno.EACCES),
    ("nope", "1", errno.ENOENT),
    ("n-5/suspend", "1", errno.ENOENT),
    ("n-0", "1", errno.ENOENT),  # a directory
]


@pytest.mark.parametrize(("path", "text", "err"), BAD)
async def test_bad_write_gets_its_errno_and_changes_nothing(
    ctl: Ctl, path: str, text: str, err: int
) -> None:
    text = text.replace("UNREACHABLE", f"nbd://127.0.0.1:{free_port()}")
    before = snapshot(ctl)
    with pytest.raises(ControlError) as e:
        await ctl.write(text, *path.split("/"))
    assert e.value.errno == err, e.value.message
    assert e.value.message
    assert snapshot(ctl) == before


async def test_add_node_of_a_server_that_never_answers_is_etimedout(
    ctl: Ctl, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel accepts the connection, the server never speaks: the write
    ends with ETIMEDOUT after the open timeout, and nothing changes."""
    monkeypatch.setattr(dstfs.backends.registry, "OPEN_TIMEOUT", 0.5)
    with trio.socket.socket() as silent:
        await silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        before = snapshot(ctl)
        with trio.fail_after(30), pytest.raises(ControlError) as e:
            await ctl.write(f"nbd://127.0.0.1:{port}\n", "add_node")
    assert e.value.errno == errno.ETIMEDOUT, e.value.message
    assert snapshot(ctl) == before


async def test_remove_all_nodes_while_disk_is_open_is_ebusy(ctl: Ctl) -> None:
    ctl.array.open_count = 1
    before = snapshot(ctl)
    with pytest.raises(ControlError) as e:
        await ctl.write("1\n", "remove_all_nodes")
    assert e.value.errno == errno.EBUSY
    assert snapshot(ctl) == before
    ctl.array.open_count = 0


@pytest.mark.parametrize("path", ["add_node", "remove_all_nodes"])
async def test_write_only_files_refuse_reads(ctl: Ctl, path: str) -> None:
    with pytest.raises(ControlError) as e:
        ctl.read(path)
    assert e.value.errno == errno.EACCES


@pytest.mark.parametrize("path", ["nope", "n-0/nope", "n-9/type", "n-0"])
async def test_reading_what_is_no_file_is_enoent(ctl: Ctl, path: str) -> None:
    with pytest.raises(ControlError) as e:
        ctl.read(*path.split("/"))
    assert e.value.errno == errno.ENOENT


async def test_a_refused_write_is_logged_with_its_reason(
    ctl: Ctl, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="dstfs.control"), pytest.raises(ControlError):
        await ctl.write("garbage\n", "alg")
    assert "unknown algorithm 'garbage'" in caplog.text


def test_a_state_file_without_timeouts_loads_with_the_default(tmp_path: Path) -> None:
    # Written before nodes had a saved timeout: still version 1.
    (tmp_path / "array.json").write_text(
        '{"version": 1, "name": "old", "alg": "alg_linear", "options": {},'
        ' "nodes": [{"uri": "file:///x.img"}, {"serve": "/y.img", "size": 8}]}'
    )
    saved = state.load(tmp_path)
    assert saved is not None
    assert [n.timeout for n in saved.nodes] == [None, None]


@pytest.mark.parametrize("timeout", ["-1", "1e300", "true", '"5"', "31536001"])
def test_a_state_file_with_a_bad_timeout_is_refused(tmp_path: Path, timeout: str) -> None:
    (tmp_path / "array.json").write_text(
        '{"version": 1, "name": "s", "alg": "alg_linear", "options": {},'
        f' "nodes": [{{"uri": "file:///x.img", "timeout": {timeout}}}]}}'
    )
    with pytest.raises(ValueError, match="not a dstfs state file"):
        state.load(tmp_path)
