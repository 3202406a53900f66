"""For unit tests on trio's MockClock (`autojump_clock`): a bound on virtual
time, and a task whose end the test can wait for and inspect."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import trio


def bounded(test):  # type: ignore[no-untyped-def]
    """Fail a test after an hour of virtual time: a bug that makes a wait
    endless would otherwise spin the autojump clock for ever."""

    @functools.wraps(test)
    async def run(*args: object, **kw: object) -> None:
        with trio.fail_after(3600):
            await test(*args, **kw)

    return run


class Task:
    """Run `fn` in `nursery`; remember its result or OSError and when it ended."""

    def __init__(
        self, nursery: trio.Nursery, fn: Callable[..., Awaitable[object]], *args: object
    ) -> None:
        self.done = trio.Event()
        self.result: object = None
        self.error: OSError | None = None
        self.ended: float | None = None
        nursery.start_soon(self._run, fn, args)

    async def _run(self, fn: Callable[..., Awaitable[object]], args: tuple[object, ...]) -> None:
        try:
            self.result = await fn(*args)
        except OSError as e:
            self.error = e
        finally:
            self.ended = trio.current_time()
            self.done.set()
