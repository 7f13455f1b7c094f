"""Retention: purging finished jobs, and collecting the blobs nothing refers to any more.

A job purged goes with everything of its own: stages, tasks, events, records, artifacts
and webhook deliveries. What it had cost stays counted in `purged_usage`, per owner and
calendar month, so `/v1/me` and the monthly spend cap are not lowered by a purge.

Blobs are collected in two passes (`mark_blobs`, then `sweep_blobs` at least a grace
period later). A blob is referenced by an upload grant, an artifact, or a job's input
files; one that none refers to is marked, with its file's stamp. Recording the blob
again (an upload, an artifact, a job using it) clears the mark under the row's lock, so
a sweep never deletes a row a transaction is about to refer to. A sweep deletes the
rows still marked and unreferenced; their files are then withdrawn only if nobody has
published the same bytes since the mark (`BlobStore.withdraw`). A file with no row at
all (its writer died before committing the row, or a collector before removing the
file) is given one, marked, by `adopt_files`, and goes the same way. `docs/retention.md`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, delete, exists, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.blobs.base import BlobFile
from jobgate.ids import month_start
from jobgate.store.repositories.blobs import UNKNOWN_TYPE
from jobgate.store.repositories.jobs import TERMINAL
from jobgate.store.tables import (
    artifacts,
    blob_grants,
    blobs,
    events,
    jobs,
    purged_usage,
    records,
    stages,
    tasks,
    webhook_deliveries,
)


@dataclass(frozen=True, slots=True)
class Collected:
    """A blob whose row a sweep deleted: its file goes unless republished since `stamp`."""

    sha256: str
    stamp: int | None


async def purge_jobs(conn: AsyncConnection, *, finished_before: float, limit: int) -> int:
    """Delete up to `limit` jobs that finished before `finished_before`, oldest first,
    with all their rows; how many went.

    On PostgreSQL, jobs another transaction holds (a retry, a late outcome) are skipped,
    not waited for: the next purge takes them.
    """
    picked = (
        select(jobs.c.id, jobs.c.owner, jobs.c.created_at, jobs.c.actual_usd)
        .where(
            jobs.c.created_at < finished_before,  # read in order from the created_at index
            jobs.c.status.in_(sorted(TERMINAL)),
            jobs.c.finished_at < finished_before,
        )
        .order_by(jobs.c.created_at)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        picked = picked.with_for_update(skip_locked=True)
    rows = (await conn.execute(picked)).all()
    if not rows:
        return 0
    await _count_purged(conn, [(r.owner, r.created_at, r.actual_usd) for r in rows])
    ids = [r.id for r in rows]
    for table in (events, stages, tasks, records, artifacts, webhook_deliveries):
        await conn.execute(delete(table).where(table.c.job_id.in_(ids)))
    await conn.execute(delete(jobs).where(jobs.c.id.in_(ids)))
    return len(ids)


async def _count_purged(conn: AsyncConnection, rows: Sequence[tuple[str, float, float]]) -> None:
    totals: dict[tuple[str, float], list[float]] = defaultdict(lambda: [0, 0.0])
    for owner, created_at, actual_usd in rows:
        total = totals[(owner, month_start(created_at))]
        total[0] += 1
        total[1] += actual_usd or 0.0
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(purged_usage)
    statement = statement.on_conflict_do_update(
        index_elements=[purged_usage.c.owner, purged_usage.c.month],
        set_={
            "jobs": purged_usage.c.jobs + statement.excluded.jobs,
            "spent_usd": purged_usage.c.spent_usd + statement.excluded.spent_usd,
        },
    )
    await conn.execute(
        statement,
        [
            {"owner": owner, "month": month, "jobs": int(count), "spent_usd": spent}
            for (owner, month), (count, spent) in sorted(totals.items())
        ],
    )


async def purge_grants(conn: AsyncConnection, *, before: float, limit: int) -> int:
    """Delete up to `limit` upload grants made before `before`; how many went.

    A grant lets its owner use a blob by its hash; past retention it goes like the jobs
    (the owner's jobs that use the blob still grant it through their files).
    """
    old = select(blob_grants.c.sha256, blob_grants.c.owner).where(blob_grants.c.created_at < before)
    found = [tuple(row) for row in await conn.execute(old.limit(limit))]
    if found:
        pairs = tuple_(blob_grants.c.sha256, blob_grants.c.owner)
        await conn.execute(delete(blob_grants).where(pairs.in_(found)))
    return len(found)


def _unreferenced() -> list[ColumnElement[bool]]:
    return [
        ~exists().where(blob_grants.c.sha256 == blobs.c.sha256),
        ~exists().where(artifacts.c.sha256 == blobs.c.sha256),
    ]


async def _in_job_files(conn: AsyncConnection, sha256s: Collection[str]) -> set[str]:
    """Which of `sha256s` some job names among its input files (one pass over the jobs)."""
    if not sha256s:
        return set()
    if conn.dialect.name == "postgresql":
        query = text(
            "SELECT DISTINCT f ->> 'sha256' FROM jobs, jsonb_array_elements(jobs.files) AS f"
            " WHERE f ->> 'sha256' = ANY(CAST(:wanted AS text[]))"
        ).bindparams(wanted=sorted(sha256s))
    else:
        query = text(
            "SELECT DISTINCT json_extract(f.value, '$.sha256')"
            " FROM jobs, json_each(jobs.files) AS f"
            " WHERE json_extract(f.value, '$.sha256') IN (SELECT value FROM json_each(:wanted))"
        ).bindparams(wanted=json.dumps(sorted(sha256s)))
    return {row[0] for row in await conn.execute(query)}


Cursor = tuple[float, str]
"""Where a pass over the blobs (by `created_at`, then hash) got to."""


async def mark_blobs(
    conn: AsyncConnection, *, at: float, limit: int, after: Cursor | None = None
) -> tuple[list[str], Cursor | None]:
    """Mark the blobs nothing refers to among the next `limit` unmarked ones after
    `after` (and unmark marked ones that are referenced again).

    Returns:
        The hashes newly marked, whose stamps the caller then records with
        `stamp_blobs`; and where to go on from next time (None: the pass is over, start
        again from the first). Blobs only a job's files name are looked at and passed
        over, so however many there are, the blobs after them get their turn.
    """
    await conn.execute(
        update(blobs)
        .where(blobs.c.gc_marked_at.is_not(None), ~and_(*_unreferenced()))
        .values(gc_marked_at=None, gc_stamp=None)
    )
    page = select(blobs.c.sha256, blobs.c.created_at).where(
        blobs.c.gc_marked_at.is_(None), *_unreferenced()
    )
    if after is not None:
        page = page.where(tuple_(blobs.c.created_at, blobs.c.sha256) > tuple_(*after))
    rows = (
        await conn.execute(page.order_by(blobs.c.created_at, blobs.c.sha256).limit(limit))
    ).all()
    candidates = [row.sha256 for row in rows]
    unused = sorted(set(candidates) - await _in_job_files(conn, candidates))
    if unused:
        await conn.execute(
            update(blobs)
            .where(blobs.c.sha256.in_(unused), blobs.c.gc_marked_at.is_(None))
            .values(gc_marked_at=at)
        )
    cursor = (float(rows[-1].created_at), str(rows[-1].sha256)) if len(rows) == limit else None
    return unused, cursor


async def without_rows(conn: AsyncConnection, files: Sequence[BlobFile]) -> list[BlobFile]:
    """The files among `files` that have no blob row."""
    if not files:
        return []
    wanted = {file.sha256: file for file in files}
    known = await conn.execute(select(blobs.c.sha256).where(blobs.c.sha256.in_(wanted)))
    for (sha256,) in known:
        wanted.pop(sha256, None)
    return list(wanted.values())


async def adopt_files(conn: AsyncConnection, files: Sequence[BlobFile], *, at: float) -> list[str]:
    """Give each file of `files` (found with no blob row) a row marked unreferenced at
    `at`, with the stamp it was listed with, for a later `sweep_blobs` to collect it;
    the hashes adopted.

    A file whose row appeared since is skipped; a writer recording the blob after this
    leaves the row unmarked, with its type (`blobs.add`): the file stays.
    """
    if not files:
        return []
    if conn.dialect.name == "postgresql":
        statement: postgresql.Insert | sqlite.Insert = postgresql.insert(blobs)
    else:
        statement = sqlite.insert(blobs)
    rows = [
        {
            "sha256": file.sha256,
            "size": file.size,
            "content_type": UNKNOWN_TYPE,
            "created_at": at,
            "gc_marked_at": at,
            "gc_stamp": file.stamp,
        }
        for file in files
    ]
    adopted = await conn.execute(
        statement.on_conflict_do_nothing(index_elements=[blobs.c.sha256]).returning(blobs.c.sha256),
        rows,
    )
    return sorted(row[0] for row in adopted)


async def stamp_blobs(conn: AsyncConnection, stamps: dict[str, int | None], *, at: float) -> None:
    """Record the stamps of blobs `mark_blobs` marked at `at` (None: no file then)."""
    for sha256, stamp in stamps.items():
        await conn.execute(
            update(blobs)
            .where(blobs.c.sha256 == sha256, blobs.c.gc_marked_at == at)
            .values(gc_stamp=stamp)
        )


async def sweep_blobs(
    conn: AsyncConnection, *, marked_before: float, limit: int
) -> list[Collected]:
    """Delete up to `limit` blob rows marked before `marked_before` that nothing refers
    to still; the caller withdraws their files once this transaction has committed."""
    marked = [
        row[0]
        for row in await conn.execute(
            select(blobs.c.sha256)
            .where(blobs.c.gc_marked_at < marked_before, *_unreferenced())
            .order_by(blobs.c.gc_marked_at)
            .limit(limit)
        )
    ]
    named = await _in_job_files(conn, marked)
    if named:  # a job took it by its hash just as it was marked: it is in use
        await conn.execute(
            update(blobs).where(blobs.c.sha256.in_(named)).values(gc_marked_at=None, gc_stamp=None)
        )
    unused = sorted(set(marked) - named)
    if not unused:
        return []
    deleted = await conn.execute(
        delete(blobs)
        .where(blobs.c.sha256.in_(unused), blobs.c.gc_marked_at < marked_before, *_unreferenced())
        .returning(blobs.c.sha256, blobs.c.gc_stamp)
    )
    return [Collected(sha256, stamp) for sha256, stamp in deleted]
