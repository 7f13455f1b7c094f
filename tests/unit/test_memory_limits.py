"""The in-process (`memory://`) limit storage: expired entries are swept out, but not by
a sweep per request."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from limits import parse
from limits.aio.storage import MemoryStorage

from jobgate.api.limits import RateLimits, SweepingMemoryStorage, open_backend

USERS = 100
LIMIT, EXPIRY_S = 5, 10


async def test_busy_windows_are_swept_at_most_once_a_second_without_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`limits` would sweep every key again as soon as the last sweep ends (a thread hop
    per key, all the time under load); here 2,000 takes over 100 users in well under a
    second sweep once, on the event loop."""
    hops = sweeps = 0
    to_thread, sweep = asyncio.to_thread, SweepingMemoryStorage.sweep

    async def counting_hops(function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        nonlocal hops
        hops += 1
        return await to_thread(function, *args, **kwargs)

    def counting_sweeps(self: SweepingMemoryStorage) -> None:
        nonlocal sweeps
        sweeps += 1
        sweep(self)

    monkeypatch.setattr(asyncio, "to_thread", counting_hops)
    monkeypatch.setattr(SweepingMemoryStorage, "sweep", counting_sweeps)
    limits = RateLimits(
        submit=parse("1000/minute"), backend=open_backend("memory://", namespace="t")
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(20):
        for user in range(USERS):
            assert (await limits.take_submits(f"user-{user}", 1))[0]
        await asyncio.sleep(0.001)  # let a sweep that was started run to its end
    assert loop.time() - started < SweepingMemoryStorage.SWEEP_INTERVAL_S
    assert sweeps == 1
    assert hops == 0


async def test_expired_entries_are_still_swept_out() -> None:
    """Memory stays bounded: a user whose entries all expired is dropped by a later sweep,
    and a full window frees its slots on time."""
    backend = open_backend("memory://", namespace="t")
    storage = backend.limiter.storage
    assert isinstance(storage, SweepingMemoryStorage)
    limits = RateLimits(submit=parse("2/second"), backend=backend)
    assert (await limits.take_submits("gone", 2))[0]
    assert not (await limits.take_submits("gone", 1))[0]
    await asyncio.sleep(1.1)
    window = await limits.submit_window("gone")
    assert window is not None
    assert window.remaining == 2
    await _until(lambda: _swept(storage, limits, "gone"), timeout=3.0)


async def _swept(storage: SweepingMemoryStorage, limits: RateLimits, user: str) -> bool:
    assert (await limits.take_submits("someone-else", 1))[0]  # activity schedules sweeps
    await asyncio.sleep(0.05)
    return not any(user in key for key in storage.windows)


async def _until(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "expired entries were never swept out"


# (seconds the clock moves, entries taken) for each step
_steps = st.lists(
    st.tuples(st.sampled_from([0.0, 0.0, 0.4, 1.0, 2.5, 3.0, 7.0]), st.integers(1, 4)),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(steps=_steps)
async def test_takes_and_windows_match_limits_own_memory_storage(
    steps: list[tuple[float, int]],
) -> None:
    """The storage keeps a window's entries oldest first (a take appends, where `limits`
    copies the window to insert at its head), and still answers exactly as `limits`'
    own memory storage does, take for take: taken or not, the count, the oldest time."""
    clock = [1_000_000.0]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "time", lambda: clock[0])
        reference, ours = MemoryStorage(), SweepingMemoryStorage()
        for moved, cost in steps:
            clock[0] += moved
            taken = await reference.acquire_entry("k", LIMIT, EXPIRY_S, cost)
            oldest, count = await reference.get_moving_window("k", LIMIT, EXPIRY_S)
            if count == 0:
                oldest = clock[0]  # `limits` reports an expired entry's time: to be ignored
            assert ours.take_now("k", LIMIT, EXPIRY_S, cost) == (taken, oldest, count)
            assert await ours.get_moving_window("k", LIMIT, EXPIRY_S) == (oldest, count)


def test_a_busy_window_costs_bytes_per_entry_not_an_object() -> None:
    """One busy address under a large limit fills a window of 100,000 entries: about 8
    bytes each here, where `limits`' own storage keeps an object of 144 bytes each."""
    storage = SweepingMemoryStorage()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(100_000):
            assert storage.take_now("busy", 1_000_000, 60, 1)[0]
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert storage.take_now("busy", 1_000_000, 60, 0)[2] == 100_000
    assert used < 100_000 * 16
