"""The offset pattern node images are filled with: every 8-byte
little-endian word holds TAG << 48 | its own byte offset, so any byte read
back names the node it came from and where on that node it was."""

from __future__ import annotations

import struct


def word_pattern(tag: int, offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of node `tag`'s pattern."""
    first, last = offset // 8, (offset + length + 7) // 8
    words = struct.pack(f"<{last - first}Q", *((tag << 48) | (8 * i) for i in range(first, last)))
    return words[offset - 8 * first :][:length]
