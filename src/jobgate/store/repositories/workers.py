"""The workers table: who is alive, what they take, how busy they are.

On PostgreSQL a worker is also alive while its LISTEN connection is: that connection
carries `application_name(worker_id)`, so `pg_stat_activity` shows it for as long as
the worker's process holds it open, and not a moment longer (see docs/liveness.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Select,
    Text,
    Update,
    case,
    cast,
    column,
    delete,
    func,
    literal,
    select,
    table,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from jobgate.store.tables import tasks, workers

APPLICATION_PREFIX = "jobgate-worker:"
# PostgreSQL keeps 63 bytes of an application_name and turns anything but printable
# ASCII into "?"; an id that would not survive that is sent as a hash instead.
_PLAIN_ID = re.compile(r"[ -~]{1,48}")
_PLAIN_ID_SQL = "^[ -~]{1,48}$"

_activity = table("pg_stat_activity", column("datname"), column("application_name"))


def application_name(worker_id: str) -> str:
    """The `application_name` of a worker's LISTEN connection (`_application_name_sql`
    computes the same in SQL)."""
    if _PLAIN_ID.fullmatch(worker_id):
        return APPLICATION_PREFIX + worker_id
    return APPLICATION_PREFIX + hashlib.sha256(worker_id.encode()).hexdigest()[:32]


def _application_name_sql(worker_id: ColumnElement[str]) -> ColumnElement[str]:
    digest = func.left(func.encode(func.sha256(func.convert_to(worker_id, "UTF8")), "hex"), 32)
    return case(
        (worker_id.regexp_match(_PLAIN_ID_SQL), literal(APPLICATION_PREFIX) + worker_id),
        else_=literal(APPLICATION_PREFIX) + digest,
    )


def connected() -> ColumnElement[bool]:
    """PostgreSQL only: the worker's LISTEN connection is open (in this database)."""
    names = select(_activity.c.application_name).where(
        _activity.c.datname == func.current_database(),
        _activity.c.application_name.startswith(APPLICATION_PREFIX),
    )
    return _application_name_sql(workers.c.id).in_(names)


def is_live(
    *, dialect: str, at: float, lost_after_s: float, heartbeat_s: float
) -> ColumnElement[bool]:
    """Which rows are live workers (what `GET /v1/workers` and `/v1/health` show).

    A worker is live if it heartbeat within `lost_after_s`; on PostgreSQL also if its
    connection is open and it heartbeat within `heartbeat_s + lost_after_s` (workers
    that their connection vouches for heartbeat only every `heartbeat_s`).
    """
    recent = workers.c.last_seen_at >= at - lost_after_s
    if dialect != "postgresql":
        return recent
    return recent | (connected() & (workers.c.last_seen_at >= at - heartbeat_s - lost_after_s))


async def register(conn: AsyncConnection, row: dict[str, Any]) -> None:
    """Insert (or replace) this worker's row."""
    await conn.execute(delete(workers).where(workers.c.id == row["id"]))
    await conn.execute(workers.insert().values(**row))


def beat(worker_id: str, *, running: int, at: float) -> Update:
    """The heartbeat statement: it returns the worker's id, or no row if the row is gone."""
    return (
        update(workers)
        .where(workers.c.id == worker_id)
        .values(running=running, last_seen_at=at)
        .returning(workers.c.id)
    )


async def heartbeat(conn: AsyncConnection, worker_id: str, *, running: int, at: float) -> bool:
    """Refresh the worker's row; False if it was removed (then register again)."""
    result = await conn.execute(beat(worker_id, running=running, at=at))
    return result.first() is not None


async def unregister(conn: AsyncConnection, worker_id: str) -> None:
    await conn.execute(delete(workers).where(workers.c.id == worker_id))


async def lost(
    conn: AsyncConnection, *, silent_since: float, among: Sequence[str] | None = None
) -> list[str]:
    """Workers whose last heartbeat is older than `silent_since` (only those `among`
    these ids, if given), locked until the transaction ends."""
    query = select(workers.c.id).where(workers.c.last_seen_at < silent_since)
    if among is not None:
        if not among:
            return []
        query = query.where(workers.c.id.in_(among))
    rows = await conn.execute(query.with_for_update())
    return [row[0] for row in rows]


async def forget(conn: AsyncConnection, worker_ids: Sequence[str]) -> None:
    """Remove these workers' rows (they were declared lost)."""
    if worker_ids:
        await conn.execute(delete(workers).where(workers.c.id.in_(worker_ids)))


@dataclass(frozen=True)
class Suspect:
    """A worker that may be lost: its connection is gone, or it is long silent."""

    id: str
    last_seen_at: float
    connected: bool
    busy: bool = False
    """It holds a lease: a stage of it runs, and it renews (and is seen) twice a second."""


@dataclass(frozen=True)
class SweepCheck:
    """What one `sweep_check` found."""

    busy: bool
    expired: bool
    suspects: list[Suspect]
    next_check_s: float

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SweepCheck:
        """Read a row of `sweep_check` (from SQLAlchemy or straight from asyncpg)."""
        suspects = row["suspects"]
        if isinstance(suspects, str):
            suspects = json.loads(suspects)
        return cls(
            busy=bool(row["busy"]),
            expired=bool(row["expired"]),
            suspects=[
                Suspect(str(i), float(seen), bool(c), bool(b)) for i, seen, c, b in suspects or []
            ],
            next_check_s=float(row["next_check_s"]),
        )


def sweep_check(
    *,
    at: float,
    silent_before: float,
    busy_silent_before: float,
    busy_every_s: float,
    idle_every_s: float,
) -> Select[Any]:
    """PostgreSQL only: one cheap statement that says whether a sweep has work to do.

    It returns exactly one row: `busy` (any task exists, queued or running), `expired`
    (some lease ran out before `at`), `suspects` (JSON `[id, last_seen_at, connected,
    holds a lease]` of each worker whose connection is gone, whose last heartbeat is
    older than `silent_before`, or that holds a lease and was last seen before
    `busy_silent_before`) and `next_check_s` (`busy_every_s` while tasks exist, else
    `idle_every_s`: without a single task there is nothing a lost worker could hold).
    """
    alive = connected()
    holds = (
        select(tasks.c.id)
        .where(tasks.c.leased_by == workers.c.id, tasks.c.lease_expires_at.is_not(None))
        .exists()
    )
    suspects = (
        select(workers.c.id, workers.c.last_seen_at, alive.label("connected"), holds.label("busy"))
        .where(
            ~alive
            | (workers.c.last_seen_at < silent_before)
            | ((workers.c.last_seen_at < busy_silent_before) & holds)
        )
        .subquery()
    )
    listed = func.json_agg(
        func.json_build_array(
            suspects.c.id, suspects.c.last_seen_at, suspects.c.connected, suspects.c.busy
        )
    )
    busy = select(tasks.c.id).exists()
    return select(
        busy.label("busy"),
        select(tasks.c.id).where(tasks.c.lease_expires_at < at).exists().label("expired"),
        select(cast(func.coalesce(listed, text("'[]'::json")), Text))
        .scalar_subquery()
        .label("suspects"),
        case((busy, busy_every_s), else_=idle_every_s).label("next_check_s"),
    )
