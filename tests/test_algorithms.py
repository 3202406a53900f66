"""alg_linear and alg_stripe as pure maps: tables of extents for chosen
ranges (node boundaries, chunk boundaries, the last byte, empty ranges),
construction rules (sector multiples, stripe chunk a power of two >= 4096,
default 64 KiB, stripe size = N x smallest node rounded down to a chunk),
and hypothesis properties: for random node sizes and ranges the extents
cover the range exactly once, in order, inside each node's used bytes, and
agree with brute-force sector-by-sector (linear) or chunk-by-chunk (stripe)
models of the layout."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dstfs.algorithms import DEFAULT_CHUNK, Extent, Linear, Stripe, make_algorithm

S = 512
K = 4096


def E(node: int, node_offset: int, length: int, *segments: tuple[int, int]) -> Extent:
    return Extent(node, node_offset, length, tuple(segments))


# -- alg_linear

LIN = [800 * S, 800 * S, 1600 * S]  # starts at sectors 0, 800, 1600; 3200 sectors
B1, B2, END = 800 * S, 1600 * S, 3200 * S

LINEAR_TABLE = [
    pytest.param(0, 512, [E(0, 0, 512, (0, 512))], id="first-sector"),
    pytest.param(0, 0, [], id="empty-at-0"),
    pytest.param(B1, 0, [], id="empty-at-boundary"),
    pytest.param(END, 0, [], id="empty-at-end"),
    pytest.param(B1 - 512, 512, [E(0, B1 - 512, 512, (0, 512))], id="last-sector-of-node-0"),
    pytest.param(B1, 512, [E(1, 0, 512, (0, 512))], id="first-sector-of-node-1"),
    pytest.param(
        B1 - 512, 1024, [E(0, B1 - 512, 512, (0, 512)), E(1, 0, 512, (512, 512))], id="cross-0-1"
    ),
    pytest.param(B1 - 1, 2, [E(0, B1 - 1, 1, (0, 1)), E(1, 0, 1, (1, 1))], id="cross-unaligned"),
    pytest.param(
        B1 - 10,
        B1 + 20,
        [E(0, B1 - 10, 10, (0, 10)), E(1, 0, B1, (10, B1)), E(2, 0, 10, (B1 + 10, 10))],
        id="spans-all-of-node-1",
    ),
    pytest.param(
        0,
        END,
        [E(0, 0, B1, (0, B1)), E(1, 0, B1, (B1, B1)), E(2, 0, 2 * B1, (B2, 2 * B1))],
        id="whole-disk",
    ),
    pytest.param(B2 + 12345, 1000, [E(2, 12345, 1000, (0, 1000))], id="inside-node-2"),
    pytest.param(END - 1, 1, [E(2, 2 * B1 - 1, 1, (0, 1))], id="last-byte"),
]


@pytest.mark.parametrize(("offset", "length", "extents"), LINEAR_TABLE)
def test_linear_map_table(offset: int, length: int, extents: list[Extent]) -> None:
    assert Linear(LIN).map(offset, length) == extents
    assert Linear(LIN).map(offset, length, write=True) == extents


def test_linear_layout_is_the_seed_concatenation() -> None:
    alg = Linear(LIN)
    assert alg.name == "alg_linear" and not alg.named_by_index
    assert alg.size == END
    assert alg.node_ranges() == [(0, 800), (800, 800), (1600, 1600)]
    assert [alg.used_bytes(i) for i in range(3)] == LIN
    assert alg.options() == {}


def test_linear_without_nodes_is_an_empty_disk() -> None:
    alg = Linear([])
    assert (alg.size, alg.node_ranges(), alg.map(0, 0)) == (0, [], [])
    with pytest.raises(ValueError):
        alg.map(0, 1)


@pytest.mark.parametrize("sizes", [[0], [-512], [1000], [512, 513], [S, 0]])
def test_linear_refuses_sizes_that_are_not_positive_sector_multiples(sizes: list[int]) -> None:
    with pytest.raises(ValueError, match="multiple of 512"):
        Linear(sizes)


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, END + 1), (END, 1), (0, -1)])
def test_linear_map_refuses_ranges_outside_the_disk(offset: int, length: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        Linear(LIN).map(offset, length)


# -- alg_stripe

# chunk 4 KiB over 3 nodes; the smallest (node 1) holds 4 chunks, so each
# node contributes 4 chunks: chunk k is on node k % 3 at row k // 3.
STR = [5 * K + 100, 4 * K, 6 * K]
STR_END = 12 * K

STRIPE_TABLE = [
    pytest.param(0, K, [E(0, 0, K, (0, K))], id="chunk-0"),
    pytest.param(K, K, [E(1, 0, K, (0, K))], id="chunk-1"),
    pytest.param(2 * K, K, [E(2, 0, K, (0, K))], id="chunk-2"),
    pytest.param(3 * K, K, [E(0, K, K, (0, K))], id="chunk-3-row-1"),
    pytest.param(0, 0, [], id="empty"),
    pytest.param(STR_END, 0, [], id="empty-at-end"),
    pytest.param(4000, 200, [E(0, 4000, 96, (0, 96)), E(1, 0, 104, (96, 104))], id="cross-chunk"),
    pytest.param(
        0,
        6 * K,
        [
            E(0, 0, 2 * K, (0, K), (3 * K, K)),
            E(1, 0, 2 * K, (K, K), (4 * K, K)),
            E(2, 0, 2 * K, (2 * K, K), (5 * K, K)),
        ],
        id="two-rows-one-extent-per-node",
    ),
    pytest.param(
        2 * K + 10,
        3 * K,
        [
            E(2, 10, K, (0, K - 10), (3 * K - 10, 10)),
            E(0, K, K, (K - 10, K)),
            E(1, K, K, (2 * K - 10, K)),
        ],
        id="unaligned-start-node-2-first",
    ),
    pytest.param(STR_END - 1, 1, [E(2, 4 * K - 1, 1, (0, 1))], id="last-byte"),
]


@pytest.mark.parametrize(("offset", "length", "extents"), STRIPE_TABLE)
def test_stripe_map_table(offset: int, length: int, extents: list[Extent]) -> None:
    alg = Stripe(STR, chunk=K)
    assert alg.map(offset, length) == extents
    assert alg.map(offset, length, write=True) == extents


def test_stripe_one_node_keeps_chunks_as_segments_of_one_extent() -> None:
    assert Stripe([4 * K], chunk=K).map(0, 3 * K) == [E(0, 0, 3 * K, (0, K), (K, K), (2 * K, K))]


def test_stripe_size_is_n_times_the_smallest_node_rounded_down_to_a_chunk() -> None:
    c = DEFAULT_CHUNK
    alg = Stripe([3 * c + 1000, 5 * c])
    assert alg.size == 2 * 3 * c
    assert alg.node_ranges() == [(0, 3 * c // S), (0, 3 * c // S)]
    assert alg.used_bytes(0) == alg.used_bytes(1) == 3 * c
    assert Stripe(STR, chunk=K).size == STR_END


def test_stripe_default_chunk_is_64k_and_persisted_in_options() -> None:
    alg = Stripe([1 << 20, 1 << 20])
    assert alg.chunk == DEFAULT_CHUNK == 64 * 1024
    assert alg.options() == {"chunk": 64 * 1024}
    assert alg.name == "alg_stripe" and alg.named_by_index


def test_stripe_without_nodes_is_an_empty_disk() -> None:
    alg = Stripe([])
    assert (alg.size, alg.node_ranges(), alg.map(0, 0)) == (0, [], [])


@pytest.mark.parametrize("chunk", [4096, 8192, 65536, 1 << 20])
def test_stripe_accepts_powers_of_two_from_4096(chunk: int) -> None:
    assert Stripe([2 * chunk], chunk=chunk).chunk == chunk


@pytest.mark.parametrize("chunk", [0, -4096, 512, 2048, 4095, 4097, 6144, 12288, 65535])
def test_stripe_refuses_a_chunk_that_is_not_a_power_of_two_from_4096(chunk: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        Stripe([1 << 20], chunk=chunk)


@pytest.mark.parametrize("sizes", [[K - 1], [8 * K, K - 1], [8 * K, 0], [-K]])
def test_stripe_refuses_a_node_smaller_than_a_chunk(sizes: list[int]) -> None:
    with pytest.raises(ValueError):
        Stripe(sizes, chunk=K)


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, STR_END + 1), (STR_END, 1)])
def test_stripe_map_refuses_ranges_outside_the_disk(offset: int, length: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        Stripe(STR, chunk=K).map(offset, length)


# -- make_algorithm


def test_make_algorithm_builds_by_control_tree_name() -> None:
    assert isinstance(make_algorithm("alg_linear", [S]), Linear)
    stripe = make_algorithm("alg_stripe", [2 * K], chunk=K)
    assert isinstance(stripe, Stripe) and stripe.chunk == K


def test_make_algorithm_refuses_unknown_names_listing_the_known_ones() -> None:
    known = r"alg_linear, alg_mirror, alg_stripe"
    with pytest.raises(ValueError, match=rf"unknown algorithm 'linear'.*{known}"):
        make_algorithm("linear", [])


def test_make_algorithm_refuses_options_the_algorithm_has_not() -> None:
    with pytest.raises(TypeError):
        make_algorithm("alg_linear", [S], chunk=K)


# -- properties


def runs(extents: list[Extent]) -> list[tuple[int, int, int, int]]:
    """(buffer offset, node, node offset, length) runs, merged where both
    sides are contiguous, sorted by buffer offset."""
    out = []
    for e in extents:
        pos = e.node_offset
        for boff, blen in e.segments:
            out.append((boff, e.node, pos, blen))
            pos += blen
    return merge(sorted(out))


def merge(items: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    out: list[tuple[int, int, int, int]] = []
    for b, n, o, ln in items:
        if (
            out
            and out[-1][0] + out[-1][3] == b
            and out[-1][1] == n
            and out[-1][2] + out[-1][3] == o
        ):
            pb, pn, po, pl = out.pop()
            out.append((pb, pn, po, pl + ln))
        else:
            out.append((b, n, o, ln))
    return out


def check_cover(alg: Linear | Stripe, sizes: list[int], offset: int, length: int) -> None:
    extents = alg.map(offset, length)
    pieces = sorted((b, n) for e in extents for b, n in e.segments)
    pos = 0
    for b, n in pieces:
        assert b == pos and n > 0, "segments must tile the buffer with no gap or overlap"
        pos += n
    assert pos == length
    for e in extents:
        assert e.length == sum(n for _, n in e.segments) > 0
        assert [b for b, _ in e.segments] == sorted(b for b, _ in e.segments)
        assert e.node_offset >= 0
        assert e.node_offset + e.length <= alg.used_bytes(e.node) <= sizes[e.node]
    firsts = [e.segments[0][0] for e in extents]
    assert firsts == sorted(firsts), "extents come in the order of their first byte"
    assert len({e.node for e in extents}) == len(extents), "at most one extent per node"


@st.composite
def linear_case(draw: st.DrawFn) -> tuple[list[int], int, int]:
    sizes = draw(st.lists(st.integers(1, 64), min_size=1, max_size=6))
    total = sum(sizes) * S
    offset = draw(st.integers(0, total))
    return [s * S for s in sizes], offset, draw(st.integers(0, total - offset))


@given(linear_case())
def test_linear_extents_cover_the_range_once_in_node_order(case) -> None:
    sizes, offset, length = case
    alg = Linear(sizes)
    check_cover(alg, sizes, offset, length)
    nodes = [e.node for e in alg.map(offset, length)]
    assert all(b == a + 1 for a, b in itertools.pairwise(nodes)), "consecutive nodes, in order"


@given(linear_case())
def test_linear_map_equals_a_sector_by_sector_model(case) -> None:
    sizes, offset, length = case
    model = [(i, k) for i, size in enumerate(sizes) for k in range(size // S)]
    expected: list[Extent] = []
    pos, end = offset, offset + length
    while pos < end:
        n = min(end, (pos // S + 1) * S) - pos
        node, sector = model[pos // S]
        node_off = sector * S + pos % S
        last = expected[-1] if expected else None
        if last is not None and last.node == node and last.node_offset + last.length == node_off:
            expected[-1] = E(
                node, last.node_offset, last.length + n, (last.segments[0][0], last.length + n)
            )
        else:
            expected.append(E(node, node_off, n, (pos - offset, n)))
        pos += n
    assert Linear(sizes).map(offset, length) == expected


@st.composite
def stripe_case(draw: st.DrawFn) -> tuple[int, list[int], int, int]:
    chunk = draw(st.sampled_from([4096, 8192, 16384]))
    sizes = draw(st.lists(st.integers(chunk, 6 * chunk + 1000), min_size=1, max_size=5))
    total = len(sizes) * (min(sizes) // chunk * chunk)
    offset = draw(st.integers(0, total))
    return chunk, sizes, offset, draw(st.integers(0, total - offset))


@given(stripe_case())
def test_stripe_extents_cover_the_range_once_contiguous_per_node(case) -> None:
    chunk, sizes, offset, length = case
    alg = Stripe(sizes, chunk=chunk)
    assert alg.size == len(sizes) * (min(sizes) // chunk * chunk)
    check_cover(alg, sizes, offset, length)


@given(stripe_case())
def test_stripe_map_equals_a_chunk_by_chunk_model(case) -> None:
    chunk, sizes, offset, length = case
    n = len(sizes)
    model = []
    pos, end = offset, offset + length
    while pos < end:
        k, within = divmod(pos, chunk)
        take = min(chunk - within, end - pos)
        model.append((pos - offset, k % n, (k // n) * chunk + within, take))
        pos += take
    assert runs(Stripe(sizes, chunk=chunk).map(offset, length)) == merge(model)
