"""Stage tasks: enqueueing, claiming under a lease, and recording each outcome.

Every outcome write is fenced by the lease token: a worker whose lease expired (and
whose task was handed to another worker) finds its token gone, raises `LeaseLost`,
and writes nothing.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, case, delete, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.errors import JobgateError
from jobgate.pipelines import Registry, Stage
from jobgate.store.repositories import events
from jobgate.store.tables import jobs, stages
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
class Report:
    """What a running stage produced since the last flush."""

    events: list[events.Event] = field(default_factory=list)
    progress: float | None = None
    cost_delta: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.events) or self.progress is not None or self.cost_delta != 0.0


async def notify_ready(conn: AsyncConnection) -> None:
    """Wake listening workers once this transaction commits (PostgreSQL `NOTIFY`)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(_NOTIFY)


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


@dataclass(frozen=True)
class JobState:
    """The two facts of a job that decide what an outcome may do."""

    status: str
    cancel_requested: bool

    @property
    def stopping(self) -> bool:
        """Cancelled, or already finished: record nothing that moves the job on."""
        return self.cancel_requested or self.status not in ("queued", "running")


async def job_state(conn: AsyncConnection, job_id: str) -> JobState:
    """The job's status and cancel flag."""
    row = (
        await conn.execute(
            select(jobs.c.status, jobs.c.cancel_requested).where(jobs.c.id == job_id)
        )
    ).one()
    return JobState(status=row.status, cancel_requested=bool(row.cancel_requested))


async def has_tasks(conn: AsyncConnection, job_id: str) -> bool:
    count = await conn.scalar(
        select(func.count()).select_from(task_table).where(task_table.c.job_id == job_id)
    )
    return bool(count)


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
        max_running_per_owner: no owner gets more stages running at once (0: no cap);
            pipelines declared with `max_running` are capped the same way.
    """
    if limit <= 0:
        return []
    conditions = [
        task_table.c.queue.in_(queues),
        task_table.c.pipeline.in_(pipelines),
        task_table.c.lease_token.is_(None),
        task_table.c.available_at <= at,
    ]
    pipeline_caps = {p.name: p.max_running for p in registry if p.max_running}
    capped = bool(max_running_per_owner or pipeline_caps)
    owners: dict[str, int] = {}
    running: dict[str, int] = {}
    if capped:
        if conn.dialect.name == "postgresql":
            # Claims that count running stages must not interleave, or two workers could
            # each see room for one more and both take it.
            await conn.execute(select(func.pg_advisory_xact_lock(_CAPS_LOCK)))
        owners, running = await _running(conn)
        if max_running_per_owner:
            full = [o for o, n in owners.items() if n >= max_running_per_owner]
            conditions.append(task_table.c.owner.not_in(full))
        full_pipelines = [p for p, cap in pipeline_caps.items() if running.get(p, 0) >= cap]
        conditions.append(task_table.c.pipeline.not_in(full_pipelines))
    candidates = (
        select(task_table.c.id, task_table.c.owner, task_table.c.pipeline)
        .where(*conditions)
        .order_by(task_table.c.sort_key, task_table.c.id)
        .limit(limit * 4 if capped else limit)
        .with_for_update(skip_locked=True)
    )
    ids: list[int] = []
    for task_id, owner, pipeline in await conn.execute(candidates):
        if len(ids) == limit:
            break
        if capped:
            if max_running_per_owner and owners.get(owner, 0) >= max_running_per_owner:
                continue
            if pipeline in pipeline_caps and running.get(pipeline, 0) >= pipeline_caps[pipeline]:
                continue
            owners[owner] = owners.get(owner, 0) + 1
            running[pipeline] = running.get(pipeline, 0) + 1
        ids.append(task_id)
    if not ids:
        return []
    expires = at + lease_s
    tokens = {task_id: str(uuid.uuid4()) for task_id in ids}
    await conn.execute(
        update(task_table)
        .where(task_table.c.id == bindparam("tid"))
        .values(
            lease_token=bindparam("tok"),
            lease_expires_at=expires,
            leased_by=worker_id,
            attempt=task_table.c.attempt + 1,
            deliveries=task_table.c.deliveries + 1,
        ),
        [{"tid": task_id, "tok": token} for task_id, token in tokens.items()],
    )
    task_rows = (
        (await conn.execute(select(task_table).where(task_table.c.id.in_(ids)))).mappings().all()
    )
    job_ids = sorted({row["job_id"] for row in task_rows})
    job_rows = {
        row["id"]: row
        for row in (await conn.execute(select(jobs).where(jobs.c.id.in_(job_ids)))).mappings()
    }
    claimed: list[Claimed] = []
    started: dict[str, list[events.Event]] = {}
    for row in sorted(task_rows, key=lambda r: (r["sort_key"], r["id"])):
        job = job_rows[row["job_id"]]
        stage = registry.get(row["pipeline"]).stages[row["stage"]]
        given = await outputs(conn, job["id"], stage.after)
        task = Claimed.from_rows(row, job)
        task.outputs = given
        if stage.is_map and task.item_index is not None:
            task.item, task.item_key = _item(stage, task.item_index, job["files"], given)
        claimed.append(task)
        # One statement marks the stage running and says whether that changed anything.
        changed = (
            await conn.execute(
                update(stages)
                .where(
                    stages.c.job_id == job["id"],
                    stages.c.name == stage.name,
                    (stages.c.status != "running") | (stages.c.attempt < task.attempt),
                )
                .values(
                    status="running",
                    attempt=case(
                        (stages.c.attempt < task.attempt, task.attempt), else_=stages.c.attempt
                    ),
                    started_at=func.coalesce(stages.c.started_at, at),
                    error=None,
                )
                .returning(stages.c.attempt)
            )
        ).first()
        if changed is not None:
            started.setdefault(job["id"], []).append(
                ("stage_update", {"stage": stage.name, "status": "running", "attempt": changed[0]})
            )
    for job_id in job_ids:
        await conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(
                status=case((jobs.c.status == "queued", "running"), else_=jobs.c.status),
                started_at=func.coalesce(jobs.c.started_at, at),
                stage=next(t.stage for t in claimed if t.job_id == job_id),
            )
        )
    for job_id, items in started.items():
        await events.append(conn, job_id, items, at=at)
    return claimed


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


async def hold(conn: AsyncConnection, task: Claimed) -> None:
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
    await lock_job(conn, task.job_id)


async def take(conn: AsyncConnection, task: Claimed) -> None:
    """Delete the task row if the lease is still ours (or raise `LeaseLost`); lock its job."""
    taken = (
        await conn.execute(
            delete(task_table)
            .where(task_table.c.id == task.task_id, task_table.c.lease_token == task.lease_token)
            .returning(task_table.c.id)
        )
    ).first()
    if taken is None:
        raise LeaseLost()
    await lock_job(conn, task.job_id)


async def lock_job(conn: AsyncConnection, job_id: str) -> None:
    """Hold the job's row until commit (PostgreSQL; SQLite has one writer anyway)."""
    if conn.dialect.name != "sqlite":
        await conn.execute(select(jobs.c.id).where(jobs.c.id == job_id).with_for_update())


async def flush(
    conn: AsyncConnection, task: Claimed, report: Report, *, lease_s: float, at: float
) -> bool:
    """Renew the lease and record progress, cost and events. Returns the cancel flag.

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
            select(jobs.c.cancel_requested, jobs.c.status).where(jobs.c.id == task.job_id)
        )
    ).one()
    return bool(flag.cancel_requested) or flag.status != "running"


async def apply_report(conn: AsyncConnection, task: Claimed, report: Report, *, at: float) -> None:
    if report.cost_delta:
        await conn.execute(
            update(jobs)
            .where(jobs.c.id == task.job_id)
            .values(actual_usd=jobs.c.actual_usd + report.cost_delta)
        )
        task.actual_usd += report.cost_delta
    if report.progress is not None and task.item_index is None:
        await conn.execute(
            update(stages)
            .where(stages.c.job_id == task.job_id, stages.c.name == task.stage)
            .values(progress=report.progress)
        )
        overall = await job_progress(conn, task.job_id, task.stage)
        for kind, data in report.events:
            if kind == "progress":
                data.setdefault("progress", overall)
    if report.events:
        await events.append(conn, task.job_id, report.events, at=at)
    report.events, report.progress, report.cost_delta = [], None, 0.0


async def job_progress(conn: AsyncConnection, job_id: str, stage: str) -> float:
    average = (
        await conn.execute(select(func.avg(stages.c.progress)).where(stages.c.job_id == job_id))
    ).scalar_one()
    value = float(average or 0.0)
    await conn.execute(update(jobs).where(jobs.c.id == job_id).values(progress=value, stage=stage))
    return value


async def renew(
    conn: AsyncConnection, tokens: Sequence[str], *, lease_s: float, at: float
) -> tuple[set[str], set[str]]:
    """Extend the leases held under `tokens`.

    Returns:
        The tokens still held, and the ids of their jobs that should stop (cancel
        requested, or the job already finished).
    """
    if not tokens:
        return set(), set()
    held = (
        await conn.execute(
            update(task_table)
            .where(task_table.c.lease_token.in_(tokens))
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
    """Hand a task back unfinished (worker shutdown): it runs again, this run uncounted."""
    await hold(conn, task)
    await apply_report(conn, task, report, at=at)
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
    await notify_ready(conn)
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
