"""Artifacts: files stages saved for their job, each pointing at a blob."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.store.repositories import blobs, events
from jobgate.store.tables import artifacts


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
    await blobs.add(conn, [blobs.BlobRow(sha256, size, content_type)], at=at)
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


async def artifact(conn: AsyncConnection, job_id: str, name: str) -> RowMapping | None:
    """One artifact of a job by name, or None."""
    row = await conn.execute(
        select(artifacts).where(artifacts.c.job_id == job_id, artifacts.c.name == name)
    )
    return row.mappings().first()


async def primary_artifact(conn: AsyncConnection, job_id: str) -> RowMapping | None:
    """The job's primary artifact (the latest, should there be several), or None."""
    row = await conn.execute(
        select(artifacts)
        .where(artifacts.c.job_id == job_id, artifacts.c.is_primary.is_(True))
        .order_by(artifacts.c.created_at.desc())
        .limit(1)
    )
    return row.mappings().first()
