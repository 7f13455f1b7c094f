"""`wait_at_most`: the wait of every loop that sleeps until woken or until its next tick."""

from __future__ import annotations

import asyncio
import time

from jobgate.waits import wait_at_most


async def test_an_event_already_set_ends_the_wait_at_once() -> None:
    event = asyncio.Event()
    event.set()
    started = time.monotonic()
    assert await wait_at_most(event, 10) is True
    assert time.monotonic() - started < 1


async def test_an_event_set_while_waiting_ends_the_wait() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, event.set)
    started = time.monotonic()
    assert await wait_at_most(event, 10) is True
    assert time.monotonic() - started < 5


async def test_the_wait_ends_unset_after_its_time() -> None:
    event = asyncio.Event()
    started = time.monotonic()
    assert await wait_at_most(event, 0.1) is False
    assert time.monotonic() - started >= 0.09
    assert await wait_at_most(event, 0) is False


async def test_a_cancellation_that_lands_as_the_event_is_set_is_not_lost() -> None:
    # The case `asyncio.wait_for` gets wrong on Python 3.11: the loop below would go on.
    event = asyncio.Event()
    rounds = 0

    async def loop_until_cancelled() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            await wait_at_most(event, 60)

    waiter = asyncio.create_task(loop_until_cancelled())
    await asyncio.sleep(0.01)  # the task now waits on the event
    event.set()
    waiter.cancel()
    done, _ = await asyncio.wait({waiter}, timeout=5)
    assert waiter in done, "the cancelled loop went on waiting"
    assert waiter.cancelled()
    assert rounds == 1
