"""Blocks of rate-limit slots a process takes from Redis ahead, and hands out without a call.

A busy user's submits (or a busy address's requests) would each cost a Redis round
trip. Instead, when a window's slots are being taken faster than a few per block's
life, a take asks Redis for a block: its own slots plus an estimate of what the next
`life_s` seconds will need. The block's slots are entries in the shared window at once,
stamped `life_s` ahead; the process hands them out until that stamp, so every slot
handed out counts, in every process, for at least a whole window after it was handed
out. The limit is never exceeded, across any number of processes.

What it costs: a slot counts up to `life_s` longer than its moment, and slots a process
holds but has not handed out look taken to the others. A block is at most a twentieth
of the limit, and what is left of it is given back (in the same call) by the process's
next take of that window, so the others lose at most that, for at most a window. A
limit under 20 never uses blocks: each take is one call, exact to the moment.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from jobgate.api.redis_takes import RedisTakes

BLOCK_SHARE = 20
"""A block is at most 1/BLOCK_SHARE of the limit (so limits under this never use one)."""
MAX_BLOCK = 1000
"""Extra slots in one block, at most."""
MIN_EXTRA = 2
"""A block is worth a call only when it saves this many calls."""
_KEPT_MAX = 50_000  # windows tracked; those with nothing held are dropped past this


def block_life_s(expiry: int) -> float:
    """How long a block of a window of `expiry` seconds is handed out: a sixtieth of the
    window, at most a second (so a slot counts at most 1.7 % longer than its moment)."""
    return min(1.0, expiry / 60)


@dataclass
class _Block:
    limit: int
    expiry: int
    stamp: str = ""
    """The stamp of the held slots' entries in Redis (to give them back by)."""
    until: float = 0.0
    """Wall-clock time the held slots may be handed out until (their stamp)."""
    left: int = 0
    """Slots held, not handed out yet."""
    count: int = 0
    """Entries in the window at the last call."""
    oldest: float = 0.0
    since: float = 0.0
    """Monotonic time of the last call (0 before the first): the rate's start."""
    handed: int = 0
    """Slots taken since `since`: the rate's estimate."""
    refill: asyncio.Future[None] | None = None
    """Set while a call asking for a block is under way."""


class PermitBlocks:
    """Takes of moving windows in Redis through `takes`, served from blocks where a
    window is busy.

    Args:
        takes: the script calls.
        life_s: a block's life in seconds, for a window's length in seconds.
        ahead: whether to take blocks at all (False: every take is one exact call).
    """

    def __init__(
        self,
        takes: RedisTakes,
        *,
        life_s: Callable[[int], float] = block_life_s,
        ahead: bool = True,
    ) -> None:
        self.takes = takes
        self._life = life_s
        self._ahead = ahead
        self._blocks: dict[str, _Block] = {}

    def held(self, key: str) -> int:
        """Slots of `key`'s window this process holds and has not handed out."""
        block = self._blocks.get(key)
        if block is None or time.time() >= block.until:
            return 0
        return block.left

    def take_held(self, key: str, cost: int) -> tuple[bool, float, int] | None:
        """`take` from the block this process holds, if it has `cost` slots to hand out
        now; None: the take needs a call."""
        block = self._blocks.get(key)
        return None if block is None else _hand_out(block, cost)

    async def take(self, key: str, limit: int, expiry: int, cost: int) -> tuple[bool, float, int]:
        """Take `cost` slots of the window `key` (all or none): (taken, the oldest entry's
        time, the slots of the window taken, not counting those this process holds)."""
        block = self._blocks.get(key)
        if block is None:  # a window's key names its limit: the two never change
            if len(self._blocks) >= _KEPT_MAX:
                self._forget_idle()
            block = self._blocks[key] = _Block(limit, expiry)
        while True:
            served = _hand_out(block, cost)
            if served is not None:
                return served
            if block.refill is None:
                break
            await asyncio.shield(block.refill)  # a block may be on its way: wait for it
        return await self._call(key, block, cost)

    async def _call(self, key: str, block: _Block, cost: int) -> tuple[bool, float, int]:
        now, at = time.time(), time.monotonic()
        life = self._life(block.expiry)
        extra = self._extra(block, at, life)
        block.since, block.handed = at, 0
        # What is held cannot serve this take: give it back in the same call.
        give_back = (block.left, block.stamp) if block.left else (0, "")
        block.left = 0
        refill = asyncio.get_running_loop().create_future() if extra else None
        if refill is not None:
            block.refill = refill
        try:
            taken = await self.takes.take(
                key,
                now,
                block.limit,
                block.expiry,
                cost,
                extra=extra,
                offset=life,
                give_back=give_back,
            )
        finally:
            if refill is not None:
                block.refill = None
                refill.set_result(None)
        if taken.taken:
            block.handed += cost
        if taken.granted > cost:
            block.left = taken.granted - cost
            block.stamp, block.until = taken.stamp, float(taken.stamp)
        if taken.granted > cost or not block.left:
            block.count, block.oldest = taken.entries, taken.oldest
        return taken.taken, taken.oldest, taken.entries - block.left

    def _extra(self, block: _Block, at: float, life: float) -> int:
        """Slots beyond the take's own worth asking for: what the window's rate since the
        last call would take in a block's life, within the block's bounds."""
        most = min(block.limit // BLOCK_SHARE, MAX_BLOCK)
        if not self._ahead or most < MIN_EXTRA or not block.since or block.refill is not None:
            return 0
        wanted = int(block.handed / max(at - block.since, 1e-3) * life)
        return min(most, wanted) if wanted >= MIN_EXTRA else 0

    def _forget_idle(self) -> None:
        now = time.time()
        self._blocks = {
            key: block
            for key, block in self._blocks.items()
            if block.refill is not None or (block.left and now < block.until)
        }

    async def give_back(self) -> None:
        """Give back every slot held (at shutdown), so that other processes may use them."""
        now = time.time()
        held = [
            (key, b.limit, b.expiry, (b.left, b.stamp))
            for key, b in self._blocks.items()
            if b.left and now < b.until
        ]
        for key, *_ in held:
            self._blocks[key].left = 0
        await asyncio.gather(
            *(
                self.takes.take(key, now, limit, expiry, 0, give_back=give_back)
                for key, limit, expiry, give_back in held
            ),
            return_exceptions=True,
        )


def _hand_out(block: _Block, cost: int) -> tuple[bool, float, int] | None:
    """`cost` slots of what `block` holds, if it has them to hand out now."""
    if block.left < cost or time.time() >= block.until:
        return None
    block.left -= cost
    block.handed += cost
    return True, block.oldest, block.count - block.left
