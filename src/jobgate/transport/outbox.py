"""The outbox relay: moves committed wake-up tokens from the store to the broker.

Tokens are written in the transaction that makes their tasks ready, so a job the API
accepted always has its token, whatever the broker was doing. The relay takes due
tokens (`FOR UPDATE SKIP LOCKED`, so relays in several processes share the work),
publishes them, waits for the broker's confirms and only then deletes them, in the
same transaction. A broker outage leaves the tokens where they are; they are published
when it returns. A crash between publish and commit publishes a token twice, which
costs one claim that finds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from sqlalchemy import delete, func, select

from jobgate.ids import now
from jobgate.store import Database
from jobgate.store.tables import outbox
from jobgate.transport.base import Transport, TransportError
from jobgate.waits import wait_at_most

log = structlog.get_logger("jobgate.transport")

BATCH = 1000


class OutboxRelay:
    """Publishes outbox tokens as they become due.

    Args:
        db: the store holding the outbox.
        transport: the broker.
        poll_s: how long it waits for a wake-up before looking anyway.
    """

    def __init__(self, db: Database, transport: Transport, *, poll_s: float) -> None:
        self.db = db
        self.transport = transport
        self.poll_s = poll_s
        self.published = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connected = False

    def wake(self) -> None:
        """Tokens may have been committed: look now."""
        self._wakeup.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="jobgate-outbox-relay")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def drain(self) -> int:
        """Publish every due token now; how many were published."""
        total = 0
        while True:
            count = await self._publish_batch()
            total += count
            if count < BATCH:
                return total

    async def _run(self) -> None:
        delay = 0.1
        while True:
            self._wakeup.clear()
            try:
                if not self._connected:
                    await self.transport.connect()
                    self._connected = True
                count = await self._publish_batch()
                delay = 0.1
            except (TransportError, OSError) as exc:
                log.warning("outbox_publish_failed", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            except Exception:
                log.exception("outbox_relay_failed")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if count == BATCH:
                continue
            await wait_at_most(self._wakeup, await self._next_due())

    async def _publish_batch(self) -> int:
        async with self.db.write() as conn:
            rows = (
                await conn.execute(
                    select(outbox.c.id, outbox.c.queue)
                    .where(outbox.c.available_at <= now())
                    .order_by(outbox.c.id)
                    .limit(BATCH)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            await self.transport.publish([queue for _, queue in rows])
            await conn.execute(delete(outbox).where(outbox.c.id.in_([i for i, _ in rows])))
        self.published += len(rows)
        return len(rows)

    async def _next_due(self) -> float:
        """Seconds until the earliest token not yet due, capped at the poll interval."""
        async with self.db.read() as conn:
            earliest = (await conn.execute(select(func.min(outbox.c.available_at)))).scalar()
        if earliest is None:
            return self.poll_s
        return max(0.0, min(self.poll_s, float(earliest) - now()))
