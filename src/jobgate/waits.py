"""Waiting at most so long: for an event (every loop that sleeps until woken), for a
task to end, or for one step of a shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def wait_at_most(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set, at most `seconds`; return whether it was set.

    Under `asyncio.timeout`, not `asyncio.wait_for`: on Python 3.11 `wait_for` swallows a
    cancellation that lands just as the event ends the wait, so a loop being stopped
    went on and whoever awaited it waited forever. `wait_for` also wraps the wait in a
    task of its own, two more event-loop turns for each wake-up.
    """
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def end_task(task: asyncio.Task[Any], within_s: float) -> BaseException | None:
    """Let `task` end by itself within `within_s`, else cancel it and wait as long again
    (a loop stuck on a store that never answers, as in a partition, must not hold up a
    stop). Returns what the task raised, if it ended by raising (not by a cancel)."""
    done, _ = await asyncio.wait([task], timeout=within_s)
    if not done:
        task.cancel()
        await asyncio.wait([task], timeout=within_s)
    if task.done() and not task.cancelled():
        return task.exception()
    return None


async def finish_within(step: Awaitable[None], within_s: float) -> bool:
    """Await `step` for at most `within_s`, cancelling it past that; whether it finished."""
    try:
        async with asyncio.timeout(within_s):
            await step
    except TimeoutError:
        return False
    return True
