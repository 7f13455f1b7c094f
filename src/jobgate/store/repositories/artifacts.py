"""Artifacts written by stages, and the blob rows behind them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.store.repositories import events
from jobgate.store.tables import artifacts, blobs


async def ensure_blob(
    conn: AsyncConnection, *, sha256: str, size: int, content_type: str, at: float
) -> None:
    """Insert the blob's row unless it is already there (content-addressed)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    await conn.execute(
        dialect.insert(blobs)
        .values(sha256=sha256, size=size, content_type=content_type, created_at=at)
        .on_conflict_do_nothing(index_elements=["sha256"])
    )


async def put(
    conn: AsyncConnection,
    *,
    job_id: str,
    stage: str,
    name: str,
    sha256: str,
    size: int,
    content_type: str,
    primary: bool,
    at: float,
) -> dict[str, Any]:
    """Record an artifact (replacing one of the same name) and its `artifact` event."""
    await ensure_blob(conn, sha256=sha256, size=size, content_type=content_type, at=at)
    await conn.execute(
        delete(artifacts).where(artifacts.c.job_id == job_id, artifacts.c.name == name)
    )
    await conn.execute(
        artifacts.insert().values(
            job_id=job_id,
            name=name,
            sha256=sha256,
            size=size,
            content_type=content_type,
            is_primary=primary,
            stage=stage,
            created_at=at,
        )
    )
    info = {"name": name, "sha256": sha256, "size": size, "content_type": content_type}
    await events.append(conn, job_id, [("artifact", info)], at=at)
    return {**info, "primary": primary}
