"""Taking rate-limit slots in Redis: the takes that wait together go in one script call.

A take is one round trip through redis-py, which costs the API process more CPU (about
80-150 µs) than the script costs Redis. While calls are under way, the takes that arrive
wait and go together in the next call: one script runs them one after the other, each
atomic and exact as if alone (Redis runs a script as a whole).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from jobgate.batching import Batches, first

# `limits` takes slots (`hit`) and reads a window (`get_window_stats`) in two calls; a
# submit needs both, so here the script does the two at once, on the list `limits` keeps
# (newest entry first, one timestamp per slot, at most `limit` long), so that `limits`
# reads what it writes. `tests/contract/test_limit_storages.py` holds the two to the same
# answers. KEYS are the windows; ARGV holds (now, limit, expiry, cost) for each, in turn.
TAKE_AND_COUNT = """
local function take(key, now, limit, expiry, cost)
    local taken = 0
    if cost <= limit then
        local blocking = redis.call('lindex', key, limit - cost)
        if not (blocking and tonumber(blocking) >= now - expiry) then
            local entries = {}
            for i = 1, math.min(cost, 1000) do entries[i] = now end
            for pushed = 0, cost - 1, 1000 do
                redis.call('lpush', key, unpack(entries, 1, math.min(1000, cost - pushed)))
            end
            redis.call('ltrim', key, 0, limit - 1)
            redis.call('expire', key, expiry)
            taken = 1
        end
    end
    -- The newest entries are first: find the last one still inside the window.
    local low, high, last = 0, redis.call('llen', key) - 1, -1
    while low <= high do
        local middle = math.floor((low + high) / 2)
        if tonumber(redis.call('lindex', key, middle)) >= now - expiry then
            last = middle
            low = middle + 1
        else
            high = middle - 1
        end
    end
    if last < 0 then
        return {taken, tostring(now), 0}
    end
    return {taken, redis.call('lindex', key, last), last + 1}
end
local answers = {}
for i, key in ipairs(KEYS) do
    local at = (i - 1) * 4
    answers[i] = take(key, tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]),
        tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4]))
end
return answers
"""

Script = Callable[[Sequence[str], Sequence[Any]], Awaitable[Any]]
"""A registered script: `await script(keys, args)`."""


@dataclass
class _Take:
    key: str
    args: tuple[float, int, int, int]
    done: asyncio.Future[tuple[bool, float, int]]


class RedisTakes:
    """Runs takes of `TAKE_AND_COUNT` for many callers, up to `calls` calls at once.

    A lone take is sent at once; takes that arrive while all the calls are under way go
    together in the next (at most `max_batch`). A failed call fails each of its takes
    with its error, and each caller fails open, as with a call of its own.
    """

    def __init__(self, script: Script, *, calls: int = 2, max_batch: int = 64) -> None:
        self.script = script
        self.batches = Batches(
            self._call, writers=calls, name="jobgate-redis-takes", take=first(max_batch)
        )

    async def take(
        self, key: str, now: float, limit: int, expiry: int, cost: int
    ) -> tuple[bool, float, int]:
        """Take `cost` slots of the window `key` (all or none) and count it:
        (taken, the oldest entry's time, the entries in the window)."""
        done: asyncio.Future[tuple[bool, float, int]] = asyncio.get_running_loop().create_future()
        self.batches.put(_Take(key, (now, limit, expiry, cost), done))
        return await done

    async def _call(self, batch: list[_Take]) -> None:
        try:
            answers = await self.script(
                [t.key for t in batch], [value for t in batch for value in t.args]
            )
        except Exception as exc:
            for take in batch:
                if not take.done.done():
                    take.done.set_exception(exc)
            return
        for take, (taken, oldest, count) in zip(batch, answers, strict=True):
            if not take.done.done():  # its caller was cancelled
                take.done.set_result((bool(taken), float(oldest), int(count)))
