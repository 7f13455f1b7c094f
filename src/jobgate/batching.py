"""Writers that drain a queue in batches: the shape of every group commit here.

A lone item is written at once; items that arrive while every writer is busy wait, and
the next writer free takes what has queued by then. Used for stage outcomes
(`worker/group_commit.py`), submits (`api/submit_group.py`) and rate-limit takes on
Redis (`api/redis_takes.py`).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Batches(Generic[T]):
    """Up to `writers` tasks run `write` on batches of the queued items.

    `take` removes the next batch from the queue (by default, everything queued). The
    writers run in a context of their own: what they log belongs to no one caller.
    `write` must settle its items itself; an exception it lets out is lost.
    """

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[None]],
        *,
        writers: int,
        name: str,
        take: Callable[[deque[T]], list[T]] | None = None,
    ) -> None:
        self._write = write
        self.writers = writers
        self._name = name
        self._take = take or _everything
        self._queue: deque[T] = deque()
        self._writing: set[asyncio.Task[None]] = set()

    @property
    def idle(self) -> bool:
        """Nothing queued and no writer running."""
        return not self._queue and not self._writing

    def put(self, item: T) -> None:
        """Queue `item`; start a writer if fewer than `writers` run."""
        self._queue.append(item)
        if len(self._writing) < self.writers:
            writer = asyncio.create_task(
                self._write_queued(), name=self._name, context=contextvars.Context()
            )
            self._writing.add(writer)

    async def wait(self) -> None:
        """Until every writer has finished."""
        while self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)

    async def _write_queued(self) -> None:
        try:
            while self._queue:
                await self._write(self._take(self._queue))
        finally:
            # Gone from the writers the moment it finds the queue empty (no await in
            # between): a done callback would run only later, after callers woken by
            # this writer's last batch may have queued items and, seeing it still
            # counted, started no writer for them.
            writer = asyncio.current_task()
            if writer is not None:
                self._writing.discard(writer)


def _everything(queue: deque[T]) -> list[T]:
    batch = list(queue)
    queue.clear()
    return batch


def first(count: int) -> Callable[[deque[T]], list[T]]:
    """A `take` of at most `count` items, oldest first."""

    def take(queue: deque[T]) -> list[T]:
        return [queue.popleft() for _ in range(min(count, len(queue)))]

    return take
