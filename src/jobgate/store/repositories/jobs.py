"""Jobs: creating them with their first tasks, reading them, cancelling and retrying."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Float, String, Table, bindparam, func, insert, select, text, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.errors import Conflict, NotFound
from jobgate.pipelines import Pipeline, Registry
from jobgate.store import pg
from jobgate.store.repositories import events, scheduling, tasks
from jobgate.store.repositories.paging import paged_total
from jobgate.store.tables import (
    ACTIVE_JOBS,
    ACTIVE_STATUSES,
    artifacts,
    jobs,
    outbox,
    owner_clocks,
    purged_usage,
    stages,
)
from jobgate.store.tables import events as event_table
from jobgate.store.tables import tasks as task_table

DEFAULT_STRIDE_S = 1.0
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = frozenset(ACTIVE_STATUSES)


@dataclass
class NewJob:
    """A validated submission, ready to be written."""

    id: str
    pipeline: Pipeline
    owner: str
    params: dict[str, Any]
    files: list[dict[str, Any]]
    priority: int
    budget_usd: float
    estimated_usd: float
    correlation_id: str | None = None
    webhook: dict[str, Any] | None = None


@dataclass
class JobSnapshot:
    """A job row with its stages (in pipeline order) and artifacts."""

    job: Mapping[str, Any]
    stages: list[Mapping[str, Any]] = field(default_factory=list)
    artifacts: list[Mapping[str, Any]] = field(default_factory=list)


# Built once: building a statement costs more than running it.
_INSERT_JOBS = insert(jobs)
_INSERT_STAGES = insert(stages)
_INSERT_EVENTS = insert(event_table)
_INSERT_TASKS = insert(task_table)


async def create(
    conn: AsyncConnection,
    new_jobs: Sequence[NewJob],
    *,
    at: float,
    aging_s: float = tasks.DEFAULT_AGING_S,
    stride_s: float = DEFAULT_STRIDE_S,
    notice: str = "",
    loan: tasks.SlotLoan | None = None,
) -> list[JobSnapshot]:
    """Insert jobs, their stages, first events and first tasks: one submit, one transaction.

    Args:
        aging_s: seconds of waiting one priority point is worth.
        stride_s: how far each job moves its owner's fair-share clock (0: plain FIFO).
        notice: on PostgreSQL, the payload of the notification that wakes workers
            (`PostgresWakeups.expect`).
        loan: on PostgreSQL, an idle worker's free slots: when every job's root tasks
            can start on them, they do, leased to it (`tasks.SlotLoan`; `loan.started`
            gets them); else none does.

    Returns:
        The new jobs as they are now stored, without reading them back.
    """
    on_postgres = conn.dialect.name == "postgresql"
    spans: dict[str, float] = {}
    if on_postgres and stride_s > 0:
        # The insert statement moves the owners' clocks itself; keys are offsets from
        # where the owner's clock ends, made absolute below.
        fair_keys, spans = _clock_offsets(new_jobs, stride_s)
    else:
        fair_keys = await _fair_keys(conn, new_jobs, at=at, stride_s=stride_s)
    job_rows: list[dict[str, Any]] = []
    stage_rows: list[dict[str, Any]] = []
    event_rows: list[dict[str, Any]] = []
    task_rows: list[dict[str, Any]] = []
    lending = loan is not None and on_postgres
    # All of the statement's jobs start, or none: the statement cannot know their claim
    # order (an owner's fair-share clock ends only as it runs), so starting some would
    # let them skip others of the same statement.
    start_all = lending and loan is not None and _all_startable(new_jobs, loan)
    for job in new_jobs:
        pipeline = job.pipeline
        order = pipeline.topological_order()
        first_events: list[tuple[str, dict[str, Any]]] = []
        start_events: list[tuple[str, dict[str, Any]]] = []
        starts = start_all
        expected = 0
        for position, name in enumerate(order):
            stage = pipeline.stages[name]
            is_root = not stage.after
            running = starts and is_root
            items = len(job.files) if stage.map_over == "files" else 0
            if stage.is_map and stage.map_over == "files":
                expected += items
            stage_row = {
                "job_id": job.id,
                "name": name,
                "position": position,
                "status": "running" if running else "queued" if is_root else "pending",
                "attempt": 1 if running else 0,
                "progress": 0.0,
                "is_map": stage.is_map,
                "items_total": items,
                "items_succeeded": 0,
                "items_failed": 0,
            }
            if lending:
                stage_row["started_at"] = at if running else None
            stage_rows.append(stage_row)
            if is_root:
                first_events.append(
                    ("stage_update", {"stage": name, "status": "queued", "attempt": 0})
                )
                if running:
                    start_events.append(
                        ("stage_update", {"stage": name, "status": "running", "attempt": 1})
                    )
                indexes: list[int | None] = list(range(items)) if stage.is_map else [None]
                for i in indexes:
                    row = tasks.task_row(
                        job.id,
                        job.owner,
                        pipeline.name,
                        stage,
                        i,
                        job.priority,
                        fair_keys[job.id],
                        attempt=0,
                        at=at,
                        aging_s=aging_s,
                    )
                    if loan is not None and lending:
                        _lend(row, loan if running else None, len(task_rows))
                    task_rows.append(row)
        first_events += start_events
        job_row: dict[str, Any] = {
            "id": job.id,
            "pipeline": pipeline.name,
            "pipeline_version": pipeline.version,
            "owner": job.owner,
            "status": "running" if starts else "queued",
            "cancel_requested": False,
            "priority": job.priority,
            "params": job.params,
            "files": job.files,
            "correlation_id": job.correlation_id,
            "webhook": job.webhook,
            "estimated_usd": job.estimated_usd,
            "actual_usd": 0.0,
            "budget_usd": job.budget_usd,
            "progress": 0.0,
            "records_expected": expected,
            "records_succeeded": 0,
            "records_failed": 0,
            "last_seq": len(first_events),
            "fair_key": fair_keys[job.id],
            "created_at": at,
        }
        if lending:
            # As a claim leaves a job: its stage is the first one started.
            job_row["stage"] = start_events[0][1]["stage"] if starts else None
            job_row["started_at"] = at if starts else None
        job_rows.append(job_row)
        event_rows.extend(
            {"job_id": job.id, "seq": i + 1, "type": kind, "data": data, "created_at": at}
            for i, (kind, data) in enumerate(first_events)
        )
        events.note(conn, job.id, len(first_events))
    ready = [(row["queue"], row["available_at"]) for row in task_rows if not row.get("lease_token")]
    if on_postgres:
        tokens, wake = tasks.ready_tokens(conn, ready, at=at)
        keyed: list[tuple[Table, str]] = []
        if lending:
            keyed.append((task_table, "lease_token"))
        # This process's global streams then send the first events without a read.
        hand_over = bool(event_rows) and events.rows_wanted(conn)
        if hand_over:
            keyed.append((event_table, "job_id || '/' || seq"))
        inserted = await pg.insert_many(
            conn,
            [
                (jobs, job_rows),
                (stages, stage_rows),
                (event_table, event_rows),
                (task_table, task_rows),
                (outbox, tokens),
            ],
            notify=tasks.CHANNEL if wake else None,
            notice=notice,
            clocks=(at, spans),
            keyed=keyed,
        )
        ids = iter(inserted.ids)
        if inserted.clocks:
            for row in job_rows:
                row["fair_key"] += inserted.clocks[row["owner"]]
        if loan is not None and lending:
            loan.started = _started(new_jobs, task_rows, next(ids))
            loan.left_ready = bool(ready)
        if hand_over:
            _hand_over(conn, new_jobs, event_rows, next(ids))
    else:
        await conn.execute(_INSERT_JOBS, job_rows)
        await conn.execute(_INSERT_STAGES, stage_rows)
        if event_rows:
            await conn.execute(_INSERT_EVENTS, event_rows)
        if task_rows:
            await conn.execute(_INSERT_TASKS, task_rows)
            await tasks.notify_ready(conn, ready, at=at)
    # Map stages whose item list is empty (no files) finish at once.
    finished_early = False
    for job in new_jobs:
        for stage in job.pipeline.stages.values():
            if not stage.after and stage.is_map and not job.files:
                await scheduling.finish_map_stage(
                    conn, job.id, job.pipeline, stage.name, at=at, aging_s=aging_s
                )
                finished_early = True
    if finished_early:
        return await load(conn, [job.id for job in new_jobs])
    unset = {"stage": None, "result": None, "error": None, "started_at": None, "finished_at": None}
    unset_stage = {"output": None, "error": None, "started_at": None, "finished_at": None}
    by_job: dict[str, list[Mapping[str, Any]]] = {job.id: [] for job in new_jobs}
    for row in stage_rows:
        by_job[row["job_id"]].append({**unset_stage, **row})
    return [JobSnapshot(job={**unset, **row}, stages=by_job[row["id"]]) for row in job_rows]


def _hand_over(
    conn: AsyncConnection,
    new_jobs: Sequence[NewJob],
    event_rows: Sequence[Mapping[str, Any]],
    ids: Mapping[str, int],
) -> None:
    """Note the events written, with the ids the statement gave them, for this
    process's live streams (`events.note_rows`)."""
    owners = {job.id: job.owner for job in new_jobs}
    events.note_rows(
        conn,
        [
            {**row, "id": ids[f"{row['job_id']}/{row['seq']}"], "owner": owners[row["job_id"]]}
            for row in event_rows
        ],
    )


def _all_startable(new_jobs: Sequence[NewJob], loan: tasks.SlotLoan) -> bool:
    """Whether every job may start on `loan`: each root stage is one task (not a map),
    of a queue and pipeline the worker runs, and they all fit in its slots."""
    needed = 0
    for job in new_jobs:
        if job.pipeline.name not in loan.pipelines:
            return False
        for stage in job.pipeline.stages.values():
            if stage.after:
                continue
            if stage.is_map or stage.queue not in loan.queues:
                return False
            needed += 1
    return needed <= loan.slots


def _lend(row: dict[str, Any], loan: tasks.SlotLoan | None, position: int) -> None:
    """A task row (the statement's `position`-th) as `loan`'s claim leaves it, leased to
    its worker (None: not leased; every row of one statement has the same columns)."""
    if loan is None:
        row.update(lease_token=None, lease_expires_at=None, leased_by=None)
        return
    # Unique as a claim's (the loan's random prefix, then the row's place), and as short.
    token = f"{loan.token_prefix}n{position}"
    row.update(
        lease_token=token,
        lease_expires_at=loan.expires_at,
        leased_by=loan.worker_id,
        attempt=1,
        deliveries=1,
    )


def _started(
    new_jobs: Sequence[NewJob], task_rows: Sequence[Mapping[str, Any]], ids: Mapping[str, int]
) -> list[tasks.Claimed]:
    """The leased rows of `task_rows` as claims, with the ids the statement gave them."""
    by_id = {job.id: job for job in new_jobs}
    started: list[tasks.Claimed] = []
    for row in task_rows:
        token = row["lease_token"]
        if token is None:
            continue
        job = by_id[row["job_id"]]
        task = {**row, "id": ids[token]}
        job_fields = {
            "params": job.params,
            "files": job.files,
            "budget_usd": job.budget_usd,
            "actual_usd": 0.0,
            "cancel_requested": False,
        }
        started.append(tasks.Claimed.from_rows(task, job_fields))
    return started


def _advance_clock_sqlite() -> Any:
    """Upsert: the owner's clock becomes max(clock, :b_at) + :b_span; returns it."""
    start = bindparam("b_at", type_=Float)
    span = bindparam("b_span", type_=Float)
    return (
        sqlite.insert(owner_clocks)
        .values(owner=bindparam("b_owner", type_=String), clock=start + span)
        .on_conflict_do_update(
            index_elements=["owner"], set_={"clock": func.max(owner_clocks.c.clock, start) + span}
        )
        .returning(owner_clocks.c.clock)
    )


_ADVANCE_CLOCK_SQLITE = _advance_clock_sqlite()


def _clock_offsets(
    new_jobs: Sequence[NewJob], stride_s: float
) -> tuple[dict[str, float], dict[str, float]]:
    """For `pg.insert_many`'s clocks: each job's key as an offset from where its owner's
    clock will end, and how far each owner's clock moves."""
    counts: Counter[str] = Counter(job.owner for job in new_jobs)
    spans = {owner: count * stride_s for owner, count in counts.items()}
    seen: Counter[str] = Counter()
    offsets: dict[str, float] = {}
    for job in new_jobs:
        offsets[job.id] = seen[job.owner] * stride_s - spans[job.owner]
        seen[job.owner] += 1
    return offsets, spans


def needs_transaction(new_jobs: Sequence[NewJob]) -> bool:
    """Whether `create` writes these jobs in more than one statement on PostgreSQL (a
    map stage over files with no files, finished at once); if not, it may run on an
    autocommit connection (`Database.autocommit()`)."""
    return any(
        not stage.after and stage.is_map and not job.files
        for job in new_jobs
        for stage in job.pipeline.stages.values()
    )


async def _fair_keys(
    conn: AsyncConnection, new_jobs: Sequence[NewJob], *, at: float, stride_s: float
) -> dict[str, float]:
    """Each job's place in its owner's order, advancing the owner's clock.

    An owner's jobs are spaced `stride_s` apart, starting from `max(now, the owner's
    clock)`. An owner with a backlog therefore queues behind itself, while another
    owner's new job starts at now: it waits only for the jobs whose keys came before
    now, never for the whole backlog.
    """
    if stride_s <= 0:
        return {job.id: at for job in new_jobs}
    by_owner: dict[str, list[str]] = {}
    for job in new_jobs:
        by_owner.setdefault(job.owner, []).append(job.id)
    keys: dict[str, float] = {}
    for owner, ids in sorted(by_owner.items()):
        # One statement moves the owner's clock past these jobs and returns where it
        # ends (SQLite has one writer at a time; PostgreSQL moves clocks in `create`'s
        # insert statement).
        span = len(ids) * stride_s
        end = (
            await conn.execute(
                _ADVANCE_CLOCK_SQLITE, {"b_owner": owner, "b_at": at, "b_span": span}
            )
        ).scalar_one()
        start = float(end) - span
        keys.update((job_id, start + i * stride_s) for i, job_id in enumerate(ids))
    return keys


async def load(conn: AsyncConnection, ids: Sequence[str]) -> list[JobSnapshot]:
    """Snapshots of the jobs with these ids, in the order given (unknown ids skipped)."""
    if not ids:
        return []
    rows = (await conn.execute(select(jobs).where(jobs.c.id.in_(ids)))).mappings().all()
    by_id = {row["id"]: JobSnapshot(job=dict(row)) for row in rows}
    if by_id:
        for row in (
            await conn.execute(
                select(stages).where(stages.c.job_id.in_(by_id)).order_by(stages.c.position)
            )
        ).mappings():
            by_id[row["job_id"]].stages.append(dict(row))
        for row in (
            await conn.execute(
                select(artifacts)
                .where(artifacts.c.job_id.in_(by_id))
                .order_by(artifacts.c.created_at, artifacts.c.name)
            )
        ).mappings():
            by_id[row["job_id"]].artifacts.append(dict(row))
    return [by_id[i] for i in ids if i in by_id]


async def get(conn: AsyncConnection, job_id: str, *, owner: str | None = None) -> JobSnapshot:
    """One job; `owner` (when given) must own it.

    Raises:
        NotFound: no such job, or another owner's.
    """
    found = await load(conn, [job_id])
    if not found or (owner is not None and found[0].job["owner"] != owner):
        raise NotFound(f"no job {job_id!r}")
    return found[0]


async def owned_ids(conn: AsyncConnection, ids: Sequence[str], owner: str | None) -> list[str]:
    """Which of `ids` exist and belong to `owner` (any owner when None)."""
    query = select(jobs.c.id).where(jobs.c.id.in_(ids))
    if owner is not None:
        query = query.where(jobs.c.owner == owner)
    return [row[0] for row in await conn.execute(query)]


_COUNT_ACTIVE = (
    select(func.count())
    .select_from(jobs)
    # The literal condition is the one of the partial index `ix_jobs_owner_active`.
    .where(jobs.c.owner == bindparam("owner"), text(ACTIVE_JOBS))
)


async def spent_since(conn: AsyncConnection, owner: str, since: float) -> float:
    """What `owner`'s jobs created at or after `since` (a month's start) have cost so
    far, in USD, purged jobs included."""
    total = await conn.scalar(
        select(func.coalesce(func.sum(jobs.c.actual_usd), 0.0)).where(
            jobs.c.owner == owner, jobs.c.created_at >= since
        )
    )
    purged = await conn.scalar(
        select(func.coalesce(func.sum(purged_usage.c.spent_usd), 0.0)).where(
            purged_usage.c.owner == owner, purged_usage.c.month >= since
        )
    )
    return float(total or 0.0) + float(purged or 0.0)


async def count_active(conn: AsyncConnection, owner: str) -> int:
    """How many of `owner`'s jobs are queued or running."""
    return int((await conn.execute(_COUNT_ACTIVE, {"owner": owner})).scalar_one())


# pg_advisory_xact_lock(class, key): "jgac", and the owner's hash.
_ACTIVE_LOCK_CLASS = 0x6A676163


async def count_active_locked(conn: AsyncConnection, owner: str) -> int:
    """`count_active`, in a write transaction that holds, until it ends, the right to add
    to `owner`'s active jobs: a transaction of another process that asks it too waits,
    then counts what this one wrote. (SQLite's single writer already serialises them.)"""
    await pg.lock_key(conn, _ACTIVE_LOCK_CLASS, owner)
    return await count_active(conn, owner)


async def search(
    conn: AsyncConnection,
    *,
    owner: str | None,
    statuses: Sequence[str] = (),
    pipeline: str | None = None,
    created_after: float | None = None,
    created_before: float | None = None,
    limit: int,
    offset: int,
) -> tuple[list[str], int]:
    """Ids of matching jobs, newest first, and how many match in all."""
    conditions = []
    if owner is not None:
        conditions.append(jobs.c.owner == owner)
    if statuses:
        conditions.append(jobs.c.status.in_(statuses))
    if pipeline:
        conditions.append(jobs.c.pipeline == pipeline)
    if created_after is not None:
        conditions.append(jobs.c.created_at > created_after)
    if created_before is not None:
        conditions.append(jobs.c.created_at < created_before)
    rows = (
        (
            await conn.execute(
                select(jobs.c.id, func.count().over().label("total"))
                .where(*conditions)
                .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
                .limit(limit)
                .offset(offset)
            )
        )
        .mappings()
        .all()
    )
    total = await paged_total(conn, rows, jobs, conditions, offset)
    return [row["id"] for row in rows], total


async def lock(conn: AsyncConnection, job_id: str) -> RowMapping | None:
    """The job row, locked for update (PostgreSQL; SQLite writers are already exclusive)."""
    return (
        (await conn.execute(select(jobs).where(jobs.c.id == job_id).with_for_update()))
        .mappings()
        .first()
    )


async def cancel(conn: AsyncConnection, job_id: str, *, owner: str | None, at: float) -> bool:
    """Cancel a job: at once if nothing of it runs, else by flag. True when done at once.

    Raises:
        NotFound: no such job (or another owner's).
        Conflict: the job already finished.
    """
    job = await lock(conn, job_id)
    if job is None or (owner is not None and job["owner"] != owner):
        raise NotFound(f"no job {job_id!r}")
    if job["status"] in TERMINAL:
        raise Conflict(f"job {job_id} is already {job['status']}")
    # Waiting tasks never start; running ones (and any being claimed right now) see
    # the flag and stop.
    await tasks.drop_waiting(conn, job_id)
    running = (
        await conn.execute(
            select(func.count()).select_from(task_table).where(task_table.c.job_id == job_id)
        )
    ).scalar_one()
    if running:
        if not job["cancel_requested"]:
            await conn.execute(
                update(jobs).where(jobs.c.id == job_id).values(cancel_requested=True)
            )
            await events.append(
                conn,
                job_id,
                [("message", {"level": "info", "text": "cancellation requested", "stage": None})],
                at=at,
            )
        return False
    await scheduling.finalize(
        conn, job_id, "cancelled", at=at, webhook=tasks.webhook_of(job["webhook"])
    )
    return True


async def retry(
    conn: AsyncConnection,
    job_id: str,
    *,
    owner: str | None,
    registry: Registry,
    at: float,
    aging_s: float,
    room: Callable[[AsyncConnection, str], Awaitable[None]] | None = None,
) -> None:
    """Queue a failed or cancelled job again, resuming at the stages that did not succeed.

    Args:
        aging_s: seconds of waiting one priority point is worth (the claim order).
        room: awaited with the job's owner before the job is queued again, in this
            transaction; what it raises (the active-jobs cap's 429) changes nothing.

    Raises:
        NotFound: no such job (or another owner's).
        Conflict: the job is not failed or cancelled.
    """
    job = await lock(conn, job_id)
    if job is None or (owner is not None and job["owner"] != owner):
        raise NotFound(f"no job {job_id!r}")
    if job["status"] not in ("failed", "cancelled"):
        raise Conflict(
            f"only a failed or cancelled job can be retried; job {job_id} is {job['status']}"
        )
    if await conn.scalar(
        select(func.count()).select_from(task_table).where(task_table.c.job_id == job_id)
    ):
        raise Conflict(f"job {job_id} still has a stage stopping; retry in a moment")
    pipeline = registry.get(job["pipeline"])
    done = {
        row[0]
        for row in await conn.execute(
            select(stages.c.name).where(stages.c.job_id == job_id, stages.c.status == "succeeded")
        )
    }
    if room is not None and not done.issuperset(pipeline.stages):
        await room(conn, job["owner"])
    await conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id)
        .values(status="queued", error=None, result=None, finished_at=None, cancel_requested=False)
    )
    await conn.execute(
        update(stages)
        .where(stages.c.job_id == job_id, stages.c.status != "succeeded")
        .values(status="pending", error=None, finished_at=None, progress=0.0)
    )
    if done.issuperset(pipeline.stages):
        # Every stage had succeeded (the last one while a cancel waited for it to stop):
        # nothing is left to run, so the job ends now as it would have then.
        result = await scheduling.job_result(conn, job_id, pipeline)
        webhook = tasks.webhook_of(job["webhook"])
        await scheduling.finalize(conn, job_id, "succeeded", at=at, result=result, webhook=webhook)
        return
    for name in pipeline.topological_order():
        stage = pipeline.stages[name]
        if name not in done and all(dep in done for dep in stage.after):
            await scheduling.enqueue_stage(conn, job_id, pipeline, name, at=at, aging_s=aging_s)
