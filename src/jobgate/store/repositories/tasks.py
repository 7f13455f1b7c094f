"""Stage tasks: enqueueing, claiming under a lease, and recording each outcome.

Every outcome write is fenced by the lease token: a worker whose lease expired (and
whose task was handed to another worker) finds its token gone, raises `LeaseLost`,
and writes nothing.
"""

from __future__ import annotations

import functools
import json
import math
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Float,
    Integer,
    Select,
    String,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.errors import JobgateError
from jobgate.pipelines import Registry, Stage
from jobgate.store import pg
from jobgate.store.database import OUTBOX
from jobgate.store.repositories import events
from jobgate.store.tables import events as event_table
from jobgate.store.tables import jobs, outbox, stages, workers
from jobgate.store.tables import tasks as task_table

DEFAULT_AGING_S = 10.0
CHANNEL = "jobgate_tasks"
_CAPS_LOCK = 0x6A6F6267  # an advisory-lock key of jobgate's own
_NOTIFY = text(f"SELECT pg_notify('{CHANNEL}', '')")


class LeaseLost(JobgateError):
    """This worker's lease on the task was taken over; its outcome is not recorded."""


@dataclass
class Claimed:
    """A task this worker holds a lease on, with what its stage code needs."""

    task_id: int
    lease_token: str
    lease_expires_at: float
    job_id: str
    owner: str
    pipeline: str
    stage: str
    queue: str
    item_index: int | None
    attempt: int
    deliveries: int
    params: dict[str, Any]
    files: list[dict[str, Any]]
    budget_usd: float
    actual_usd: float
    cancel_requested: bool
    outputs: dict[str, Any] = field(default_factory=dict)
    item: Any = None
    item_key: str | None = None

    @classmethod
    def from_rows(cls, task: Mapping[Any, Any], job: Mapping[Any, Any] | None = None) -> Claimed:
        """A `tasks` row as a claim; without its `jobs` row (the sweeper's case) the job's
        fields are left empty."""
        return cls(
            task_id=task["id"],
            lease_token=task["lease_token"],
            lease_expires_at=task["lease_expires_at"],
            job_id=task["job_id"],
            owner=task["owner"],
            pipeline=task["pipeline"],
            stage=task["stage"],
            queue=task["queue"],
            item_index=task["item_index"],
            attempt=task["attempt"],
            deliveries=task["deliveries"],
            params=job["params"] if job else {},
            files=job["files"] if job else [],
            budget_usd=job["budget_usd"] if job else 0.0,
            actual_usd=job["actual_usd"] if job else 0.0,
            cancel_requested=bool(job["cancel_requested"]) if job else False,
        )


@dataclass
class SlotLoan:
    """Free slots an idle worker lends one submit statement (`jobs.create`): when all of
    the statement's jobs fit, their root tasks are written already leased to it, their
    stages and jobs running, as its claim would have left them; the statement is their
    claim.

    Once the statement committed, `started` holds those tasks, for the worker to run,
    and `left_ready` says whether it left other tasks ready to be claimed.
    """

    worker_id: str
    token_prefix: str
    expires_at: float
    queues: frozenset[str]
    pipelines: frozenset[str]
    slots: int
    started: list[Claimed] = field(default_factory=list)
    left_ready: bool = True


@dataclass
class Report:
    """What a running stage produced since the last flush."""

    events: list[events.Event] = field(default_factory=list)
    progress: float | None = None
    cost_delta: float = 0.0
    # For putting an unwritten report back: how many of `events` were buffered as they
    # are (the rest are made from the cost and the progress), and the progress message.
    buffered: int = 0
    progress_message: str | None = None

    def __bool__(self) -> bool:
        return bool(self.events) or self.progress is not None or self.cost_delta != 0.0


async def notify_ready(
    conn: AsyncConnection, ready: Sequence[tuple[str, float]], *, at: float
) -> None:
    """Announce tasks this transaction made ready, as `(queue, available_at)` pairs.

    With an external transport each one leaves an outbox token, published once due.
    On PostgreSQL, listening workers and relays are woken when (and only if) the
    transaction commits, if any of them is due at once.
    """
    tokens, wake = ready_tokens(conn, ready, at=at)
    if tokens:
        await conn.execute(insert(outbox), tokens)
    if wake:
        await conn.execute(_NOTIFY)


def ready_tokens(
    conn: AsyncConnection, ready: Sequence[tuple[str, float]], *, at: float
) -> tuple[list[dict[str, Any]], bool]:
    """What `notify_ready` writes: the outbox rows, and whether to NOTIFY `CHANNEL`."""
    if not ready:
        return [], False
    options = conn.sync_connection.get_execution_options() if conn.sync_connection else {}
    tokens = (
        [{"queue": queue, "available_at": due} for queue, due in ready]
        if options.get(OUTBOX, False)
        else []
    )
    wake = conn.dialect.name == "postgresql" and any(due <= at for _, due in ready)
    return tokens, wake


def sort_key(fair_key: float, priority: int, aging_s: float) -> float:
    """The claim order: smaller first. `fair_key` is the job's place in its owner's
    fair-share order; each priority point moves it `aging_s` seconds earlier."""
    return fair_key - priority * aging_s


def task_row(
    job_id: str,
    owner: str,
    pipeline: str,
    stage: Stage,
    item_index: int | None,
    priority: int,
    fair_key: float,
    *,
    attempt: int,
    at: float,
    aging_s: float = DEFAULT_AGING_S,
) -> dict[str, Any]:
    """A `tasks` row for one stage (or one item of a map stage), ready at `at`."""
    return {
        "job_id": job_id,
        "stage": stage.name,
        "item_index": item_index,
        "queue": stage.queue,
        "owner": owner,
        "pipeline": pipeline,
        "sort_key": sort_key(fair_key, priority, aging_s),
        "available_at": at,
        "attempt": attempt,
        "deliveries": 0,
        "created_at": at,
    }


def backoff_delay(stage: Stage, attempt: int, cap_s: float) -> float:
    """Exponential backoff with full jitter in its upper half: base x 2^(attempt-1)."""
    ceiling = min(cap_s, stage.backoff_s * math.pow(2, max(0, attempt - 1)))
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not secrecy


async def outputs(conn: AsyncConnection, job_id: str, names: Sequence[str]) -> dict[str, Any]:
    if not names:
        return {}
    rows = await conn.execute(
        select(stages.c.name, stages.c.output).where(
            stages.c.job_id == job_id, stages.c.name.in_(names)
        )
    )
    return {row.name: row.output for row in rows}


_ACTIVE = ("queued", "running")  # the statuses of a job not yet finished


@dataclass(frozen=True)
class JobState:
    """The two facts of a job that decide what an outcome may do, and its webhook
    (`{"url", "events"}` or None), which finishing it may have to announce."""

    status: str
    cancel_requested: bool
    webhook: Mapping[str, Any] | None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> JobState:
        """From a row with `status`, `cancel_requested` and `webhook`."""
        return cls(
            status=row["status"],
            cancel_requested=bool(row["cancel_requested"]),
            webhook=webhook_of(row["webhook"]),
        )

    @property
    def stopping(self) -> bool:
        """Cancelled, or already finished: record nothing that moves the job on."""
        return self.cancel_requested or self.status not in _ACTIVE


def webhook_of(value: Any) -> Mapping[str, Any] | None:
    """A job's `webhook` column as read: a dict, JSON text (PostgreSQL's fast path reads
    JSON undecoded), or JSON null for none."""
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, Mapping) else None


async def job_state(conn: AsyncConnection, job_id: str) -> JobState:
    """The job's status, cancel flag and webhook."""
    row = (
        await conn.execute(
            select(jobs.c.status, jobs.c.cancel_requested, jobs.c.webhook).where(
                jobs.c.id == job_id
            )
        )
    ).one()
    return JobState.from_row(row._mapping)


async def has_tasks(conn: AsyncConnection, job_id: str) -> bool:
    count = await conn.scalar(
        select(func.count()).select_from(task_table).where(task_table.c.job_id == job_id)
    )
    return bool(count)


_INSERT_EVENTS = insert(event_table)
# The claim's statements, built once (building one costs more than running it).
_READY = (
    task_table.c.queue.in_(bindparam("b_queues", expanding=True)),
    task_table.c.pipeline.in_(bindparam("b_pipelines", expanding=True)),
    task_table.c.lease_token.is_(None),
    task_table.c.available_at <= bindparam("b_at", type_=Float),
)
_BEST_READY = (
    select(task_table.c.id, task_table.c.owner, task_table.c.pipeline)
    .where(*_READY)
    .order_by(task_table.c.sort_key, task_table.c.id)
    .limit(bindparam("b_limit", type_=Integer))
    .with_for_update(skip_locked=True)
)
# Each lease token is the claim's random prefix and the task id: unique, unguessable.
_LEASE = (
    update(task_table)
    .values(
        lease_token=bindparam("b_prefix", type_=String) + cast(task_table.c.id, String),
        lease_expires_at=bindparam("b_expires", type_=Float),
        leased_by=bindparam("b_worker", type_=String),
        attempt=task_table.c.attempt + 1,
        deliveries=task_table.c.deliveries + 1,
    )
    .returning(*task_table.c)
)
# Pick and lease in one statement: the subquery's rows are locked (skipping those
# another claim holds) and updated before anyone else can see them.
_LEASE_NEXT = _LEASE.where(
    task_table.c.id.in_(_BEST_READY.with_only_columns(task_table.c.id).scalar_subquery())
)
_LEASE_IDS = _LEASE.where(task_table.c.id.in_(bindparam("b_ids", expanding=True)))
# PostgreSQL, one statement (see `store/pg.py`): lease the tasks, mark their stages
# running (a stage's event only if that changed it), mark their jobs running and hand
# out the events' numbers, write the events, and return each task with its job's fields.
# $1 worker, $2 token prefix, $3 lease expiry, $4 now; then the pick's own parameters.
# Rows are found as `= ANY(ARRAY(...))` of the ids at hand, which PostgreSQL reads by
# key: joined to a CTE, the generic plan hashed it and scanned each whole table.
_CLAIM_PG = """
WITH leased AS (
    UPDATE tasks SET attempt = attempt + 1, deliveries = deliveries + 1,
        leased_by = $1, lease_token = $2 || id::text, lease_expires_at = $3
    WHERE id = ANY(ARRAY({pick}))
    RETURNING *
), held AS (
    SELECT id FROM jobs WHERE id = ANY(ARRAY(SELECT job_id FROM leased))
    ORDER BY id FOR NO KEY UPDATE
), by_stage AS (
    SELECT job_id, stage, max(attempt) AS attempt, min(sort_key) AS sort_key
    FROM leased WHERE job_id = ANY(ARRAY(SELECT id FROM held)) GROUP BY job_id, stage
), started AS (
    UPDATE stages s SET status = 'running', attempt = greatest(s.attempt, b.attempt),
        started_at = coalesce(s.started_at, $4), error = 'null'::jsonb
    FROM by_stage b
    WHERE s.job_id = b.job_id AND s.name = b.stage
        AND s.job_id = ANY(ARRAY(SELECT job_id FROM by_stage))
        AND s.name = ANY(ARRAY(SELECT stage FROM by_stage))
        AND (s.status <> 'running' OR s.attempt < b.attempt)
    RETURNING s.job_id, s.name, s.attempt, b.sort_key
), per_job AS (
    SELECT l.job_id, (array_agg(l.stage ORDER BY l.sort_key, l.id))[1] AS stage,
        (SELECT count(*) FROM started s WHERE s.job_id = l.job_id) AS n
    FROM leased l GROUP BY l.job_id
), job_rows AS (
    UPDATE jobs j SET status = CASE WHEN j.status = 'queued' THEN 'running' ELSE j.status END,
        started_at = coalesce(j.started_at, $4), stage = p.stage, last_seq = j.last_seq + p.n
    FROM per_job p WHERE j.id = p.job_id AND j.id = ANY(ARRAY(SELECT job_id FROM per_job))
    RETURNING j.id, j.params, j.files, j.budget_usd, j.actual_usd, j.cancel_requested,
        j.last_seq, p.n
), logged AS (
    INSERT INTO events (job_id, seq, type, data, created_at)
    SELECT s.job_id,
        j.last_seq - j.n + row_number() OVER (PARTITION BY s.job_id ORDER BY s.sort_key, s.name),
        'stage_update',
        jsonb_build_object('stage', s.name, 'status', 'running', 'attempt', s.attempt), $4
    FROM started s JOIN job_rows j ON j.id = s.job_id
)
SELECT l.*, j.params, j.files, j.budget_usd, j.actual_usd, j.cancel_requested,
    j.last_seq AS job_last_seq
FROM leased l JOIN job_rows j ON j.id = l.job_id
ORDER BY l.sort_key, l.id
"""


@functools.cache
def _claim_next_pg(limit: int) -> str:
    """The claim of the `limit` best waiting tasks of the queues `$5`.

    Each queue's best waiting tasks are read in order from `ix_tasks_ready` (a scan
    that stops after `limit`), then the best of those over all queues: `queue =
    ANY(...)` would sort every waiting task of the queues at each claim. The limit is
    written into the statement, not sent as a parameter, so PostgreSQL's generic plan
    knows how few rows each step has and is reused: planning the statement anew cost
    as much as running it.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    # The one value formatted in is an int.
    pick = (
        "SELECT t.id FROM unnest($5::text[]) AS q(queue), LATERAL ("
        "SELECT id, sort_key FROM tasks WHERE queue = q.queue AND lease_token IS NULL"
        " AND pipeline = ANY($6::text[]) AND available_at <= $4 ORDER BY sort_key, id"
        " LIMIT {limit} FOR UPDATE SKIP LOCKED) t ORDER BY t.sort_key, t.id LIMIT {limit}"
    )
    return _CLAIM_PG.format(pick=pick.format(limit=int(limit)))


_CLAIM_IDS_PG = _CLAIM_PG.format(pick="SELECT unnest($5::bigint[])")
# Mark a stage running; returns a row only if that changed it (a new run or attempt).
_STAGE_RUNNING = (
    update(stages)
    .where(
        stages.c.job_id == bindparam("b_job_id", type_=String),
        stages.c.name == bindparam("b_stage", type_=String),
        (stages.c.status != "running") | (stages.c.attempt < bindparam("b_attempt", type_=Integer)),
    )
    .values(
        status="running",
        attempt=case(
            (
                stages.c.attempt < bindparam("b_attempt", type_=Integer),
                bindparam("b_attempt", type_=Integer),
            ),
            else_=stages.c.attempt,
        ),
        started_at=func.coalesce(stages.c.started_at, bindparam("b_at", type_=Float)),
        error=None,
    )
    .returning(stages.c.attempt)
)
# Mark a job running, hand out its event numbers, and read what its stages need.
_JOB_RUNNING = (
    update(jobs)
    .where(jobs.c.id == bindparam("b_job_id", type_=String))
    .values(
        status=case((jobs.c.status == "queued", "running"), else_=jobs.c.status),
        started_at=func.coalesce(jobs.c.started_at, bindparam("b_at", type_=Float)),
        stage=bindparam("b_stage", type_=String),
        last_seq=jobs.c.last_seq + bindparam("b_events", type_=Integer),
    )
    .returning(
        jobs.c.id,
        jobs.c.params,
        jobs.c.files,
        jobs.c.budget_usd,
        jobs.c.actual_usd,
        jobs.c.cancel_requested,
        jobs.c.last_seq,
    )
)


async def _pick_under_caps(
    conn: AsyncConnection,
    queues: Sequence[str],
    pipelines: Sequence[str],
    limit: int,
    at: float,
    max_running_per_owner: int,
    pipeline_caps: dict[str, int],
) -> list[int]:
    """The best ready tasks that no concurrency cap holds back, locked."""
    if conn.dialect.name == "postgresql":
        # Claims that count running stages must not interleave, or two workers could
        # each see room for one more and both take it.
        await conn.execute(select(func.pg_advisory_xact_lock(_CAPS_LOCK)))
    owners, running = await _running(conn)
    conditions = []
    if max_running_per_owner:
        full = [o for o, n in owners.items() if n >= max_running_per_owner]
        conditions.append(task_table.c.owner.not_in(full))
    full_pipelines = [p for p, cap in pipeline_caps.items() if running.get(p, 0) >= cap]
    conditions.append(task_table.c.pipeline.not_in(full_pipelines))
    candidates = await conn.execute(
        _BEST_READY.where(*conditions),
        {
            "b_queues": list(queues),
            "b_pipelines": list(pipelines),
            "b_at": at,
            "b_limit": limit * 4,
        },
    )
    ids: list[int] = []
    for task_id, owner, pipeline in candidates:
        if len(ids) == limit:
            break
        if max_running_per_owner and owners.get(owner, 0) >= max_running_per_owner:
            continue
        if pipeline in pipeline_caps and running.get(pipeline, 0) >= pipeline_caps[pipeline]:
            continue
        owners[owner] = owners.get(owner, 0) + 1
        running[pipeline] = running.get(pipeline, 0) + 1
        ids.append(task_id)
    return ids


async def claim(
    conn: AsyncConnection,
    *,
    worker_id: str,
    queues: Sequence[str],
    pipelines: Sequence[str],
    limit: int,
    lease_s: float,
    at: float,
    registry: Registry,
    max_running_per_owner: int = 0,
) -> list[Claimed]:
    """Lease up to `limit` ready tasks, best first, and mark their stages and jobs running.

    Args:
        conn: a write transaction; on PostgreSQL, when no caps apply (no
            `max_running_per_owner`, no pipeline's `max_running`), an autocommit
            connection will do: the claim is then one statement, and what follows it
            only reads what finished stages wrote. (Should that read fail,
            the claimed tasks wait for their leases to run out, as after a crash.)
        max_running_per_owner: no owner gets more stages running at once (0: no cap);
            pipelines declared with `max_running` are capped the same way.
    """
    if limit <= 0:
        return []
    pipeline_caps = {p.name: p.max_running for p in registry if p.max_running}
    ids: list[int] | None = None
    if max_running_per_owner or pipeline_caps:
        ids = await _pick_under_caps(
            conn, queues, pipelines, limit, at, max_running_per_owner, pipeline_caps
        )
        if not ids:
            return []
    if conn.dialect.name == "postgresql":
        lease_args = (worker_id, lease_prefix(), at + lease_s, at)
        if ids is None:
            records = await pg.records(
                conn, _claim_next_pg(limit), *lease_args, list(queues), list(pipelines)
            )
        else:
            records = await pg.records(conn, _CLAIM_IDS_PG, *lease_args, ids)
        task_rows: list[dict[str, Any]] = [dict(r) for r in records]
        job_rows: dict[str, Any] = {row["job_id"]: row for row in task_rows}
        for row in task_rows:
            events.note(conn, row["job_id"], row["job_last_seq"])
    else:
        task_rows, job_rows = await _lease_and_start(
            conn, ids, worker_id, queues, pipelines, limit, lease_s, at
        )
    if not task_rows:
        return []
    claimed: list[Claimed] = []
    for row in task_rows:
        job = job_rows[row["job_id"]]
        stage = registry.get(row["pipeline"]).stages[row["stage"]]
        task = Claimed.from_rows(row, job)
        task.outputs = await outputs(conn, task.job_id, stage.after)
        if stage.is_map and task.item_index is not None:
            task.item, task.item_key = _item(stage, task.item_index, job["files"], task.outputs)
        claimed.append(task)
    return claimed


def lease_prefix() -> str:
    """A claim's random prefix; each lease token is it and the task id."""
    return uuid.uuid4().hex[:20] + "-"


async def _lease_and_start(
    conn: AsyncConnection,
    ids: list[int] | None,
    worker_id: str,
    queues: Sequence[str],
    pipelines: Sequence[str],
    limit: int,
    lease_s: float,
    at: float,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`_CLAIM_PG`'s work in several statements, for SQLite: the leased task rows (best
    first) and each one's job row."""
    lease = {
        "b_prefix": lease_prefix(),
        "b_expires": at + lease_s,
        "b_worker": worker_id,
    }
    if ids is not None:
        statement, params = _LEASE_IDS, {"b_ids": ids, **lease}
    else:
        statement = _LEASE_NEXT
        params = {
            "b_queues": list(queues),
            "b_pipelines": list(pipelines),
            "b_at": at,
            "b_limit": limit,
            **lease,
        }
    result = await conn.execute(statement, params)
    task_rows = sorted((dict(r) for r in result.mappings()), key=lambda r: (r["sort_key"], r["id"]))
    # Mark each stage running (one statement, which also says whether that changed it).
    started: dict[str, list[events.Event]] = {}
    for row in task_rows:
        changed = (
            await conn.execute(
                _STAGE_RUNNING,
                {
                    "b_job_id": row["job_id"],
                    "b_stage": row["stage"],
                    "b_attempt": row["attempt"],
                    "b_at": at,
                },
            )
        ).first()
        items = started.setdefault(row["job_id"], [])
        if changed is not None:
            running = {"stage": row["stage"], "status": "running", "attempt": changed[0]}
            items.append(("stage_update", running))
    # Mark each job running, hand out its event numbers and read what its stages need,
    # all in one statement per job.
    job_rows: dict[str, Any] = {}
    event_rows: list[dict[str, Any]] = []
    for job_id, items in started.items():
        current = next(r["stage"] for r in task_rows if r["job_id"] == job_id)
        job = (
            (
                await conn.execute(
                    _JOB_RUNNING,
                    {"b_job_id": job_id, "b_at": at, "b_stage": current, "b_events": len(items)},
                )
            )
            .mappings()
            .one()
        )
        job_rows[job_id] = job
        events.note(conn, job_id, job["last_seq"])
        first = job["last_seq"] - len(items) + 1
        event_rows.extend(
            events.row(job_id, first + i, item, at=at) for i, item in enumerate(items)
        )
    if event_rows:
        await conn.execute(_INSERT_EVENTS, event_rows)
    return task_rows, job_rows


async def _running(conn: AsyncConnection) -> tuple[dict[str, int], dict[str, int]]:
    """Stages running now (leased tasks), by owner and by pipeline."""
    by_owner: dict[str, int] = {}
    by_pipeline: dict[str, int] = {}
    rows = await conn.execute(
        select(task_table.c.owner, task_table.c.pipeline, func.count())
        .where(task_table.c.lease_token.isnot(None))
        .group_by(task_table.c.owner, task_table.c.pipeline)
    )
    for owner, pipeline, n in rows:
        by_owner[owner] = by_owner.get(owner, 0) + int(n)
        by_pipeline[pipeline] = by_pipeline.get(pipeline, 0) + int(n)
    return by_owner, by_pipeline


def _item(
    stage: Stage, index: int, files: list[dict[str, Any]], outputs: dict[str, Any]
) -> tuple[Any, str]:
    if stage.map_over == "files":
        return files[index], str(files[index]["name"])
    value = outputs.get(stage.map_over or "")
    element = value[index] if isinstance(value, list) and index < len(value) else None
    if isinstance(element, dict) and isinstance(element.get("key"), str):
        return element, element["key"]
    return element, str(index)


async def hold(conn: AsyncConnection, task: Claimed) -> JobState:
    """Check the lease is still ours (or raise `LeaseLost`) and lock the task's job.

    Every outcome goes through `hold` or `take` first, so outcomes of one job never
    interleave: on PostgreSQL two stages finishing at once would otherwise each read the
    other as still running, and neither would queue what depends on both.
    """
    found = (
        await conn.execute(
            select(task_table.c.id)
            .where(task_table.c.id == task.task_id, task_table.c.lease_token == task.lease_token)
            .with_for_update()
        )
    ).first()
    if found is None:
        raise LeaseLost()
    return await lock_job(conn, task.job_id)


_TAKE = (
    delete(task_table)
    .where(
        task_table.c.id == bindparam("b_task_id", type_=BigInteger),
        task_table.c.lease_token == bindparam("b_token", type_=String),
    )
    .returning(task_table.c.job_id)
)
_TAKEN = _TAKE.cte("taken")
# PostgreSQL, one round trip: the job's row is locked and read only if the delete matched.
_TAKE_AND_LOCK = (
    select(jobs.c.status, jobs.c.cancel_requested, jobs.c.webhook)
    .where(jobs.c.id.in_(select(_TAKEN.c.job_id)))
    .with_for_update(of=jobs)
)
_JOB_STATE = select(jobs.c.status, jobs.c.cancel_requested, jobs.c.webhook).where(
    jobs.c.id == bindparam("b_job_id", type_=String)
)
_LOCK_JOB = _JOB_STATE.with_for_update()


async def take(conn: AsyncConnection, task: Claimed) -> JobState:
    """Delete the task row if the lease is still ours (or raise `LeaseLost`); lock its job."""
    params = {"b_task_id": task.task_id, "b_token": task.lease_token}
    if conn.dialect.name == "postgresql":
        rows = await pg.fetch(conn, _TAKE_AND_LOCK, params)
        if not rows:
            raise LeaseLost()
        return JobState.from_row(rows[0])
    if (await conn.execute(_TAKE, params)).first() is None:
        raise LeaseLost()
    return await lock_job(conn, task.job_id)


async def lock_job(conn: AsyncConnection, job_id: str) -> JobState:
    """Hold the job's row until commit and read its state (which, held, cannot change
    under the caller). SQLite has one writer anyway, so only PostgreSQL locks."""
    query = _JOB_STATE if conn.dialect.name == "sqlite" else _LOCK_JOB
    (row,) = await pg.fetch(conn, query, {"b_job_id": job_id})
    return JobState.from_row(row)


class Flushed(NamedTuple):
    """What a flush learnt of its job."""

    stop: bool  # cancel requested, or the job already finished
    actual_usd: float  # the job's cost in the store, every stage's reports included


async def flush(
    conn: AsyncConnection, task: Claimed, report: Report, *, lease_s: float, at: float
) -> Flushed:
    """Renew the lease and record progress, cost and events.

    Returns the job's stop flag and its stored cost, which includes what parallel
    stages of the job reported: each stage checks the job's budget against it.

    Raises:
        LeaseLost: the lease is gone; nothing was written.
    """
    renewed = (
        await conn.execute(
            update(task_table)
            .where(task_table.c.id == task.task_id, task_table.c.lease_token == task.lease_token)
            .values(lease_expires_at=at + lease_s)
            .returning(task_table.c.id)
        )
    ).first()
    if renewed is None:
        raise LeaseLost()
    task.lease_expires_at = at + lease_s
    await apply_report(conn, task, report, at=at)
    flag = (
        await conn.execute(
            select(jobs.c.cancel_requested, jobs.c.status, jobs.c.actual_usd).where(
                jobs.c.id == task.job_id
            )
        )
    ).one()
    stop = bool(flag.cancel_requested) or flag.status != "running"
    return Flushed(stop=stop, actual_usd=float(flag.actual_usd))


async def apply_report(
    conn: AsyncConnection, task: Claimed, report: Report, *, at: float, job: JobState | None = None
) -> None:
    """Write a report's cost, progress and events. `report` itself is left as it is: if
    the transaction fails, the caller puts it back whole, to be written again.

    A job's log closes with its terminal event: for a job already finished (a stage
    still running when a sibling failed it), only the cost is written, since
    `actual_usd` counts what every run spent. `job` is the job's state when the caller
    holds its row; without it the events are appended only while the job is active.
    """
    log = report.events
    if report.cost_delta:
        total = (
            await conn.execute(
                update(jobs)
                .where(jobs.c.id == task.job_id)
                .values(actual_usd=jobs.c.actual_usd + report.cost_delta)
                .returning(jobs.c.actual_usd)
            )
        ).scalar_one()
        # The stored total includes what parallel stages charged since this stage last
        # looked: the event tells that, not the stage's own view of it.
        log = [_with_total(event, float(total)) for event in log]
    if job is not None and job.status not in _ACTIVE:
        return
    if report.progress is not None and task.item_index is None:
        await conn.execute(
            update(stages)
            .where(stages.c.job_id == task.job_id, stages.c.name == task.stage)
            .values(progress=report.progress)
        )
        overall = await job_progress(conn, task.job_id, task.stage)
        for kind, data in log:
            if kind == "progress":
                data.setdefault("progress", overall)
    if log:
        await events.append(conn, task.job_id, log, at=at, while_active=True)


def _with_total(event: events.Event, total: float) -> events.Event:
    kind, data = event
    if kind != "cost_update":
        return event
    return kind, {**data, "actual_usd": round(total, 10)}


async def job_progress(conn: AsyncConnection, job_id: str, stage: str) -> float:
    average = (
        await conn.execute(select(func.avg(stages.c.progress)).where(stages.c.job_id == job_id))
    ).scalar_one()
    value = float(average or 0.0)
    await conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.status.in_(_ACTIVE))
        .values(progress=value, stage=stage)
    )
    return value


def held_tasks(leases: Mapping[int, str]) -> Select[tuple[int]]:
    """The ids of the tasks still leased under these (task id: token) leases, locked,
    skipping those another transaction has locked.

    Found by id (the primary key), not by token, which no index holds: a renewal costs
    the same with a backlog of a million tasks as with none. A renewal never waits for
    a row: the transaction holding it is an outcome of the same worker (whose group
    commit may lock tasks in another order than any one renewal would, so waiting
    could deadlock), a flush, or a sweep.
    """
    return (
        select(task_table.c.id)
        .where(
            task_table.c.id.in_(list(leases)),
            task_table.c.lease_token.in_(list(leases.values())),
        )
        .order_by(task_table.c.job_id, task_table.c.id)
        .with_for_update(skip_locked=True)
    )


# `renew` on PostgreSQL: one statement, atomic by itself, so it runs on an autocommit
# connection in one round trip. `held_tasks`' pick; a task another transaction locked
# is reported held (unrenewed) if its row had the token when the statement began.
_RENEW_PG = """
WITH seen AS (
    UPDATE workers SET last_seen_at = $3 WHERE id = $5
), mine AS (
    SELECT id FROM tasks
    WHERE id = ANY($1::bigint[]) AND lease_token = ANY($2::varchar[])
    ORDER BY job_id, id
    FOR UPDATE SKIP LOCKED
), renewed AS (
    UPDATE tasks SET lease_expires_at = $4
    WHERE id IN (SELECT id FROM mine)
    RETURNING id, lease_token, job_id
)
SELECT renewed.lease_token,
       coalesce(jobs.cancel_requested OR jobs.status <> 'running', false) AS stopping,
       renewed.job_id
FROM renewed LEFT JOIN jobs ON jobs.id = renewed.job_id
UNION ALL
SELECT lease_token, false, NULL FROM tasks
WHERE id = ANY($1::bigint[]) AND lease_token = ANY($2::varchar[])
  AND id NOT IN (SELECT id FROM renewed)
"""


async def renew(
    conn: AsyncConnection,
    leases: Mapping[int, str],
    *,
    lease_s: float,
    at: float,
    worker_id: str | None = None,
) -> tuple[set[str], set[str]]:
    """Extend the leases held: `leases` maps task ids to the lease tokens held on them.

    A task whose row another transaction holds (its outcome being written, a sweep) is
    not renewed this time; it counts as held if its committed row still has the token.

    With `worker_id`, the worker is seen now (`workers.last_seen_at`): a worker whose
    stages run renews every half second, so one silent for longer while holding leases
    is cut off or hung, even if its connection still shows (docs/liveness.md).

    Args:
        conn: a write transaction; on PostgreSQL an autocommit connection will do (the
            renewal is one statement there).

    Returns:
        The tokens still held, and the ids of their jobs that should stop (cancel
        requested, or the job already finished).
    """
    if not leases:
        return set(), set()
    if conn.dialect.name == "postgresql":
        rows = await pg.records(
            conn, _RENEW_PG, list(leases), list(leases.values()), at, at + lease_s, worker_id
        )
        return (
            {row["lease_token"] for row in rows},
            {row["job_id"] for row in rows if row["stopping"]},
        )
    if worker_id is not None:
        await conn.execute(update(workers).where(workers.c.id == worker_id).values(last_seen_at=at))
    held = (
        await conn.execute(
            update(task_table)
            .where(task_table.c.id.in_(held_tasks(leases).scalar_subquery()))
            .values(lease_expires_at=at + lease_s)
            .returning(task_table.c.lease_token, task_table.c.job_id)
        )
    ).all()
    job_ids = {job_id for _, job_id in held}
    stopping = set()
    if job_ids:
        stopping = {
            row[0]
            for row in await conn.execute(
                select(jobs.c.id).where(
                    jobs.c.id.in_(job_ids),
                    (jobs.c.cancel_requested.is_(True)) | (jobs.c.status != "running"),
                )
            )
        }
    return {token for token, _ in held}, stopping


async def release(conn: AsyncConnection, task: Claimed, report: Report, *, at: float) -> None:
    """Hand a task back unfinished (worker shutdown): it runs again, this run uncounted
    (unless its job finished meanwhile: then it is dropped)."""
    job = await hold(conn, task)
    await apply_report(conn, task, report, at=at, job=job)
    if job.status not in _ACTIVE:
        await conn.execute(delete(task_table).where(task_table.c.id == task.task_id))
        return
    await conn.execute(
        update(task_table)
        .where(task_table.c.id == task.task_id)
        .values(
            lease_token=None,
            lease_expires_at=None,
            leased_by=None,
            available_at=at,
            attempt=task_table.c.attempt - 1,
            deliveries=task_table.c.deliveries - 1,
        )
    )
    await notify_ready(conn, [(task.queue, at)], at=at)
    if task.item_index is None:
        await conn.execute(
            update(stages)
            .where(stages.c.job_id == task.job_id, stages.c.name == task.stage)
            .values(status="queued", attempt=task.attempt - 1, progress=0.0)
        )
    await events.append(
        conn,
        task.job_id,
        [("stage_update", {"stage": task.stage, "status": "queued", "attempt": task.attempt - 1})],
        at=at,
    )


async def drop_waiting(conn: AsyncConnection, job_id: str) -> None:
    """Delete the job's tasks that wait to be claimed.

    A task a worker is claiming at this very moment is skipped, not waited for: the
    caller holds the job's row, which that claim needs next, so waiting would deadlock.
    The claimed stage sees its job stopping at its first lease renewal instead.
    """
    waiting = select(task_table.c.id).where(
        task_table.c.job_id == job_id, task_table.c.lease_token.is_(None)
    )
    ids = [row[0] for row in await conn.execute(waiting.with_for_update(skip_locked=True))]
    if ids:
        await conn.execute(delete(task_table).where(task_table.c.id.in_(ids)))


async def depth(conn: AsyncConnection) -> dict[str, int]:
    """Tasks waiting (not leased) per queue."""
    rows = await conn.execute(
        select(task_table.c.queue, func.count())
        .where(task_table.c.lease_token.is_(None))
        .group_by(task_table.c.queue)
    )
    return {queue: int(n) for queue, n in rows}


async def ready_count(conn: AsyncConnection, queue: str, *, at: float) -> int:
    """Tasks of `queue` due and waiting to be claimed (at most 1,000 are counted)."""
    due = (
        select(task_table.c.id)
        .where(
            task_table.c.queue == queue,
            task_table.c.lease_token.is_(None),
            task_table.c.available_at <= at,
        )
        .limit(1000)
        .subquery()
    )
    return int((await conn.execute(select(func.count()).select_from(due))).scalar_one())
