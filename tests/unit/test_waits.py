"""`waits`: the wait of every loop that sleeps until woken, and the bounded steps of a stop."""

from __future__ import annotations

import asyncio
import time

from jobgate.waits import end_task, finish_within, wait_at_most


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


async def test_end_task_lets_a_task_finish_then_cancels_one_that_does_not() -> None:
    """A loop that ends by itself ends; one stuck (a store that never answers) is
    cancelled after the wait; a failure is handed back, a cancel is not."""
    finishing = asyncio.create_task(asyncio.sleep(0.01, "done"))
    assert await end_task(finishing, 1.0) is None
    assert finishing.result() == "done"

    stuck = asyncio.create_task(asyncio.Event().wait())
    started = time.monotonic()
    assert await end_task(stuck, 0.05) is None
    assert stuck.cancelled()
    assert time.monotonic() - started < 1.0

    async def fail() -> None:
        raise RuntimeError("broken")

    failed = await end_task(asyncio.create_task(fail()), 1.0)
    assert isinstance(failed, RuntimeError)


async def test_finish_within_tells_whether_a_step_finished_in_time() -> None:
    assert await finish_within(asyncio.sleep(0.01), 1.0)
    started = time.monotonic()
    assert not await finish_within(asyncio.Event().wait(), 0.05)
    assert time.monotonic() - started < 1.0
