"""Waiting for an event, at most so long: the idiom of every loop that sleeps until woken."""

from __future__ import annotations

import asyncio


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
