"""The write interlock between foreground writes and a copier.

Rules (used by live migration's chunk copier and the mirror's resync, read
repair and verify):
- A writer enters the regions it touches; it waits while any of them is
  being copied.
- The copier claims one region at a time: new writers to it wait, and the
  claim returns once the writers already inside have left. So the copier
  reads a region no write is changing, and every write to it either landed
  before the copy read it or comes after the copy and goes to both sides.
- A claim is always released (in a finally): writers wait for that, never
  spin (a failed migration's copier releases its chunk as it stops).
"""

from __future__ import annotations

from collections import Counter

import trio


class RegionLock:
    def __init__(self) -> None:
        self.copying: dict[int, trio.Event] = {}
        self.writers: Counter[int] = Counter()
        self._left = trio.Event()

    async def enter(self, regions: range) -> None:
        """Wait until none of `regions` is being copied, then count in."""
        while True:
            busy = next((r for r in regions if r in self.copying), None)
            if busy is None:
                break
            await self.copying[busy].wait()
        for r in regions:
            self.writers[r] += 1

    def leave(self, regions: range) -> None:
        for r in regions:
            self.writers[r] -= 1
            if not self.writers[r]:
                del self.writers[r]
        self._left.set()
        self._left = trio.Event()

    async def claim(self, region: int) -> None:
        """Hold new writers off `region`; return once those inside are out.
        One claim per region at a time: a second claimant waits its turn."""
        while region in self.copying:
            await self.copying[region].wait()
        self.copying[region] = trio.Event()
        while self.writers.get(region):
            await self._left.wait()

    def release(self, region: int) -> None:
        ev = self.copying.pop(region, None)
        if ev is not None:
            ev.set()
