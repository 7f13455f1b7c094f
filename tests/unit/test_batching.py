"""`Batches`: a lone item is written at once, items that queue while every writer is
busy go together in the next batch, and no more than `writers` batches run at once."""

from __future__ import annotations

import asyncio

from jobgate.batching import Batches, first


async def test_items_queued_while_writers_are_busy_go_together() -> None:
    written: list[list[int]] = []
    running = 0
    most = 0
    release = asyncio.Event()

    async def write(batch: list[int]) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        written.append(batch)
        await release.wait()
        running -= 1

    batches: Batches[int] = Batches(write, writers=2, name="test")
    batches.put(1)
    batches.put(2)  # queued before the first writer ran: it takes both
    await asyncio.sleep(0)
    batches.put(3)  # a second writer starts for it
    await asyncio.sleep(0)
    for n in range(4, 9):
        batches.put(n)  # both writers busy: these wait
    await asyncio.sleep(0)
    assert written == [[1, 2], [3]]
    release.set()
    await batches.wait()
    assert written == [[1, 2], [3], [4, 5, 6, 7, 8]]
    assert most == 2
    assert batches.idle


async def test_take_limits_a_batch() -> None:
    written: list[list[int]] = []

    async def write(batch: list[int]) -> None:
        written.append(batch)

    batches: Batches[int] = Batches(write, writers=1, name="test", take=first(2))
    for n in range(5):
        batches.put(n)
    await batches.wait()
    assert written == [[0, 1], [2, 3], [4]]
    assert batches.idle
