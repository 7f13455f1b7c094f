"""The workers table: who is alive, what they take, how busy they are."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, update
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
