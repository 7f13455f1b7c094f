"""The per-job event log: every visible change, numbered 1, 2, 3, ... per job."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import JSON, Update, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.errors import NotFound
from jobgate.store import pg
from jobgate.store.database import CHANGES, EVENT_ROWS, NotedRows
from jobgate.store.tables import events, jobs

Event = tuple[str, dict[str, Any]]

# Statements on the hot path are built once: building one costs more than running it.
_INSERT = insert(events)


_ACTIVE = ("queued", "running")


@functools.cache
def _bump(job_columns: tuple[str, ...], while_active: bool = False) -> Update:
    """`last_seq += :n` (and `job_columns` set from `:v_<name>`) for job `:job_id`
    (only while it is queued or running, with `while_active`)."""
    values: dict[str, Any] = {name: bindparam(f"v_{name}") for name in job_columns}
    statement = update(jobs).where(jobs.c.id == bindparam("job_id"))
    if while_active:
        statement = statement.where(jobs.c.status.in_(_ACTIVE))
    return statement.values(**values, last_seq=jobs.c.last_seq + bindparam("n")).returning(
        jobs.c.last_seq
    )


async def append(
    conn: AsyncConnection,
    job_id: str,
    items: Sequence[Event],
    *,
    at: float,
    job_values: Mapping[str, Any] | None = None,
    while_active: bool = False,
) -> int:
    """Append events to a job's log; returns the job's last `seq` afterwards.

    The job row's `last_seq` hands out the numbers, so concurrent writers for one job
    serialise on that row and never reuse a number. `job_values` are more columns of
    the job's row to set in the same statement.

    Args:
        while_active: write only while the job is queued or running, and otherwise
            nothing (returning 0). A job's log closes with its terminal event; writers
            that do not hold the job's row (a running stage's report) append this way,
            and the check is made on the row they update, so a finish committed
            meanwhile is seen.

    Raises:
        NotFound: no such job (nothing is written).
    """
    if not items and not job_values:
        return 0
    job_values = job_values or {}
    if conn.dialect.name == "postgresql":
        last = await _append_pg(
            conn, job_id, items, at=at, job_values=job_values, while_active=while_active
        )
        if items and last:
            note(conn, job_id, last)
        return last
    params = {f"v_{name}": value for name, value in job_values.items()}
    bumped = await conn.execute(
        _bump(tuple(job_values), while_active), {"job_id": job_id, "n": len(items), **params}
    )
    found = bumped.scalar_one_or_none()
    if found is None:
        if while_active:
            return 0
        raise NotFound(f"no job {job_id!r}")
    last = int(found)
    if items:
        first = last - len(items) + 1
        await conn.execute(
            _INSERT, [row(job_id, first + i, item, at=at) for i, item in enumerate(items)]
        )
        note(conn, job_id, last)
    return last


def note(conn: AsyncConnection, job_id: str, last_seq: int) -> None:
    """Remember that this transaction took job `job_id`'s log to `last_seq`, for the
    event bus to announce once it commits (`Database.on_changes`)."""
    changes = _option(conn, CHANGES)
    if changes is not None and last_seq > changes.get(job_id, 0):
        changes[job_id] = last_seq


def rows_wanted(conn: AsyncConnection) -> bool:
    """Whether this process's live streams would use the rows of events this write
    appends (`note_rows`): a writer reads them back only then."""
    noted = _option(conn, EVENT_ROWS)
    return isinstance(noted, NotedRows) and noted.wanted


def note_rows(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Remember events this transaction appended, as rows (`id`, `job_id`, `seq`,
    `type`, `data`, and the job's `owner`), for this process's live streams to send
    once it commits (`Database.on_rows`) without reading them back."""
    noted = _option(conn, EVENT_ROWS)
    if noted is not None:
        noted.extend(rows)


def _option(conn: AsyncConnection, name: str) -> Any:
    """A `Database` execution option of a write connection (None elsewhere)."""
    sync = conn.sync_connection
    return sync.get_execution_options().get(name) if sync is not None else None


@functools.cache
def _append_pg_sql(job_columns: tuple[str, ...], while_active: bool = False) -> str:
    """`append` in one statement: $1 job id, $2 number of events, $3 now, $4 and $5 the
    events' types and JSON data, then one parameter per job column to set."""
    sets = [f"{name} = ${n}" for n, name in enumerate(job_columns, start=6)]
    sets.append("last_seq = last_seq + $2")
    active = " AND status IN ('queued', 'running')" if while_active else ""
    return f"""
WITH bumped AS (
    UPDATE jobs SET {", ".join(sets)} WHERE id = $1{active} RETURNING last_seq
), logged AS (
    INSERT INTO events (job_id, seq, type, data, created_at)
    SELECT $1, b.last_seq - $2 + u.n, u.type, u.data::jsonb, $3
    FROM bumped b, unnest($4::text[], $5::text[]) WITH ORDINALITY AS u(type, data, n)
)
SELECT last_seq FROM bumped"""  # noqa: S608 - column names come from the code, not input


async def _append_pg(
    conn: AsyncConnection,
    job_id: str,
    items: Sequence[Event],
    *,
    at: float,
    job_values: Mapping[str, Any],
    while_active: bool,
) -> int:
    # JSON travels as text: to the driver (SQLAlchemy's codec takes text) and to ::jsonb.
    values = [
        json.dumps(value) if isinstance(jobs.c[name].type, JSON) else value
        for name, value in job_values.items()
    ]
    last = await pg.value(
        conn,
        _append_pg_sql(tuple(job_values), while_active),
        job_id,
        len(items),
        at,
        [kind for kind, _ in items],
        [json.dumps(data) for _, data in items],
        *values,
    )
    if last is None:
        if while_active:
            return 0
        raise NotFound(f"no job {job_id!r}")
    return int(last)


def row(job_id: str, seq: int, item: Event, *, at: float) -> dict[str, Any]:
    """An `events` row for `item`, numbered `seq` (handed out by the job's `last_seq`)."""
    kind, data = item
    return {"job_id": job_id, "seq": seq, "type": kind, "data": data, "created_at": at}


_PAGE = (
    select(events.c.seq, events.c.type, events.c.data, events.c.created_at)
    .where(events.c.job_id == bindparam("job_id"), events.c.seq > bindparam("after"))
    .order_by(events.c.seq)
    .limit(bindparam("limit"))
)


async def page(
    conn: AsyncConnection, job_id: str, *, after: int = 0, limit: int = 100
) -> list[dict[str, Any]]:
    """Stored events of one job with `seq > after`, oldest first."""
    # Live streams read here at every wake-up: a statement built once (`pg.fetch`).
    return await pg.fetch(conn, _PAGE, {"job_id": job_id, "after": after, "limit": limit})
