"""Background jobs of an array: migrations, resyncs, verify, the bitmap
cleaner.

Rules:
- A job runs in the array's nursery under its own cancel scope, is listed
  while it runs (the `jobs` control file), and is cancelled when the array
  closes (umount), before the final flush.
- Nothing escapes a job: an exception is logged with the job's name and the
  job ends; an escaped error would otherwise end the daemon's nursery and
  unmount the array.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import attrs
import trio

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class Job:
    name: str
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    started: float = attrs.Factory(time.monotonic)

    def cancel(self) -> None:
        self.scope.cancel()


class Jobs:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.running: list[Job] = []

    def start(self, name: str, fn: Callable[[], Awaitable[object]]) -> Job:
        job = Job(name)
        self.running.append(job)
        self.nursery.start_soon(self._run, job, fn)
        return job

    async def _run(self, job: Job, fn: Callable[[], Awaitable[object]]) -> None:
        try:
            with job.scope:
                await fn()
        except Exception:
            log.exception("%s: job crashed", job.name)
        finally:
            self.running.remove(job)

    def cancel_all(self) -> None:
        for job in self.running:
            job.cancel()

    def render(self) -> str:
        now = time.monotonic()
        return "".join(f"{j.name} {now - j.started:.0f}s\n" for j in self.running)
