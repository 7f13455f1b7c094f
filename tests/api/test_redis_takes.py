"""Rate-limit takes on the real Redis (`api/redis_takes.py`): takes waiting together go
in one script call, each as exact as alone; a failed call fails each of its takes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError

from jobgate.api.redis_takes import TAKE_AND_COUNT, RedisTakes
from tests.conftest import TCP_SERVICES, drop_redis_keys

pytestmark = pytest.mark.service("redis")
REDIS_URL = f"redis://{TCP_SERVICES['redis']}/0"


@pytest.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    made = redis.asyncio.Redis.from_url(REDIS_URL)
    prefix = f"jgtest-takes-{uuid.uuid4().hex[:12]}"
    made.test_prefix = prefix  # type: ignore[attr-defined]
    try:
        yield made
    finally:
        await made.aclose()
        await drop_redis_keys(f"{prefix}:*")


def _counting(script: Any, calls: list[int]) -> Any:
    async def call(keys: Sequence[str], args: Sequence[Any]) -> Any:
        calls.append(len(keys))
        return await script(keys, args)

    return call


async def test_takes_waiting_together_share_a_call_and_stay_exact(
    client: redis.asyncio.Redis,
) -> None:
    calls: list[int] = []
    takes = RedisTakes(_counting(client.register_script(TAKE_AND_COUNT), calls), calls=1)
    prefix = client.test_prefix  # type: ignore[attr-defined]
    now = time.time()
    answers = await asyncio.gather(
        *(takes.take(f"{prefix}:a", now, 5, 60, 1) for _ in range(8)),
        *(takes.take(f"{prefix}:b", now, 5, 60, 2) for _ in range(4)),
    )
    # All twelve were queued before the call started: one call for them all.
    assert calls == [12]
    a, b = answers[:8], answers[8:]
    assert [t.entries for t in a] == [1, 2, 3, 4, 5, 5, 5, 5]
    assert [t.taken for t in a] == [True] * 5 + [False] * 3
    assert [(t.taken, t.entries) for t in b] == [
        (True, 2),
        (True, 4),
        (False, 4),
        (False, 4),
    ]
    assert all(t.oldest == pytest.approx(now) for t in answers)
    assert await client.llen(f"{prefix}:a") == 5
    assert takes.batches.idle


async def test_a_failed_call_fails_each_of_its_takes() -> None:
    unreachable = redis.asyncio.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    try:
        takes = RedisTakes(unreachable.register_script(TAKE_AND_COUNT), calls=1)
        answers = await asyncio.gather(
            *(takes.take(f"k{n}", time.time(), 5, 60, 1) for n in range(5)),
            return_exceptions=True,
        )
    finally:
        await unreachable.aclose()
    assert all(isinstance(answer, RedisConnectionError) for answer in answers)
    assert takes.batches.idle


async def test_a_cancelled_caller_leaves_the_others_answered(
    client: redis.asyncio.Redis,
) -> None:
    takes = RedisTakes(client.register_script(TAKE_AND_COUNT), calls=1)
    prefix = client.test_prefix  # type: ignore[attr-defined]
    now = time.time()
    callers = [asyncio.create_task(takes.take(f"{prefix}:c", now, 10, 60, 1)) for _ in range(4)]
    await asyncio.sleep(0)
    callers[2].cancel()
    answers = await asyncio.gather(*callers, return_exceptions=True)
    assert isinstance(answers[2], asyncio.CancelledError)
    assert [a.entries for i, a in enumerate(answers) if i != 2] == [1, 2, 4]  # type: ignore[union-attr]
    # The cancelled take was already sent with the others: its slot is taken.
    assert await client.llen(f"{prefix}:c") == 4


async def test_takes_arriving_during_a_call_go_together_in_the_next(
    client: redis.asyncio.Redis,
) -> None:
    calls: list[int] = []
    started, release = asyncio.Event(), asyncio.Event()
    script = _counting(client.register_script(TAKE_AND_COUNT), calls)

    async def held(keys: Sequence[str], args: Sequence[Any]) -> Any:
        started.set()
        await release.wait()
        return await script(keys, args)

    takes = RedisTakes(held, calls=1)
    prefix = client.test_prefix  # type: ignore[attr-defined]
    first = asyncio.create_task(takes.take(f"{prefix}:d", time.time(), 10, 60, 1))
    await started.wait()
    later = [
        asyncio.create_task(takes.take(f"{prefix}:d", time.time(), 10, 60, 1)) for _ in range(3)
    ]
    await asyncio.sleep(0)
    release.set()
    answers = await asyncio.gather(first, *later)
    assert calls == [1, 3]
    assert [t.entries for t in answers] == [1, 2, 3, 4]
