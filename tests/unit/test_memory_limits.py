"""The in-process (`memory://`) limit storage: expired entries are swept out, but not by
a sweep per request."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from limits import parse

from jobgate.api.limits import RateLimits, SweepingMemoryStorage, open_backend

USERS = 100


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
    return not any(user in key for key in storage.events)


async def _until(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "expired entries were never swept out"
