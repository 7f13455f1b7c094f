"""Taking rate-limit slots in Redis: the takes that wait together go in one script call.

A take is one round trip through redis-py, which costs the API process more CPU (about
80-150 µs) than the script costs Redis. While calls are under way, the takes that arrive
wait and go together in the next call: one script runs them one after the other, each
atomic and exact as if alone (Redis runs a script as a whole).

A take may also ask for `extra` slots beyond its `cost`, a block that its process hands
out later without a call (`api/permits.py`). Those entries are stamped `offset` seconds
ahead, so each counts for the whole window after any moment it may be handed out in,
and a later take can give back the ones its process did not use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from jobgate.batching import Batches, first

# `limits` takes slots (`hit`) and reads a window (`get_window_stats`) in two calls; a
# submit needs both, so here the script does the two at once, on the list `limits` keeps
# (newest entry first, one timestamp per slot, at most `limit` long), so that `limits`
# reads what it writes. `tests/contract/test_limit_storages.py` holds the two to the same
# answers. The list stays sorted with blocks too: no entry is stamped earlier than the
# newest one already there. KEYS are the windows; ARGV holds, for each in turn: now,
# limit, expiry, cost, extra, offset, and the count and stamp of entries to give back.
TAKE_AND_COUNT = """
local function fits(key, now, limit, expiry, n)
    if n > limit then
        return false
    end
    local blocking = redis.call('lindex', key, limit - n)
    return not (blocking and tonumber(blocking) >= now - expiry)
end
local function take(key, now, limit, expiry, cost, extra, offset, back, back_stamp)
    if back > 0 then
        redis.call('lrem', key, back, back_stamp)
    end
    local granted, stamp = 0, now
    if extra > 0 and fits(key, now, limit, expiry, cost + extra) then
        granted, stamp = cost + extra, now + offset
    elseif fits(key, now, limit, expiry, cost) then
        granted = cost
    end
    local text = string.format('%.6f', stamp)
    local head = redis.call('lindex', key, 0)
    if head and tonumber(head) > tonumber(text) then
        text = head
    end
    if granted > 0 then
        local entries = {}
        for i = 1, math.min(granted, 1000) do entries[i] = text end
        for pushed = 0, granted - 1, 1000 do
            redis.call('lpush', key, unpack(entries, 1, math.min(1000, granted - pushed)))
        end
        redis.call('ltrim', key, 0, limit - 1)
        redis.call('expire', key, expiry + math.ceil(offset))
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
        return {granted, text, tostring(now), 0}
    end
    return {granted, text, redis.call('lindex', key, last), last + 1}
end
local answers = {}
for i, key in ipairs(KEYS) do
    local at = (i - 1) * 8
    answers[i] = take(key, tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]),
        tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4]), tonumber(ARGV[at + 5]),
        tonumber(ARGV[at + 6]), tonumber(ARGV[at + 7]), ARGV[at + 8])
end
return answers
"""

Script = Callable[[Sequence[str], Sequence[Any]], Awaitable[Any]]
"""A registered script: `await script(keys, args)`."""


class Taken(NamedTuple):
    """What one take did, and the window it left."""

    granted: int
    """Slots taken: 0 (none fitted), `cost`, or `cost + extra`."""
    oldest: float
    """The oldest entry still in the window (now, if it is empty)."""
    entries: int
    """Entries in the window, this take's included."""
    stamp: str
    """The stamp of this take's entries, as Redis keeps it (to give them back by)."""

    @property
    def taken(self) -> bool:
        return self.granted > 0


@dataclass
class _Take:
    key: str
    args: tuple[float, int, int, int, int, float, int, str]
    done: asyncio.Future[Taken]


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
        self,
        key: str,
        now: float,
        limit: int,
        expiry: int,
        cost: int,
        *,
        extra: int = 0,
        offset: float = 0.0,
        give_back: tuple[int, str] = (0, ""),
    ) -> Taken:
        """Take `cost` slots of the window `key` (all or none), and `extra` more stamped
        `offset` seconds ahead if they fit too; first give back `give_back`'s count of
        entries with its stamp. Then count the window."""
        done: asyncio.Future[Taken] = asyncio.get_running_loop().create_future()
        back, back_stamp = give_back
        args = (now, limit, expiry, cost, extra, offset, back, back_stamp)
        self.batches.put(_Take(key, args, done))
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
        for take, (granted, stamp, oldest, count) in zip(batch, answers, strict=True):
            if not take.done.done():  # its caller was cancelled
                text = stamp.decode() if isinstance(stamp, bytes) else str(stamp)
                take.done.set_result(Taken(int(granted), float(oldest), int(count), text))
