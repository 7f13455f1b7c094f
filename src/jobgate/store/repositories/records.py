"""Records: the per-item results of map stages, paged or streamed whole."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import func, select, tuple_
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.store.database import Database
from jobgate.store.repositories.paging import paged_total, without_total
from jobgate.store.tables import records

_COLUMNS = (
    records.c.stage,
    records.c.item_index,
    records.c.key,
    records.c.status,
    records.c.data,
    records.c.error,
)


async def page(
    conn: AsyncConnection, job_id: str, *, status: str | None = None, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """A page of a job's records (by stage, then item) and how many match in all, both
    from one statement's snapshot (`paged_total`)."""
    conditions: list[Any] = [records.c.job_id == job_id]
    if status is not None:
        conditions.append(records.c.status == status)
    rows = (
        (
            await conn.execute(
                select(*_COLUMNS, func.count().over().label("total"))
                .where(*conditions)
                .order_by(records.c.stage, records.c.item_index)
                .limit(limit)
                .offset(offset)
            )
        )
        .mappings()
        .all()
    )
    total = await paged_total(conn, rows, records, conditions, offset)
    return [without_total(row) for row in rows], total


async def stream(
    db: Database, job_id: str, *, status: str | None = None, batch: int = 500
) -> AsyncIterator[RowMapping]:
    """Every record of a job, in order, read in short transactions of `batch` rows.

    No connection is held between batches, so a slow reader does not pin one.
    """
    after: tuple[str, int] | None = None
    while True:
        query = select(*_COLUMNS).where(records.c.job_id == job_id)
        if status is not None:
            query = query.where(records.c.status == status)
        if after is not None:
            query = query.where(tuple_(records.c.stage, records.c.item_index) > after)
        query = query.order_by(records.c.stage, records.c.item_index).limit(batch)
        async with db.read() as conn:
            rows = list((await conn.execute(query)).mappings())
        for row in rows:
            yield row
        if len(rows) < batch:
            return
        after = (rows[-1]["stage"], rows[-1]["item_index"])
