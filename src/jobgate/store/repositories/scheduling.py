"""Moving a job along its DAG: queueing stages that became ready, closing map stages,
and finishing the job."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import String, bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.pipelines import Pipeline, Stage
from jobgate.store.repositories import events, tasks, webhooks
from jobgate.store.repositories.tasks import DEFAULT_AGING_S
from jobgate.store.tables import artifacts, jobs, records, stages
from jobgate.store.tables import tasks as task_table


async def enqueue_stage(
    conn: AsyncConnection,
    job_id: str,
    pipeline: Pipeline,
    name: str,
    *,
    at: float,
    aging_s: float = DEFAULT_AGING_S,
    carry: Sequence[events.Event] = (),
) -> None:
    """Queue a stage whose dependencies all succeeded (a map stage: its missing items).

    Args:
        carry: events of the caller's to write first, in the same append.
    """
    stage = pipeline.stages[name]
    job = (
        (
            await conn.execute(
                select(jobs.c.owner, jobs.c.priority, jobs.c.fair_key, jobs.c.files).where(
                    jobs.c.id == job_id
                )
            )
        )
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
    stage_attempt = (
        await conn.execute(
            update(stages)
            .where(stages.c.job_id == job_id, stages.c.name == name)
            .values(**values)
            .returning(stages.c.attempt)
        )
    ).scalar_one()
    if stage.is_map:
        await _recount_records(conn, job_id)  # after `items_total` is set: it is summed
    await events.append(
        conn,
        job_id,
        [*carry, ("stage_update", {"stage": name, "status": "queued", "attempt": stage_attempt})],
        at=at,
    )
    if not indexes:
        await finish_map_stage(conn, job_id, pipeline, name, at=at, aging_s=aging_s)
        return
    attempt = stage_attempt if not stage.is_map else 0
    await conn.execute(
        insert(task_table),
        [
            tasks.task_row(
                job_id,
                job["owner"],
                pipeline.name,
                stage,
                i,
                job["priority"],
                job["fair_key"],
                attempt=attempt,
                at=at,
                aging_s=aging_s,
            )
            for i in indexes
        ],
    )
    await tasks.notify_ready(conn, [(stage.queue, at)] * len(indexes), at=at)


async def _item_count(conn: AsyncConnection, job_id: str, stage: Stage, files: list[Any]) -> int:
    if stage.map_over == "files":
        return len(files)
    source = await tasks.outputs(conn, job_id, [stage.map_over or ""])
    value = source.get(stage.map_over or "")
    return len(value) if isinstance(value, list) else 0


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
    job = await tasks.job_state(conn, job_id)
    if job.stopping:
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
    await advance(conn, job_id, pipeline, name, at=at, aging_s=aging_s)


_STATUSES = select(stages.c.name, stages.c.status).where(
    stages.c.job_id == bindparam("b_job_id", type_=String)
)


async def advance(
    conn: AsyncConnection,
    job_id: str,
    pipeline: Pipeline,
    finished: str,
    *,
    at: float,
    aging_s: float,
    carry: Sequence[events.Event] = (),
    output: Any = None,
    job: tasks.JobState | None = None,
) -> None:
    """After a stage succeeded: queue dependents that became ready, or finish the job.

    Args:
        carry: events of the caller's to write first, in the same append.
        output: the finished stage's output (saves reading it back for the result).
        job: the job's state, if the caller read it under the job's lock.
    """
    if len(pipeline.stages) == 1:
        statuses = {finished: "succeeded"}  # its only stage: nothing else to read
    else:
        statuses = dict((await conn.execute(_STATUSES, {"b_job_id": job_id})).all())
    if job is None:
        job = await tasks.job_state(conn, job_id)
    if job.status not in ("queued", "running"):
        # Finished meanwhile (a sibling stage failed it): the job's log is closed. The
        # stage's success stays on its row, so a retry does not run it again.
        return
    if job.cancel_requested:
        if await tasks.has_tasks(conn, job_id):
            await events.append(conn, job_id, carry, at=at)
        else:
            await finalize(conn, job_id, "cancelled", at=at, carry=carry, webhook=job.webhook)
        return
    if all(status == "succeeded" for status in statuses.values()):
        if pipeline.sinks() == [finished]:
            result = output
        else:
            result = await job_result(conn, job_id, pipeline)
        await finalize(
            conn, job_id, "succeeded", at=at, result=result, carry=carry, webhook=job.webhook
        )
        return
    ready = [
        name
        for name in pipeline.dependents(finished)
        if statuses.get(name) == "pending"
        and all(statuses.get(d) == "succeeded" for d in pipeline.stages[name].after)
    ]
    if not ready:
        await events.append(conn, job_id, carry, at=at)
    for i, name in enumerate(ready):
        await enqueue_stage(
            conn, job_id, pipeline, name, at=at, aging_s=aging_s, carry=carry if i == 0 else ()
        )


async def job_result(conn: AsyncConnection, job_id: str, pipeline: Pipeline) -> Any:
    """A job's result once every stage succeeded: its sink's output, or by sink name."""
    sinks = pipeline.sinks()
    outputs = await tasks.outputs(conn, job_id, sinks)
    return outputs[sinks[0]] if len(sinks) == 1 else {n: outputs[n] for n in sinks}


async def finalize(
    conn: AsyncConnection,
    job_id: str,
    status: str,
    *,
    at: float,
    result: Any = None,
    error: dict[str, Any] | None = None,
    carry: Sequence[events.Event] = (),
    webhook: Mapping[str, Any] | None,
) -> None:
    """Move a job to a terminal state, closing its unfinished stages, with its last event.

    A job finishes `succeeded` only once every stage has, so then nothing is left open.

    Args:
        webhook: the job's webhook as the caller read it (under the job's lock): when
            it asks for this end, its delivery is queued in the same transaction. Jobs
            without one cost no statement more.
    """
    stage_rows: Sequence[Any] = ()
    if status != "succeeded":
        stage_rows = (
            await conn.execute(
                select(stages.c.name, stages.c.status, stages.c.attempt)
                .where(stages.c.job_id == job_id)
                .order_by(stages.c.position)
            )
        ).all()
    closing = "cancelled" if status == "cancelled" else "skipped"
    updates: list[tuple[str, dict[str, Any]]] = []
    for name, stage_status, attempt in stage_rows:
        if stage_status in ("pending", "queued", "running"):
            new = "cancelled" if stage_status != "pending" or status == "cancelled" else closing
            await conn.execute(
                update(stages)
                .where(stages.c.job_id == job_id, stages.c.name == name)
                .values(status=new, finished_at=at)
            )
            updates.append(("stage_update", {"stage": name, "status": new, "attempt": attempt}))
    values: dict[str, Any] = {"status": status, "finished_at": at, "cancel_requested": False}
    if status == "succeeded":
        values.update(result=result, progress=1.0, error=None)
    elif status == "failed":
        values.update(error=error)
    if status == "cancelled":
        # A cancelled job's intermediate artifacts are not results: drop them (the blobs
        # stay while other rows point at them).
        await conn.execute(delete(artifacts).where(artifacts.c.job_id == job_id))
    if status != "succeeded":
        await tasks.drop_waiting(conn, job_id)
    final: tuple[str, dict[str, Any]]
    if status == "succeeded":
        final = ("completed", {"result": result})
    elif status == "failed":
        final = ("error", {"error": error})
    else:
        final = ("cancelled", {})
    await events.append(conn, job_id, [*carry, *updates, final], at=at, job_values=values)
    if webhook:
        await webhooks.queue(conn, job_id, status, webhook, at=at)
