"""Blob rows, and who may use them.

A caller may use a blob by its hash when it uploaded it (a `blob_grants` row), when
the blob is an input file of one of its jobs, or an artifact of one of them. Admins
may use any stored blob. Everything else is answered exactly like an unknown blob.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Insert, case, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.store.tables import artifacts, blob_grants, blobs, jobs


@dataclass(frozen=True)
class BlobRow:
    """A stored blob's size and detected type."""

    sha256: str
    size: int
    content_type: str


def _insert_ignore(conn: AsyncConnection, table: object) -> Insert:
    """`INSERT ... ON CONFLICT DO NOTHING` in the connection's dialect."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()  # type: ignore[arg-type]
    return sqlite.insert(table).on_conflict_do_nothing()  # type: ignore[arg-type]


UNKNOWN_TYPE = ""
"""The content type of a row garbage collection made for a file it found without one
(`retention.adopt_files`); recording the blob for real sets its type."""


def _insert_unmarking(conn: AsyncConnection) -> Insert:
    """Insert blob rows; a row already there keeps its values but loses any garbage
    collector's mark (and takes the new type if it had none).

    The conflicting row is locked either way (PostgreSQL locks it even when the
    update's condition is false), so a collection deleting it waits for this
    transaction and then sees the mark gone (`retention.sweep_blobs`).
    """
    if conn.dialect.name == "postgresql":
        statement: postgresql.Insert | sqlite.Insert = postgresql.insert(blobs)
    else:
        statement = sqlite.insert(blobs)
    untyped = blobs.c.content_type == UNKNOWN_TYPE
    return statement.on_conflict_do_update(
        index_elements=[blobs.c.sha256],
        set_={
            "gc_marked_at": None,
            "gc_stamp": None,
            "content_type": case(
                (untyped, statement.excluded.content_type), else_=blobs.c.content_type
            ),
        },
        where=or_(blobs.c.gc_marked_at.is_not(None), untyped),
    )


async def add(conn: AsyncConnection, items: Iterable[BlobRow], *, at: float) -> None:
    """Record stored blobs; blobs already recorded are left as they are, except that
    they are no longer candidates for garbage collection."""
    rows = {
        item.sha256: {
            "sha256": item.sha256,
            "size": item.size,
            "content_type": item.content_type,
            "created_at": at,
        }
        for item in items
    }
    if rows:
        await conn.execute(_insert_unmarking(conn), list(rows.values()))


async def grant(conn: AsyncConnection, sha256s: Iterable[str], *, owner: str, at: float) -> None:
    """Let `owner` use these (recorded) blobs."""
    rows = [{"sha256": s, "owner": owner, "created_at": at} for s in dict.fromkeys(sha256s)]
    if rows:
        # A blob granted is referenced again: no garbage collection may take it now.
        await conn.execute(
            update(blobs)
            .where(blobs.c.sha256.in_([row["sha256"] for row in rows]))
            .where(blobs.c.gc_marked_at.is_not(None))
            .values(gc_marked_at=None, gc_stamp=None)
        )
        await conn.execute(_insert_ignore(conn, blob_grants), rows)


async def find(conn: AsyncConnection, sha256s: Sequence[str]) -> dict[str, BlobRow]:
    """The recorded blobs among `sha256s`, by hash."""
    if not sha256s:
        return {}
    rows = await conn.execute(
        select(blobs.c.sha256, blobs.c.size, blobs.c.content_type).where(
            blobs.c.sha256.in_(set(sha256s))
        )
    )
    return {
        r.sha256: BlobRow(sha256=r.sha256, size=int(r.size), content_type=r.content_type)
        for r in rows
    }


async def usable(conn: AsyncConnection, sha256s: Sequence[str], *, owner: str | None) -> set[str]:
    """Which of `sha256s` the caller may use (`owner` None: an admin, any recorded blob)."""
    wanted = set(sha256s)
    if not wanted:
        return set()
    recorded = set(await find(conn, list(wanted)))
    if owner is None:
        return recorded
    allowed = {
        row[0]
        for row in await conn.execute(
            select(blob_grants.c.sha256).where(
                blob_grants.c.owner == owner, blob_grants.c.sha256.in_(recorded)
            )
        )
    }
    rest = recorded - allowed
    if rest:
        allowed |= {
            row[0]
            for row in await conn.execute(
                select(artifacts.c.sha256)
                .join(jobs, jobs.c.id == artifacts.c.job_id)
                .where(jobs.c.owner == owner, artifacts.c.sha256.in_(rest))
            )
        }
    for sha256 in sorted(recorded - allowed):
        if await _in_job_files(conn, sha256, owner):
            allowed.add(sha256)
    return allowed


async def _in_job_files(conn: AsyncConnection, sha256: str, owner: str) -> bool:
    """Whether `sha256` is an input file of one of `owner`'s jobs (JSON search)."""
    if conn.dialect.name == "postgresql":
        query = text(
            "SELECT 1 FROM jobs WHERE owner = :owner AND files @> CAST(:probe AS jsonb) LIMIT 1"
        ).bindparams(owner=owner, probe=json.dumps([{"sha256": sha256}]))
    else:
        query = text(
            "SELECT 1 FROM jobs, json_each(jobs.files) AS f "
            "WHERE jobs.owner = :owner AND json_extract(f.value, '$.sha256') = :sha256 LIMIT 1"
        ).bindparams(owner=owner, sha256=sha256)
    return (await conn.execute(query)).first() is not None
