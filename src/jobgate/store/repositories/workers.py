"""The workers table: who is alive, what they take, how busy they are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.store.tables import workers


async def register(conn: AsyncConnection, row: dict[str, Any]) -> None:
    """Insert (or replace) this worker's row."""
    await conn.execute(delete(workers).where(workers.c.id == row["id"]))
    await conn.execute(workers.insert().values(**row))


async def heartbeat(conn: AsyncConnection, worker_id: str, *, running: int, at: float) -> bool:
    """Refresh the worker's row; False if it was removed (then register again)."""
    result = await conn.execute(
        update(workers)
        .where(workers.c.id == worker_id)
        .values(running=running, last_seen_at=at)
        .returning(workers.c.id)
    )
    return result.first() is not None


async def unregister(conn: AsyncConnection, worker_id: str) -> None:
    await conn.execute(delete(workers).where(workers.c.id == worker_id))


async def lost(conn: AsyncConnection, *, silent_since: float) -> list[str]:
    """Workers whose last heartbeat is older than `silent_since`."""
    rows = await conn.execute(
        select(workers.c.id).where(workers.c.last_seen_at < silent_since).with_for_update()
    )
    return [row[0] for row in rows]


async def forget(conn: AsyncConnection, worker_ids: Sequence[str]) -> None:
    """Remove these workers' rows (they were declared lost)."""
    if worker_ids:
        await conn.execute(delete(workers).where(workers.c.id.in_(worker_ids)))
