"""dstfs.sparse.runs: which parts of a buffer are zeroes, in granules."""

from __future__ import annotations

import pytest

from dstfs.sparse import runs

G = 4


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", []),
        (b"\0" * 12, [(0, 12, True)]),
        (b"x" * 12, [(0, 12, False)]),
        (b"\0" * 4 + b"x" + b"\0" * 7, [(0, 4, True), (4, 4, False), (8, 4, True)]),
        (b"x" + b"\0" * 10 + b"y", [(0, 4, False), (4, 4, True), (8, 4, False)]),
        (b"\0" * 8 + b"ab", [(0, 8, True), (8, 2, False)]),  # a short last granule
        (b"\0" * 9 + b"z", [(0, 8, True), (8, 2, False)]),
    ],
)
def test_runs_cover_the_buffer_with_zero_and_data_runs(
    data: bytes, expected: list[tuple[int, int, bool]]
) -> None:
    for kind in (bytes, bytearray, memoryview):
        assert runs(kind(data), G) == expected
