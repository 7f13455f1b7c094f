"""The per-job event log: every visible change, numbered 1, 2, 3, ... per job."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.store.tables import events, jobs

Event = tuple[str, dict[str, Any]]


async def append(conn: AsyncConnection, job_id: str, items: Sequence[Event], *, at: float) -> int:
    """Append events to a job's log; returns the job's last `seq` afterwards.

    The job row's `last_seq` hands out the numbers, so concurrent writers for one job
    serialise on that row and never reuse a number.
    """
    if not items:
        return 0
    last = (
        await conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(last_seq=jobs.c.last_seq + len(items))
            .returning(jobs.c.last_seq)
        )
    ).scalar_one()
    first = last - len(items) + 1
    await conn.execute(
        insert(events),
        [
            {"job_id": job_id, "seq": first + i, "type": kind, "data": data, "created_at": at}
            for i, (kind, data) in enumerate(items)
        ],
    )
    return int(last)


async def page(
    conn: AsyncConnection, job_id: str, *, after: int = 0, limit: int = 100
) -> list[dict[str, Any]]:
    """Stored events of one job with `seq > after`, oldest first."""
    rows = await conn.execute(
        select(events.c.seq, events.c.type, events.c.data, events.c.created_at)
        .where(events.c.job_id == job_id, events.c.seq > after)
        .order_by(events.c.seq)
        .limit(limit)
    )
    return [dict(row._mapping) for row in rows]
