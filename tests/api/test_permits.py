"""Blocks of rate-limit slots taken ahead from the real Redis (`api/permits.py`): a busy
window costs few calls, the limit holds across processes, and what a process holds but
does not use goes back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import redis.asyncio
from limits import parse
from redis.exceptions import ConnectionError as RedisConnectionError

from jobgate.api.limits import RateLimits, open_backend
from jobgate.api.permits import PermitBlocks
from jobgate.api.redis_takes import TAKE_AND_COUNT, RedisTakes
from tests.conftest import TCP_SERVICES, drop_redis_keys

pytestmark = pytest.mark.service("redis")
REDIS_URL = f"redis://{TCP_SERVICES['redis']}/0"


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    made = f"jgtest-permits-{uuid.uuid4().hex[:12]}"
    yield made
    await drop_redis_keys(f"{made}*")


class Process:
    """What one API process has: its own connection, script calls and blocks."""

    def __init__(self, life_s: float, *, ahead: bool = True) -> None:
        self.client = redis.asyncio.Redis.from_url(REDIS_URL)
        self.calls = 0
        self.blocks_taken = 0  # calls that took more than one slot
        self.failing = False  # calls fail as with Redis gone
        script = self.client.register_script(TAKE_AND_COUNT)

        async def counted(keys: Sequence[str], args: Sequence[Any]) -> Any:
            self.calls += 1
            if self.failing:
                await asyncio.sleep(0.01)
                raise RedisConnectionError("Redis is gone")
            answers = await script(keys, args)
            self.blocks_taken += sum(1 for answer in answers if int(answer[0]) > 1)
            return answers

        self.blocks = PermitBlocks(RedisTakes(counted), life_s=lambda expiry: life_s, ahead=ahead)

    async def aclose(self) -> None:
        await self.client.aclose()


async def _busy(
    process: Process,
    key: str,
    limit: int,
    expiry: int,
    seconds: float,
    *,
    callers: int = 8,
    pause_s: float = 0.001,
) -> list[tuple[float, float]]:
    """`callers` taking one slot at a time for `seconds`, pausing `pause_s` after each;
    for each slot granted, when it was asked for and when the answer was seen (it was
    handed out in between: on a loaded machine the answer may be seen late)."""
    granted: list[tuple[float, float]] = []
    deadline = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < deadline:
            asked = time.time()
            taken, _, _ = await process.blocks.take(key, limit, expiry, 1)
            if taken:
                granted.append((asked, time.time()))
            await asyncio.sleep(pause_s)

    await asyncio.gather(*(caller() for _ in range(callers)))
    return granted


async def test_busy_processes_never_pass_the_limit(prefix: str) -> None:
    """Two processes asking far more than `200 per 2 seconds` allows, with blocks handed
    out for 0.5 s: in no 2-second span are more than 200 slots granted."""
    limit, expiry = 200, 2
    a, b = Process(0.5), Process(0.5)
    try:
        first, second = await asyncio.gather(
            _busy(a, f"{prefix}:w", limit, expiry, 4.5), _busy(b, f"{prefix}:w", limit, expiry, 4.5)
        )
    finally:
        await a.aclose()
        await b.aclose()
    granted = sorted(first + second)
    # Demand was far above the limit: the window was full all along, over about two
    # windows and a bit.
    assert len(granted) >= 2 * limit
    # Grant i and grant i + limit must be a window apart (less a few ms of timing).
    assert _tightest(granted, limit) >= expiry - 0.05
    assert a.blocks_taken
    assert b.blocks_taken
    assert first
    assert second


def _tightest(granted: list[tuple[float, float]], limit: int) -> float:
    """The shortest span that `limit + 1` grants certainly fell in: from the first one's
    asking to the last one's answer, over runs of grants in the order they were asked
    for. A pause of the test's own event loop between a hand-out and its answer widens
    a span; it never makes one look shorter than it was."""
    ordered = sorted(granted)
    return min(
        max(answer for _, answer in ordered[i : i + limit + 1]) - ordered[i][0]
        for i in range(len(ordered) - limit)
    )


async def test_slots_handed_out_late_in_a_block_count_a_whole_window(prefix: str) -> None:
    """A block taken at t0 and handed out just before it runs out (t0 + 0.9 s) still
    counts until a window after that: another process that finds the window's first
    entries gone (t0 + 2.05 s) cannot take those slots again. (Blocks stamped when they
    are taken, not ahead, fail here: the other process takes them a second time.)"""
    key, limit, expiry = f"{prefix}:late", 100, 2
    a, b = Process(1.0), Process(1.0)
    granted: list[tuple[float, float]] = []

    async def take_all(process: Process) -> None:
        while True:
            asked = time.time()
            if not (await process.blocks.take(key, limit, expiry, 1))[0]:
                return
            granted.append((asked, time.time()))

    try:
        started = time.time()
        while not a.blocks.held(key):  # a, busy, earns a block
            asked = time.time()
            assert (await a.blocks.take(key, limit, expiry, 1))[0]
            granted.append((asked, time.time()))
            await asyncio.sleep(0.02)
            assert time.time() - started < 1
        block_at = time.time()
        await take_all(b)  # b fills the window
        await asyncio.sleep(block_at + 0.9 - time.time())
        await take_all(a)  # a hands out what it holds, and stops at the full window
        await asyncio.sleep(started + expiry + 0.05 - time.time())
        await take_all(b)  # the first entries have left: b takes what freed
    finally:
        await a.aclose()
        await b.aclose()
    assert _tightest(granted, limit) >= expiry - 0.05


async def test_a_busy_window_with_room_costs_few_calls(prefix: str) -> None:
    """Slots handed out from blocks cost no call: a window with room, taken from at a few
    hundred a second, costs a call per block's life (0.2 s here), not per take."""
    key, limit, expiry = f"{prefix}:r", 10_000, 60
    a = Process(0.2)
    try:
        granted = await _busy(a, key, limit, expiry, 1.0, callers=2, pause_s=0.005)
        assert len(granted) >= 100
        assert a.calls < len(granted) / 5
        assert await a.client.llen(key) == len(granted) + a.blocks.held(key)
    finally:
        await a.aclose()


async def test_take_ahead_off_calls_for_every_take(prefix: str) -> None:
    """`JOBGATE_LIMITS_TAKE_AHEAD=false`: the same busy window costs a call per take."""
    key, limit, expiry = f"{prefix}:off", 10_000, 60
    a = Process(0.2, ahead=False)
    try:
        granted = await _busy(a, key, limit, expiry, 0.5, callers=2, pause_s=0.005)
        assert len(granted) >= 50
        assert a.blocks_taken == 0
        assert a.blocks.held(key) == 0
        assert await a.client.llen(key) == len(granted)
    finally:
        await a.aclose()


async def test_failed_calls_fail_every_take_and_leave_none_waiting(prefix: str) -> None:
    """Redis gone while takes of a busy window wait for a block: each take fails with the
    error (its caller fails open), none waits forever, nothing is held, and takes work
    again once Redis answers."""
    key, limit, expiry = f"{prefix}:gone", 10_000, 60
    a = Process(1.0)
    try:
        await _busy(a, key, limit, expiry, 0.2, callers=2, pause_s=0.005)
        cost = a.blocks.held(key) + 1  # more than is held: every take must call
        a.failing = True
        answers = await asyncio.wait_for(
            asyncio.gather(
                *(a.blocks.take(key, limit, expiry, cost) for _ in range(6)),
                return_exceptions=True,
            ),
            timeout=5,
        )
        assert all(isinstance(answer, RedisConnectionError) for answer in answers)
        assert a.blocks.held(key) == 0
        a.failing = False
        taken, _, _ = await a.blocks.take(key, limit, expiry, 1)
        assert taken
    finally:
        await a.aclose()


async def _busy_until_held(process: Process, key: str, limit: int, expiry: int) -> int:
    """Two callers busy for 0.2 s, then takes at the same rate until `process` holds a
    block (the last busy take may have used one up, or, on a stalled machine, come too
    soon to ask for one); the slots granted."""
    used = len(await _busy(process, key, limit, expiry, 0.2, callers=2, pause_s=0.005))
    for _ in range(200):
        if process.blocks.held(key):
            break
        taken, _, _ = await process.blocks.take(key, limit, expiry, 1)
        used += int(taken)
        await asyncio.sleep(0.005)
    return used


async def test_what_a_process_holds_goes_back(prefix: str) -> None:
    """Slots held ahead but not handed out return to the window: lazily, with the
    process's next take of it, and at shutdown."""
    key, limit, expiry = f"{prefix}:h", 1000, 60
    a, b = Process(0.3), Process(0.3)
    try:
        used = await _busy_until_held(a, key, limit, expiry)
        held = a.blocks.held(key)
        assert held > 0
        assert used + held <= limit
        # b sees the held slots as taken.
        b_got = 0
        while (await b.blocks.take(key, limit, expiry, 1))[0]:
            b_got += 1
        assert b_got == limit - used - held
        # a's block runs out: its next take gives back what is left, and takes one.
        await asyncio.sleep(0.35)
        assert a.blocks.held(key) == 0
        taken, _, count = await a.blocks.take(key, limit, expiry, 1)
        assert taken
        assert count == used + b_got + 1
        # What a gave back, b can take now, but for what a holds again (its rate may
        # have earned it a new block).
        more = 0
        while (await b.blocks.take(key, limit, expiry, 1))[0]:
            more += 1
        assert more == held - 1 - a.blocks.held(key)
    finally:
        await a.aclose()
        await b.aclose()


async def test_slots_held_go_back_at_shutdown(prefix: str) -> None:
    key, limit, expiry = f"{prefix}:s", 1000, 60
    a = Process(30.0)  # a block that would outlive the test
    try:
        used = await _busy_until_held(a, key, limit, expiry)
        held = a.blocks.held(key)
        assert held > 0
        client = a.client
        assert await client.llen(key) == used + held
        await a.blocks.give_back()
        assert a.blocks.held(key) == 0
        assert await client.llen(key) == used
    finally:
        await a.aclose()


async def test_a_limit_under_twenty_is_taken_exactly(prefix: str) -> None:
    key, limit, expiry = f"{prefix}:x", 19, 60
    a = Process(0.5)
    try:
        granted = await _busy(a, key, limit, expiry, 0.3)
        assert len(granted) == limit
        assert a.blocks.held(key) == 0
        assert await a.client.llen(key) == limit
    finally:
        await a.aclose()


async def test_a_process_sees_its_own_window_exactly(prefix: str) -> None:
    """With blocks, RateLimit-Remaining after each of a user's submits is still exact for
    one process: the slots it holds count as free, for the take and for the check."""
    limits = RateLimits(
        submit=parse("1000/minute"), backend=open_backend(REDIS_URL, namespace=prefix)
    )
    try:
        for n in range(1, 121):
            taken, window = await limits.take_submits("ann", 1)
            assert taken
            assert window is not None
            assert window.remaining == 1000 - n
        read = await limits.submit_window("ann")
        assert read is not None
        assert read.remaining == 1000 - 120
        backend = limits._backend
        assert backend is not None
        item = parse("1000/minute")
        held = backend.held(item, ("submit", "ann"))
        client = redis.asyncio.Redis.from_url(REDIS_URL)
        try:
            assert await client.llen(f"{prefix}:{item.key_for('submit', 'ann')}") == 120 + held
        finally:
            await client.aclose()
    finally:
        await limits.aclose()
