"""dstfs.malloc: freed 1 MiB request buffers are reused, not faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Requests in flight, as a loop device keeps them: 16 buffers of 1 MiB
# allocated, then all freed, again and again. Count the page faults.
_PROBE = """
import resource, sys
from dstfs.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def burst():
    bufs = [bytearray(1 << 20) for _ in range(16)]
    del bufs
burst(); burst()  # let the heap reach its working size
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    burst()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True
    )
    return int(out.stdout)


def test_freed_buffers_are_not_faulted_in_again() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    kept = _faults("keep")
    default = _faults("default")
    # 320 MiB churned: glibc's default gives the heap top back and faults
    # it in again (up to 81920 faults); with the settings pages are reused.
    assert kept < 1000, kept
    assert default > 10 * max(kept, 100), (default, kept)
