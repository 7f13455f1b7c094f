"""The outbox relay: moves committed wake-up tokens from the store to the broker.

Tokens are written in the transaction that makes their tasks ready, so a job the API
accepted always has its token, whatever the broker was doing. On PostgreSQL the relay
**takes** due tokens in one statement (`FOR UPDATE SKIP LOCKED`, so relays in several
processes share the work), which moves them `TAKEN_FOR_S` into the future; it publishes
them, waits for the broker's confirms and only then deletes them. A publish that fails
puts them back, due at once, so a broker outage leaves the tokens where they are and
they are published when it returns. A relay that dies holding tokens leaves them to any
relay once `TAKEN_FOR_S` has passed; a crash between the publish and the delete
publishes a token twice, which costs one claim that finds nothing.

A relay cut off from the broker (a partition: its publishes hang until they time out)
would take due tokens again and again and hold each for that long. After a failed
publish a relay takes no token until the broker answers a ping; and a relay with
nothing due looks again within `HELD_RECHECK_S` while some token is about to be due,
since a token another relay put back is due at once and nothing wakes it for that.

One statement, not a transaction holding row locks across the publish: a submit's token
then reaches the broker one round trip after the relay is woken, not three (`BEGIN`,
the locking read, then the publish; the delete and `COMMIT` followed).

On SQLite (one writer at a time) the relay reads, publishes and deletes in one
transaction.
"""

from __future__ import annotations

import asyncio

import structlog
from sqlalchemy import delete, func, select

from jobgate.ids import now
from jobgate.store import Database, pg
from jobgate.store.tables import outbox
from jobgate.transport.base import Transport, TransportError
from jobgate.waits import wait_at_most

log = structlog.get_logger("jobgate.transport")

BATCH = 1000
# How long a relay holds the tokens it took: longer than any publish may take (a publish
# waits 10 s at most for its confirms), after which another relay may publish them.
TAKEN_FOR_S = 30.0
PUT_BACK_TIMEOUT_S = 5.0
HELD_RECHECK_S = 5.0

# Rows are found as `= ANY(ARRAY(...))`, which PostgreSQL reads by primary key; as
# `IN (...)` the generic plan hash-joined the whole outbox. Each statement commits
# without waiting for the disk (`synchronous_commit` off for its own transaction): a
# write of the relay's that a database crash loses only makes tokens due again, and a
# token published twice costs a claim that finds nothing. The token's own insert, with
# the submit, is durable as before.
_TAKE = """
UPDATE outbox SET available_at = $2
WHERE id = ANY(ARRAY(
    SELECT id FROM outbox WHERE available_at <= $1
    ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED
)) AND (SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL
RETURNING id, queue
"""
_PUT_BACK = """
UPDATE outbox SET available_at = $2
WHERE id = ANY($1::bigint[])
    AND (SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL
"""
_DELETE = """
DELETE FROM outbox
WHERE id = ANY($1::bigint[])
    AND (SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL
"""


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
        self._failing = False  # the last publish failed: ping before taking tokens

    def wake(self) -> None:
        """Tokens may have been committed: look now."""
        self._wakeup.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="jobgate-outbox-relay")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # it never should; a close must go on regardless
                log.exception("outbox_relay_died")
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
                wait = await self._round()
                delay = 0.1
            except (TransportError, OSError) as exc:
                self._failing = True
                log.warning("outbox_publish_failed", error=str(exc), retry_in_s=delay)
            except Exception:
                # The store failed (a restart, a dropped connection): try again. Nothing
                # may end this loop but a cancellation, or the process publishes no more.
                log.exception("outbox_relay_failed", retry_in_s=delay)
            else:
                if wait > 0:
                    await wait_at_most(self._wakeup, wait)
                continue
            # Not cut short by wake-ups: commits go on during an outage.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _round(self) -> float:
        """Publish what is due; how long to wait for a wake-up before the next round."""
        if not self._connected:
            await self.transport.connect()
            self._connected = True
        if self._failing:
            await self.transport.ping()
            self._failing = False
        count = await self._publish_batch()
        if count == BATCH or self._wakeup.is_set():
            return 0.0  # more may be due, or commits woke it meanwhile: look now
        return await self._next_due()

    async def _publish_batch(self) -> int:
        if self.db.is_sqlite:
            return await self._publish_in_transaction()
        at = now()
        async with self.db.autocommit() as conn:
            rows = await pg.records(conn, _TAKE, at, at + TAKEN_FOR_S, BATCH)
        if not rows:
            return 0
        ids = [row["id"] for row in rows]
        try:
            await self.transport.publish([row["queue"] for row in rows])
        except BaseException:
            await self._put_back(ids, at)
            raise
        async with self.db.autocommit() as conn:
            await pg.records(conn, _DELETE, ids)
        self.published += len(rows)
        return len(rows)

    async def _put_back(self, ids: list[int], at: float) -> None:
        """Make taken tokens due again at once; if the store is out of reach too, they
        come back by themselves after `TAKEN_FOR_S`. Bounded in time: it also runs
        while the relay is being closed."""
        try:
            async with asyncio.timeout(PUT_BACK_TIMEOUT_S), self.db.autocommit() as conn:
                await pg.records(conn, _PUT_BACK, ids, at)
        except Exception as exc:
            log.warning("outbox_put_back_failed", tokens=len(ids), error=repr(exc))

    async def _publish_in_transaction(self) -> int:
        async with self.db.write() as conn:
            rows = (
                await conn.execute(
                    select(outbox.c.id, outbox.c.queue)
                    .where(outbox.c.available_at <= now())
                    .order_by(outbox.c.id)
                    .limit(BATCH)
                )
            ).all()
            if not rows:
                return 0
            await self.transport.publish([queue for _, queue in rows])
            await conn.execute(delete(outbox).where(outbox.c.id.in_([i for i, _ in rows])))
        self.published += len(rows)
        return len(rows)

    async def _next_due(self) -> float:
        """Seconds until the earliest token not yet due, capped at the poll interval, and
        at `HELD_RECHECK_S` if that token may be one another relay holds."""
        async with self.db.read() as conn:
            earliest = (await conn.execute(select(func.min(outbox.c.available_at)))).scalar()
        if earliest is None:
            return self.poll_s
        wait = float(earliest) - now()
        if wait <= TAKEN_FOR_S:
            wait = min(wait, HELD_RECHECK_S)
        return max(0.0, min(self.poll_s, wait))
