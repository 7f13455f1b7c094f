"""Stage tasks: enqueueing, claiming under a lease, and recording each outcome.

Every outcome write is fenced by the lease token: a worker whose lease expired (and
whose task was handed to another worker) finds its token gone, raises `LeaseLost`,
and writes nothing.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.errors import JobgateError
from jobgate.pipelines import Pipeline, Registry, Stage
from jobgate.store.repositories import events
from jobgate.store.tables import jobs, records, stages
from jobgate.store.tables import tasks as task_table

DEFAULT_AGING_S = 10.0


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


@dataclass
class Report:
    """What a running stage produced since the last flush."""

    events: list[events.Event] = field(default_factory=list)
    progress: float | None = None
    cost_delta: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.events) or self.progress is not None or self.cost_delta != 0.0


def sort_key(created_at: float, priority: int, aging_s: float) -> float:
    """The claim order: earlier is first; each priority point counts as `aging_s` of waiting."""
    return created_at - priority * aging_s


def task_row(
    job_id: str,
    owner: str,
    pipeline: str,
    stage: Stage,
    item_index: int | None,
    priority: int,
    created_at: float,
    *,
    attempt: int,
    at: float | None = None,
    aging_s: float = DEFAULT_AGING_S,
) -> dict[str, Any]:
    """A `tasks` row for one stage (or one item of a map stage)."""
    return {
        "job_id": job_id,
        "stage": stage.name,
        "item_index": item_index,
        "queue": stage.queue,
        "owner": owner,
        "pipeline": pipeline,
        "sort_key": sort_key(created_at, priority, aging_s),
        "available_at": at if at is not None else created_at,
        "attempt": attempt,
        "deliveries": 0,
        "created_at": at if at is not None else created_at,
    }


def backoff_delay(stage: Stage, attempt: int, cap_s: float) -> float:
    """Exponential backoff with full jitter in its upper half: base x 2^(attempt-1)."""
    ceiling = min(cap_s, stage.backoff_s * math.pow(2, max(0, attempt - 1)))
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not secrecy


# -- enqueueing ----------------------------------------------------------------------


async def enqueue_stage(
    conn: AsyncConnection,
    job_id: str,
    pipeline: Pipeline,
    name: str,
    *,
    at: float,
    aging_s: float = DEFAULT_AGING_S,
) -> None:
    """Queue a stage whose dependencies all succeeded (a map stage: its missing items)."""
    stage = pipeline.stages[name]
    job = (
        (
            await conn.execute(
                select(jobs.c.owner, jobs.c.priority, jobs.c.created_at, jobs.c.files).where(
                    jobs.c.id == job_id
                )
            )
        )
        .mappings()
        .one()
    )
    row = (
        (await conn.execute(select(stages).where(stages.c.job_id == job_id, stages.c.name == name)))
        .mappings()
        .one()
    )
    indexes: list[int | None] = [None]
    values: dict[str, Any] = {"status": "queued"}
    if stage.is_map:
        total = await _item_count(conn, job_id, stage, job["files"])
        done = {
            r[0]
            for r in await conn.execute(
                select(records.c.item_index).where(
                    records.c.job_id == job_id,
                    records.c.stage == name,
                    records.c.status == "succeeded",
                )
            )
        }
        await conn.execute(
            delete(records).where(
                records.c.job_id == job_id, records.c.stage == name, records.c.status != "succeeded"
            )
        )
        indexes = [i for i in range(total) if i not in done]
        values.update(items_total=total, items_succeeded=len(done), items_failed=0)
        await _recount_records(conn, job_id)
    await conn.execute(
        update(stages).where(stages.c.job_id == job_id, stages.c.name == name).values(**values)
    )
    await events.append(
        conn,
        job_id,
        [("stage_update", {"stage": name, "status": "queued", "attempt": row["attempt"]})],
        at=at,
    )
    if not indexes:
        await finish_map_stage(conn, job_id, pipeline, name, at=at)
        return
    attempt = row["attempt"] if not stage.is_map else 0
    await conn.execute(
        insert(task_table),
        [
            task_row(
                job_id,
                job["owner"],
                pipeline.name,
                stage,
                i,
                job["priority"],
                job["created_at"],
                attempt=attempt,
                at=at,
                aging_s=aging_s,
            )
            for i in indexes
        ],
    )


async def _item_count(conn: AsyncConnection, job_id: str, stage: Stage, files: list[Any]) -> int:
    if stage.map_over == "files":
        return len(files)
    source = await _outputs(conn, job_id, [stage.map_over or ""])
    value = source.get(stage.map_over or "")
    return len(value) if isinstance(value, list) else 0


async def _outputs(conn: AsyncConnection, job_id: str, names: Sequence[str]) -> dict[str, Any]:
    if not names:
        return {}
    rows = await conn.execute(
        select(stages.c.name, stages.c.output).where(
            stages.c.job_id == job_id, stages.c.name.in_(names)
        )
    )
    return {row.name: row.output for row in rows}


async def _recount_records(conn: AsyncConnection, job_id: str) -> None:
    counts: dict[str, int] = dict(
        (
            await conn.execute(
                select(records.c.status, func.count())
                .where(records.c.job_id == job_id)
                .group_by(records.c.status)
            )
        ).all()
    )
    expected = (
        await conn.execute(
            select(func.coalesce(func.sum(stages.c.items_total), 0)).where(
                stages.c.job_id == job_id, stages.c.is_map.is_(True)
            )
        )
    ).scalar_one()
    await conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id)
        .values(
            records_expected=int(expected),
            records_succeeded=int(counts.get("succeeded", 0)),
            records_failed=int(counts.get("failed", 0)),
        )
    )


# -- claiming ------------------------------------------------------------------------


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
) -> list[Claimed]:
    """Lease up to `limit` ready tasks, best first, and mark their stages and jobs running."""
    if limit <= 0:
        return []
    candidates = (
        select(task_table.c.id)
        .where(
            task_table.c.queue.in_(queues),
            task_table.c.pipeline.in_(pipelines),
            task_table.c.lease_token.is_(None),
            task_table.c.available_at <= at,
        )
        .order_by(task_table.c.sort_key, task_table.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = [row[0] for row in await conn.execute(candidates)]
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
        outputs = await _outputs(conn, job["id"], stage.after)
        task = Claimed(
            task_id=row["id"],
            lease_token=tokens[row["id"]],
            lease_expires_at=expires,
            job_id=job["id"],
            owner=job["owner"],
            pipeline=job["pipeline"],
            stage=stage.name,
            item_index=row["item_index"],
            attempt=row["attempt"],
            deliveries=row["deliveries"],
            params=job["params"],
            files=job["files"],
            budget_usd=job["budget_usd"],
            actual_usd=job["actual_usd"],
            cancel_requested=job["cancel_requested"],
            outputs=outputs,
        )
        if stage.is_map and task.item_index is not None:
            task.item, task.item_key = _item(stage, task.item_index, job["files"], outputs)
        claimed.append(task)
        stage_row = (
            await conn.execute(
                select(stages.c.status, stages.c.attempt).where(
                    stages.c.job_id == job["id"], stages.c.name == stage.name
                )
            )
        ).one()
        attempt = max(stage_row.attempt, task.attempt)
        if stage_row.status != "running" or attempt != stage_row.attempt:
            await conn.execute(
                update(stages)
                .where(stages.c.job_id == job["id"], stages.c.name == stage.name)
                .values(
                    status="running",
                    attempt=attempt,
                    started_at=func.coalesce(stages.c.started_at, at),
                    error=None,
                )
            )
            started.setdefault(job["id"], []).append(
                ("stage_update", {"stage": stage.name, "status": "running", "attempt": attempt})
            )
    await conn.execute(
        update(jobs)
        .where(jobs.c.id.in_(job_ids), jobs.c.status == "queued")
        .values(status="running", started_at=func.coalesce(jobs.c.started_at, at))
    )
    for job_id in job_ids:
        await conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(stage=next(t.stage for t in claimed if t.job_id == job_id))
        )
    for job_id, items in started.items():
        await events.append(conn, job_id, items, at=at)
    return claimed


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


# -- while running -------------------------------------------------------------------


async def hold(conn: AsyncConnection, task: Claimed) -> None:
    """Check the lease is still ours, or raise `LeaseLost`; locks the task row."""
    found = (
        await conn.execute(
            select(task_table.c.id)
            .where(task_table.c.id == task.task_id, task_table.c.lease_token == task.lease_token)
            .with_for_update()
        )
    ).first()
    if found is None:
        raise LeaseLost()


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
    await _apply(conn, task, report, at=at)
    flag = (
        await conn.execute(
            select(jobs.c.cancel_requested, jobs.c.status).where(jobs.c.id == task.job_id)
        )
    ).one()
    return bool(flag.cancel_requested) or flag.status != "running"


async def _apply(conn: AsyncConnection, task: Claimed, report: Report, *, at: float) -> None:
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
        job_progress = await _job_progress(conn, task.job_id, task.stage)
        for kind, data in report.events:
            if kind == "progress":
                data.setdefault("progress", job_progress)
    if report.events:
        await events.append(conn, task.job_id, report.events, at=at)
    report.events, report.progress, report.cost_delta = [], None, 0.0


async def _job_progress(conn: AsyncConnection, job_id: str, stage: str) -> float:
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


# -- outcomes ------------------------------------------------------------------------


async def complete(
    conn: AsyncConnection,
    task: Claimed,
    output: Any,
    report: Report,
    *,
    registry: Registry,
    at: float,
    aging_s: float = DEFAULT_AGING_S,
) -> None:
    """Record a successful run and queue what it unblocks, or finish the job.

    Raises:
        LeaseLost: the lease is gone; nothing was written.
    """
    await hold(conn, task)
    await _apply(conn, task, report, at=at)
    await conn.execute(delete(task_table).where(task_table.c.id == task.task_id))
    pipeline = registry.get(task.pipeline)
    if task.item_index is not None:
        await _record_item(conn, task, pipeline, "succeeded", data=output, error=None, at=at)
        return
    await conn.execute(
        update(stages)
        .where(stages.c.job_id == task.job_id, stages.c.name == task.stage)
        .values(status="succeeded", output=output, progress=1.0, finished_at=at, error=None)
    )
    await events.append(
        conn,
        task.job_id,
        [("stage_update", {"stage": task.stage, "status": "succeeded", "attempt": task.attempt})],
        at=at,
    )
    await _advance(conn, task.job_id, pipeline, task.stage, at=at, aging_s=aging_s)


async def _record_item(
    conn: AsyncConnection,
    task: Claimed,
    pipeline: Pipeline,
    status: str,
    *,
    data: Any,
    error: dict[str, Any] | None,
    at: float,
    aging_s: float = DEFAULT_AGING_S,
) -> None:
    index = task.item_index
    assert index is not None
    await conn.execute(
        delete(records).where(
            records.c.job_id == task.job_id,
            records.c.stage == task.stage,
            records.c.item_index == index,
        )
    )
    await conn.execute(
        insert(records).values(
            job_id=task.job_id,
            stage=task.stage,
            item_index=index,
            key=task.item_key or str(index),
            status=status,
            data=data,
            error=error,
            attempt=task.attempt,
            created_at=at,
        )
    )
    column = stages.c.items_succeeded if status == "succeeded" else stages.c.items_failed
    counted = (
        await conn.execute(
            update(stages)
            .where(stages.c.job_id == task.job_id, stages.c.name == task.stage)
            .values({column.name: column + 1})
            .returning(stages.c.items_total, stages.c.items_succeeded, stages.c.items_failed)
        )
    ).one()
    job_column = jobs.c.records_succeeded if status == "succeeded" else jobs.c.records_failed
    await conn.execute(
        update(jobs).where(jobs.c.id == task.job_id).values({job_column.name: job_column + 1})
    )
    done = counted.items_succeeded + counted.items_failed
    progress = done / counted.items_total if counted.items_total else 1.0
    await conn.execute(
        update(stages)
        .where(stages.c.job_id == task.job_id, stages.c.name == task.stage)
        .values(progress=progress)
    )
    job_progress = await _job_progress(conn, task.job_id, task.stage)
    await events.append(
        conn,
        task.job_id,
        [
            (
                "progress",
                {
                    "progress": job_progress,
                    "stage": task.stage,
                    "stage_progress": progress,
                    "message": f"{task.item_key}: {status}",
                },
            )
        ],
        at=at,
    )
    if done >= counted.items_total:
        await finish_map_stage(conn, task.job_id, pipeline, task.stage, at=at, aging_s=aging_s)


async def finish_map_stage(
    conn: AsyncConnection,
    job_id: str,
    pipeline: Pipeline,
    name: str,
    *,
    at: float,
    aging_s: float = DEFAULT_AGING_S,
) -> None:
    """Close a map stage whose items are all done: its output lists successes and errors."""
    job = (
        await conn.execute(
            select(jobs.c.status, jobs.c.cancel_requested).where(jobs.c.id == job_id)
        )
    ).one()
    if job.status not in ("queued", "running") or job.cancel_requested:
        return
    rows = (
        await conn.execute(
            select(
                records.c.item_index,
                records.c.key,
                records.c.status,
                records.c.data,
                records.c.error,
            )
            .where(records.c.job_id == job_id, records.c.stage == name)
            .order_by(records.c.item_index)
        )
    ).all()
    output = {
        "results": [
            {"key": r.key, "index": r.item_index, "data": r.data}
            for r in rows
            if r.status == "succeeded"
        ],
        "errors": [
            {"key": r.key, "index": r.item_index, "error": r.error}
            for r in rows
            if r.status != "succeeded"
        ],
    }
    attempt = (
        await conn.execute(
            update(stages)
            .where(stages.c.job_id == job_id, stages.c.name == name)
            .values(status="succeeded", output=output, progress=1.0, finished_at=at)
            .returning(stages.c.attempt)
        )
    ).scalar_one()
    await events.append(
        conn,
        job_id,
        [("stage_update", {"stage": name, "status": "succeeded", "attempt": attempt})],
        at=at,
    )
    await _advance(conn, job_id, pipeline, name, at=at, aging_s=aging_s)


async def _advance(
    conn: AsyncConnection,
    job_id: str,
    pipeline: Pipeline,
    finished: str,
    *,
    at: float,
    aging_s: float,
) -> None:
    """After a stage succeeded: queue dependents that became ready, or finish the job."""
    from jobgate.store.repositories import jobs as job_repo

    statuses = dict(
        (
            await conn.execute(
                select(stages.c.name, stages.c.status).where(stages.c.job_id == job_id)
            )
        ).all()
    )
    job = (
        await conn.execute(
            select(jobs.c.status, jobs.c.cancel_requested).where(jobs.c.id == job_id)
        )
    ).one()
    if job.status not in ("queued", "running"):
        return
    if job.cancel_requested:
        if not await _has_tasks(conn, job_id):
            await job_repo.finalize(conn, job_id, "cancelled", at=at)
        return
    if all(status == "succeeded" for status in statuses.values()):
        sinks = pipeline.sinks()
        outputs = await _outputs(conn, job_id, sinks)
        result = outputs[sinks[0]] if len(sinks) == 1 else {name: outputs[name] for name in sinks}
        await job_repo.finalize(conn, job_id, "succeeded", at=at, result=result)
        return
    for name in pipeline.dependents(finished):
        stage = pipeline.stages[name]
        if statuses.get(name) == "pending" and all(
            statuses.get(d) == "succeeded" for d in stage.after
        ):
            await enqueue_stage(conn, job_id, pipeline, name, at=at, aging_s=aging_s)


async def _has_tasks(conn: AsyncConnection, job_id: str) -> bool:
    count = await conn.scalar(
        select(func.count()).select_from(task_table).where(task_table.c.job_id == job_id)
    )
    return bool(count)


async def fail(
    conn: AsyncConnection,
    task: Claimed,
    error: dict[str, Any],
    report: Report,
    *,
    retryable: bool,
    registry: Registry,
    at: float,
    backoff_cap_s: float = 300.0,
    aging_s: float = DEFAULT_AGING_S,
) -> float | None:
    """Record a failed run: retry it later, fail its item, or fail the job.

    Args:
        error: `{"type", "message"}`; the stage name is added.
        retryable: False for failures no retry can fix (budget exceeded).

    Returns:
        The retry delay in seconds, or None when no retry follows.

    Raises:
        LeaseLost: the lease is gone; nothing was written.
    """
    await hold(conn, task)
    await _apply(conn, task, report, at=at)
    pipeline = registry.get(task.pipeline)
    stage = pipeline.stages[task.stage]
    error = {**error, "stage": task.stage}
    job = (
        await conn.execute(
            select(jobs.c.status, jobs.c.cancel_requested).where(jobs.c.id == task.job_id)
        )
    ).one()
    stopping = job.cancel_requested or job.status not in ("queued", "running")
    # Attempts count over the stage's whole life; retries allow that many more runs.
    runs_allowed = stage.retries + 1
    # `deliveries` counts the runs of this task row, which a manual retry creates anew.
    runs_this_life = task.deliveries
    if retryable and not stopping and runs_this_life < runs_allowed:
        delay = backoff_delay(stage, runs_this_life, backoff_cap_s)
        await conn.execute(
            update(task_table)
            .where(task_table.c.id == task.task_id)
            .values(
                lease_token=None, lease_expires_at=None, leased_by=None, available_at=at + delay
            )
        )
        if task.item_index is None:
            await conn.execute(
                update(stages)
                .where(stages.c.job_id == task.job_id, stages.c.name == task.stage)
                .values(status="queued", error=error, progress=0.0)
            )
        await events.append(
            conn,
            task.job_id,
            [
                (
                    "stage_update",
                    {
                        "stage": task.stage,
                        "status": "queued",
                        "attempt": task.attempt,
                        "error": error,
                        "retry_in_s": round(delay, 3),
                    },
                )
            ],
            at=at,
        )
        return delay
    await conn.execute(delete(task_table).where(task_table.c.id == task.task_id))
    if task.item_index is not None and retryable and not stopping:
        await _record_item(
            conn, task, pipeline, "failed", data=None, error=error, at=at, aging_s=aging_s
        )
        return None
    await conn.execute(
        update(stages)
        .where(stages.c.job_id == task.job_id, stages.c.name == task.stage)
        .values(status="failed" if not stopping else "cancelled", error=error, finished_at=at)
    )
    await events.append(
        conn,
        task.job_id,
        [
            (
                "stage_update",
                {"stage": task.stage, "status": "failed", "attempt": task.attempt, "error": error},
            )
        ],
        at=at,
    )
    await _fail_job(conn, task.job_id, error, at=at)
    return None


async def _fail_job(
    conn: AsyncConnection, job_id: str, error: dict[str, Any], *, at: float
) -> None:
    from jobgate.store.repositories import jobs as job_repo

    job = (
        await conn.execute(
            select(jobs.c.status, jobs.c.cancel_requested).where(jobs.c.id == job_id)
        )
    ).one()
    if job.status not in ("queued", "running"):
        return
    if job.cancel_requested:
        if not await _has_tasks(conn, job_id):
            await job_repo.finalize(conn, job_id, "cancelled", at=at)
        return
    await job_repo.finalize(conn, job_id, "failed", at=at, error=error)
    # Sibling stages still running see the job finished at their next lease renewal.


async def stopped(conn: AsyncConnection, task: Claimed, report: Report, *, at: float) -> None:
    """Record that a run stopped because its job is cancelled (or already finished).

    Raises:
        LeaseLost: the lease is gone; nothing was written.
    """
    from jobgate.store.repositories import jobs as job_repo

    await hold(conn, task)
    await _apply(conn, task, report, at=at)
    await conn.execute(delete(task_table).where(task_table.c.id == task.task_id))
    job = (await conn.execute(select(jobs.c.status).where(jobs.c.id == task.job_id))).one()
    if job.status in ("queued", "running") and not await _has_tasks(conn, task.job_id):
        await job_repo.finalize(conn, task.job_id, "cancelled", at=at)


async def release(conn: AsyncConnection, task: Claimed, report: Report, *, at: float) -> None:
    """Hand a task back unfinished (worker shutdown): it runs again, this run uncounted."""
    await hold(conn, task)
    await _apply(conn, task, report, at=at)
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


async def sweep(
    conn: AsyncConnection,
    *,
    registry: Registry,
    at: float,
    max_deliveries: int = 5,
    limit: int = 100,
) -> int:
    """Return tasks whose lease expired to the queue; fail those delivered too often.

    Returns:
        How many expired leases were handled.
    """
    expired = (
        (
            await conn.execute(
                select(task_table)
                .where(task_table.c.lease_expires_at < at)
                .order_by(task_table.c.lease_expires_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        .mappings()
        .all()
    )
    for row in expired:
        task = Claimed(
            task_id=row["id"],
            lease_token=row["lease_token"],
            lease_expires_at=row["lease_expires_at"],
            job_id=row["job_id"],
            owner=row["owner"],
            pipeline=row["pipeline"],
            stage=row["stage"],
            item_index=row["item_index"],
            attempt=row["attempt"],
            deliveries=row["deliveries"],
            params={},
            files=[],
            budget_usd=0.0,
            actual_usd=0.0,
            cancel_requested=False,
        )
        job = (
            await conn.execute(
                select(jobs.c.status, jobs.c.cancel_requested).where(jobs.c.id == row["job_id"])
            )
        ).one()
        if job.cancel_requested or job.status not in ("queued", "running"):
            await stopped(conn, task, Report(), at=at)
        elif row["deliveries"] >= max_deliveries:
            error = {
                "type": "lost",
                "message": f"the stage's worker was lost {row['deliveries']} times",
            }
            await fail(conn, task, error, Report(), retryable=False, registry=registry, at=at)
        else:
            await conn.execute(
                update(task_table)
                .where(task_table.c.id == row["id"])
                .values(lease_token=None, lease_expires_at=None, leased_by=None, available_at=at)
            )
            await events.append(
                conn,
                row["job_id"],
                [
                    (
                        "stage_update",
                        {
                            "stage": row["stage"],
                            "status": "queued",
                            "attempt": row["attempt"],
                            "error": {
                                "type": "lost",
                                "message": "the worker running it was lost",
                                "stage": row["stage"],
                            },
                        },
                    )
                ],
                at=at,
            )
    return len(expired)


async def depth(conn: AsyncConnection) -> dict[str, int]:
    """Tasks waiting (not leased) per queue."""
    rows = await conn.execute(
        select(task_table.c.queue, func.count())
        .where(task_table.c.lease_token.is_(None))
        .group_by(task_table.c.queue)
    )
    return {queue: int(n) for queue, n in rows}


def as_mapping(row: RowMapping) -> dict[str, Any]:
    return dict(row)
