"""Small trio helpers for the in-process tests."""

from __future__ import annotations

from collections.abc import Callable

import trio


async def poll(pred: Callable[[], object], timeout: float = 20.0) -> None:
    """Wait until `pred()` is true (checked every 5 ms); TooSlowError after
    `timeout` s, a deadline generous enough for a busy machine."""
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.005)
