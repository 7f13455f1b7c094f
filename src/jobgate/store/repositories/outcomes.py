"""Recording what a run of a stage task came to: success, failure, stop, or loss.

Every function here first checks the caller still holds the task's lease
(`tasks.hold`), so a worker whose lease was taken over writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Float, Select, String, bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.pipelines import Pipeline, Registry
from jobgate.store import pg
from jobgate.store.repositories import events, scheduling, tasks
from jobgate.store.repositories.tasks import DEFAULT_AGING_S, Claimed, Report
from jobgate.store.tables import jobs, records, stages
from jobgate.store.tables import tasks as task_table

_STAGE_SUCCEEDED = (
    update(stages)
    .where(
        stages.c.job_id == bindparam("b_job_id", type_=String),
        stages.c.name == bindparam("b_stage", type_=String),
    )
    .values(
        status="succeeded",
        output=bindparam("b_output", type_=stages.c.output.type),
        progress=1.0,
        finished_at=bindparam("b_at", type_=Float),
        error=None,
    )
)

# PostgreSQL, one statement (see `store/pg.py`): `tasks.take` (the task deleted if the
# lease is still ours, then the job's row locked) and `_STAGE_SUCCEEDED`. The stage's
# row is updated only after the job's is locked, the order every outcome and cancel
# takes. $1 task id, $2 lease token, $3 output (JSON text), $4 now, $5 stage.
_TAKE_AND_SUCCEED_PG = """
WITH taken AS (
    DELETE FROM tasks WHERE id = $1 AND lease_token = $2 RETURNING job_id
), locked AS (
    SELECT id, status, cancel_requested, webhook FROM jobs
    WHERE id IN (SELECT job_id FROM taken) FOR UPDATE
), succeeded AS (
    UPDATE stages SET status = 'succeeded', output = $3::text::jsonb, progress = 1.0,
        finished_at = $4, error = 'null'::jsonb
    WHERE job_id IN (SELECT id FROM locked) AND name = $5
)
SELECT status, cancel_requested, webhook::text AS webhook FROM locked"""


async def _take_and_succeed(
    conn: AsyncConnection, task: Claimed, output: Any, *, at: float
) -> tasks.JobState:
    row = await pg.record(
        conn,
        _TAKE_AND_SUCCEED_PG,
        task.task_id,
        task.lease_token,
        json.dumps(output),
        at,
        task.stage,
    )
    if row is None:
        raise tasks.LeaseLost()
    return tasks.JobState.from_row(row)


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
    pipeline = registry.get(task.pipeline)
    if conn.dialect.name == "postgresql" and task.item_index is None and not report:
        job = await _take_and_succeed(conn, task, output, at=at)
    else:
        job = await tasks.take(conn, task)
        await tasks.apply_report(conn, task, report, at=at, job=job)
        if task.item_index is not None:
            if job.status in ("queued", "running"):
                await _record_item(
                    conn, task, pipeline, "succeeded", job, data=output, error=None, at=at
                )
            return
        await conn.execute(
            _STAGE_SUCCEEDED,
            {"b_job_id": task.job_id, "b_stage": task.stage, "b_output": output, "b_at": at},
        )
    await scheduling.advance(
        conn,
        task.job_id,
        pipeline,
        task.stage,
        at=at,
        aging_s=aging_s,
        carry=[("stage_update", _succeeded(task))],
        output=output,
        job=job,
    )


@dataclass(frozen=True)
class Completion:
    """A successful run to record among others (`complete_many`, `finish_many`)."""

    task: Claimed
    output: Any


# The parts the two statements below share: the runs given ($1-$7) and their tasks
# locked if the lease is still ours; which locked jobs a run finishes; and finishing
# them (the job's row, its `stage_update` and `completed` events).
_INPUT_HELD = """WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bool[],
        $6::text[], $7::text[]) AS i(task_id, token, output, stage, sink, updated, done)
), held AS (
    SELECT t.id, t.job_id, i.output, i.stage, i.sink, i.updated, i.done
    FROM tasks t JOIN input i ON t.id = i.task_id AND t.lease_token = i.token
    WHERE t.id = ANY($1::bigint[])  -- by the primary key, never a scan of every task
    ORDER BY t.job_id, t.id FOR UPDATE OF t
)"""
_FINISHING = """finishing AS (
    SELECT * FROM locked l
    WHERE l.sink AND l.status IN ('queued', 'running') AND NOT l.cancel_requested
        AND (l.webhook IS NULL OR l.webhook = 'null'::jsonb)
        AND NOT EXISTS (
            SELECT 1 FROM stages s
            WHERE s.job_id = l.id AND s.name <> l.stage AND s.status <> 'succeeded'
        )
)"""
_FINISHED_LOGGED = """finished AS (
    UPDATE jobs j SET status = 'succeeded', finished_at = $8, cancel_requested = false,
        result = f.output::jsonb, progress = 1.0, error = 'null'::jsonb,
        last_seq = j.last_seq + 2
    FROM finishing f WHERE j.id = f.id
    RETURNING j.id, j.last_seq, f.task_id, f.updated, f.done
), logged AS (
    INSERT INTO events (job_id, seq, type, data, created_at)
    SELECT id, last_seq - 1, 'stage_update', updated::jsonb, $8 FROM finished
    UNION ALL
    SELECT id, last_seq, 'completed', done::jsonb, $8 FROM finished
    RETURNING id, job_id, seq, type, data
)"""
# The events the statements below wrote, after the rows they return of their own, when
# this process's live streams would use them (`events.note_rows`; the `_ROWS_` ones).
_LOGGED_ROWS = """
UNION ALL
SELECT NULL, {nulls} NULL, id, job_id, seq, type, data FROM logged"""
_NO_EVENT = (
    "NULL::bigint AS event_id, NULL::text AS event_job, NULL::int AS event_seq, "
    "NULL::text AS event_type, NULL::jsonb AS event_data"
)

# PostgreSQL, one statement for many successful runs with nothing else to record
# (`complete_many`). Per task, as `_TAKE_AND_SUCCEED_PG`: the task deleted if the lease
# is still ours, the job's row locked (tasks first, then jobs, each in (job, task)
# order, as group commit orders outcomes), and the stage marked succeeded. A job that
# this stage finishes (it is the pipeline's only sink, every other stage has
# succeeded, the job is neither stopping nor watched by a webhook) is finished too, as
# `scheduling.finalize` does: its row, then its `stage_update` and `completed` events.
# $1 task ids, $2 lease tokens, $3 outputs (JSON text), $4 stages, $5 whether the
# stage is its pipeline's only sink, $6 `stage_update` and $7 `completed` event data
# (JSON text), $8 now. Each step carries what the next needs in its own rows, so that
# none joins one CTE to another (the planner takes a CTE for one row: the nested loops
# over a batch's rows grew with its cube). Rows: per task taken, its job's state as
# locked; then per job finished here, its task and the job's last event `seq`.
_COMPLETE_MANY_PG = f"""
{_INPUT_HELD}, taken AS (
    DELETE FROM tasks t USING held h WHERE t.id = h.id
    RETURNING h.id AS task_id, h.job_id, h.output, h.stage, h.sink, h.updated, h.done
), locked AS (
    SELECT j.id, j.status, j.cancel_requested, j.webhook, t.task_id, t.output, t.stage,
        t.sink, t.updated, t.done
    FROM taken t JOIN jobs j ON j.id = t.job_id ORDER BY j.id FOR UPDATE OF j
), succeeded AS (
    UPDATE stages s SET status = 'succeeded', output = l.output::jsonb, progress = 1.0,
        finished_at = $8, error = 'null'::jsonb
    FROM locked l WHERE s.job_id = l.id AND s.name = l.stage
), {_FINISHING}, {_FINISHED_LOGGED}
SELECT task_id, status, cancel_requested, webhook::text AS webhook, NULL::bigint AS last_seq,
    {_NO_EVENT}
FROM locked
UNION ALL
SELECT task_id, NULL, NULL, NULL, last_seq, {_NO_EVENT} FROM finished"""  # noqa: S608
_COMPLETE_MANY_ROWS_PG = _COMPLETE_MANY_PG + _LOGGED_ROWS.format(nulls="NULL, NULL, NULL,")


# PostgreSQL, one statement that completes only the runs that finish their jobs
# (`finish_many`): the same checks and writes as `_COMPLETE_MANY_PG` for those, and
# nothing at all for the others, so that it may run on its own (autocommit) and leave
# the rest to a transaction. Jobs are locked before any task is deleted, as a run is
# taken only once its job is known to finish. Same parameters; rows: per task held, its
# id (deferred unless also listed as finished); then per job finished, its task and the
# job's last event `seq`.
_FINISH_MANY_PG = f"""
{_INPUT_HELD}, locked AS (
    SELECT j.id, j.status, j.cancel_requested, j.webhook, h.id AS task_id, h.output,
        h.stage, h.sink, h.updated, h.done
    FROM held h JOIN jobs j ON j.id = h.job_id ORDER BY j.id FOR UPDATE OF j
), {_FINISHING}, taken AS (
    DELETE FROM tasks t USING finishing f
    WHERE t.id = f.task_id AND t.id = ANY($1::bigint[])
), succeeded AS (
    UPDATE stages s SET status = 'succeeded', output = f.output::jsonb, progress = 1.0,
        finished_at = $8, error = 'null'::jsonb
    FROM finishing f WHERE s.job_id = f.id AND s.name = f.stage
), {_FINISHED_LOGGED}
SELECT task_id, NULL::bigint AS last_seq, {_NO_EVENT} FROM locked
UNION ALL
SELECT task_id, last_seq, {_NO_EVENT} FROM finished"""  # noqa: S608 - parts written here
_FINISH_MANY_ROWS_PG = _FINISH_MANY_PG + _LOGGED_ROWS.format(nulls="")


def _note_logged(
    conn: AsyncConnection, rows: Sequence[Any], runs: Sequence[Completion]
) -> list[Any]:
    """The statement's own rows; the events it wrote go to `events.note_rows`."""
    owners = {run.task.job_id: run.task.owner for run in runs}
    own: list[Any] = []
    logged: list[dict[str, Any]] = []
    for row in rows:
        if row["event_id"] is None:
            own.append(row)
            continue
        job_id = row["event_job"]
        logged.append(
            {
                "id": row["event_id"],
                "job_id": job_id,
                "seq": row["event_seq"],
                "type": row["event_type"],
                "data": row["event_data"],
                "owner": owners[job_id],
            }
        )
    if logged:
        events.note_rows(conn, logged)
    return own


def _only_sink(run: Completion, registry: Registry) -> bool:
    """Whether the run's stage is its pipeline's only sink: the one that can finish it."""
    return registry.get(run.task.pipeline).sinks() == [run.task.stage]


def _many_args(runs: Sequence[Completion], registry: Registry, at: float) -> list[Any]:
    """The parameters of `_COMPLETE_MANY_PG` and `_FINISH_MANY_PG`."""
    outputs = [json.dumps(run.output) for run in runs]  # as `_take_and_succeed` writes it
    return [
        [run.task.task_id for run in runs],
        [run.task.lease_token for run in runs],
        outputs,
        [run.task.stage for run in runs],
        [_only_sink(run, registry) for run in runs],
        [json.dumps(_succeeded(run.task)) for run in runs],
        [f'{{"result":{output}}}' for output in outputs],
        at,
    ]


async def finish_many(
    conn: AsyncConnection, runs: Sequence[Completion], *, registry: Registry, at: float
) -> list[bool | tasks.LeaseLost]:
    """Complete, in one statement on PostgreSQL, those of `runs` that finish their jobs
    (as `complete_many` would), and write nothing for the others.

    One statement, atomic by itself: it needs no transaction around it, which is the
    point (a `Database.autocommit()` connection: no `BEGIN` and `COMMIT` round trips).
    Runs whose stage is not their pipeline's only sink can never finish their jobs; they
    are not sent, and with none left no statement is.

    Returns:
        Per run, in order: True (completed, its job finished), False (nothing written:
        its job goes on otherwise; complete it with `complete_many` or `complete`), or
        `LeaseLost` (its lease was gone; nothing written).
    """
    candidates = [run for run in runs if _only_sink(run, registry)]
    if not candidates:
        return [False] * len(runs)
    if events.rows_wanted(conn):
        rows = await pg.records(conn, _FINISH_MANY_ROWS_PG, *_many_args(candidates, registry, at))
        rows = _note_logged(conn, rows, candidates)
    else:
        rows = await pg.records(conn, _FINISH_MANY_PG, *_many_args(candidates, registry, at))
    sent = {run.task.task_id for run in candidates}
    held: set[int] = set()
    finished: dict[int, int] = {}
    for row in rows:
        if row["last_seq"] is None:
            held.add(row["task_id"])
        else:
            finished[row["task_id"]] = int(row["last_seq"])
    answers: list[bool | tasks.LeaseLost] = []
    for run in runs:
        last_seq = finished.get(run.task.task_id)
        if last_seq is not None:
            events.note(conn, run.task.job_id, last_seq)
            answers.append(True)
        else:
            lost = run.task.task_id in sent and run.task.task_id not in held
            answers.append(tasks.LeaseLost() if lost else False)
    return answers


async def complete_many(
    conn: AsyncConnection,
    runs: Sequence[Completion],
    *,
    registry: Registry,
    at: float,
    aging_s: float = DEFAULT_AGING_S,
) -> list[tasks.LeaseLost | None]:
    """`complete` for many runs at once, on PostgreSQL, for runs of no item and with no
    report to write: one statement records them all and finishes the jobs they finish;
    the other jobs move on as `complete` moves them.

    Returns:
        Per run, in order: None, or `LeaseLost` when its lease was gone (nothing of it
        was written).
    """
    pipelines = [registry.get(run.task.pipeline) for run in runs]
    if events.rows_wanted(conn):
        rows = await pg.records(conn, _COMPLETE_MANY_ROWS_PG, *_many_args(runs, registry, at))
        rows = _note_logged(conn, rows, runs)
    else:
        rows = await pg.records(conn, _COMPLETE_MANY_PG, *_many_args(runs, registry, at))
    taken: dict[int, Any] = {}
    finished: dict[int, int] = {}
    for row in rows:
        if row["last_seq"] is None:
            taken[row["task_id"]] = row
        else:
            finished[row["task_id"]] = int(row["last_seq"])
    answers: list[tasks.LeaseLost | None] = []
    for run, pipeline in zip(runs, pipelines, strict=True):
        row = taken.get(run.task.task_id)
        if row is None:
            answers.append(tasks.LeaseLost())
            continue
        answers.append(None)
        last_seq = finished.get(run.task.task_id)
        if last_seq is not None:
            events.note(conn, run.task.job_id, last_seq)
            continue
        await scheduling.advance(
            conn,
            run.task.job_id,
            pipeline,
            run.task.stage,
            at=at,
            aging_s=aging_s,
            carry=[("stage_update", _succeeded(run.task))],
            output=run.output,
            job=tasks.JobState.from_row(row),
        )
    return answers


def _succeeded(task: Claimed) -> dict[str, Any]:
    """The data of the `stage_update` event of a successful run."""
    return {"stage": task.stage, "status": "succeeded", "attempt": task.attempt}


async def _record_item(
    conn: AsyncConnection,
    task: Claimed,
    pipeline: Pipeline,
    status: str,
    job: tasks.JobState,
    *,
    data: Any,
    error: dict[str, Any] | None,
    at: float,
    aging_s: float = DEFAULT_AGING_S,
) -> None:
    """Record one item's run; the last one closes its stage, or ends its cancelled job."""
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
    job_progress = await tasks.job_progress(conn, task.job_id, task.stage)
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
    if job.cancel_requested:
        # The cancel dropped the items still waiting, so the count never completes: the
        # last run of the job to end finishes it.
        if not await tasks.has_tasks(conn, task.job_id):
            await scheduling.finalize(conn, task.job_id, "cancelled", at=at, webhook=job.webhook)
    elif done >= counted.items_total:
        await scheduling.finish_map_stage(
            conn, task.job_id, pipeline, task.stage, at=at, aging_s=aging_s
        )


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
    runs_allowed: int | None = None,
    aging_s: float = DEFAULT_AGING_S,
) -> float | None:
    """Record a failed run: retry it later, fail its item, or fail the job.

    Args:
        error: `{"type", "message"}`; the stage name is added.
        retryable: False for failures no retry can fix (budget exceeded).
        runs_allowed: how many runs this life of the task may have (default: the
            stage's `retries` + 1; a stage whose process died gets the delivery limit).

    Returns:
        The retry delay in seconds, or None when no retry follows.

    Raises:
        LeaseLost: the lease is gone; nothing was written.
    """
    job = await tasks.hold(conn, task)
    await tasks.apply_report(conn, task, report, at=at, job=job)
    if job.status not in ("queued", "running"):
        # The job finished while this run went on (a sibling stage failed it): the run
        # ends with it. The job's log and its stages closed then; only the cost counts.
        await conn.execute(delete(task_table).where(task_table.c.id == task.task_id))
        return None
    pipeline = registry.get(task.pipeline)
    stage = pipeline.stages[task.stage]
    error = {**error, "stage": task.stage}
    stopping = job.stopping
    # Attempts count over the stage's whole life; retries allow that many more runs.
    if runs_allowed is None:
        runs_allowed = stage.retries + 1
    # `deliveries` counts the runs of this task row, which a manual retry creates anew.
    runs_this_life = task.deliveries
    if retryable and not stopping and runs_this_life < runs_allowed:
        delay = tasks.backoff_delay(stage, runs_this_life, backoff_cap_s)
        await conn.execute(
            update(task_table)
            .where(task_table.c.id == task.task_id)
            .values(
                lease_token=None, lease_expires_at=None, leased_by=None, available_at=at + delay
            )
        )
        await tasks.notify_ready(conn, [(task.queue, at + delay)], at=at)
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
            conn, task, pipeline, "failed", job, data=None, error=error, at=at, aging_s=aging_s
        )
        return None
    # A run that fails while its job is being cancelled ends the stage cancelled.
    status = "cancelled" if stopping else "failed"
    await conn.execute(
        update(stages)
        .where(stages.c.job_id == task.job_id, stages.c.name == task.stage)
        .values(status=status, error=error, finished_at=at)
    )
    await events.append(
        conn,
        task.job_id,
        [
            (
                "stage_update",
                {"stage": task.stage, "status": status, "attempt": task.attempt, "error": error},
            )
        ],
        at=at,
    )
    await _fail_job(conn, task.job_id, error, at=at)
    return None


async def _fail_job(
    conn: AsyncConnection, job_id: str, error: dict[str, Any], *, at: float
) -> None:
    job = await tasks.job_state(conn, job_id)
    if job.status not in ("queued", "running"):
        return
    if job.cancel_requested:
        if not await tasks.has_tasks(conn, job_id):
            await scheduling.finalize(conn, job_id, "cancelled", at=at, webhook=job.webhook)
        return
    await scheduling.finalize(conn, job_id, "failed", at=at, error=error, webhook=job.webhook)
    # Sibling stages still running see the job finished at their next lease renewal.


async def stopped(conn: AsyncConnection, task: Claimed, report: Report, *, at: float) -> None:
    """Record that a run stopped because its job is cancelled (or already finished).

    Raises:
        LeaseLost: the lease is gone; nothing was written.
    """
    job = await tasks.take(conn, task)
    await tasks.apply_report(conn, task, report, at=at, job=job)
    if job.status in ("queued", "running") and not await tasks.has_tasks(conn, task.job_id):
        await scheduling.finalize(conn, task.job_id, "cancelled", at=at, webhook=job.webhook)


def lapsed_leases(at: float, lost_workers: Sequence[str], limit: int) -> Select[Any]:
    """The sweep's read: up to `limit` tasks whose lease ran out by `at` or whose worker
    is one of `lost_workers`, soonest expiry first, locked (skipping locked ones)."""
    return (
        select(task_table)
        .where(
            (task_table.c.lease_expires_at < at)
            | (
                # Leased (a lease's token and expiry go together): both arms then fall
                # within the partial index of leased tasks, however many wait.
                task_table.c.leased_by.in_(lost_workers) & task_table.c.lease_expires_at.isnot(None)
            )
        )
        .order_by(task_table.c.lease_expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


async def sweep(
    conn: AsyncConnection,
    *,
    registry: Registry,
    at: float,
    max_deliveries: int = 5,
    lost_workers: Sequence[str] = (),
    limit: int = 100,
) -> int:
    """Return tasks whose lease expired, or whose worker was lost, to the queue.

    A task delivered `max_deliveries` times (its worker died under it each time) fails
    its job with error type `lost` instead of going round again.

    Returns:
        How many expired leases were handled.
    """
    found = await conn.execute(lapsed_leases(at, lost_workers, limit))
    expired = found.mappings().all()
    # Their jobs are locked one by one as they come: in (job, task) order, as claims and
    # group commits lock them, so that none of those waits on a job this sweep holds
    # while the sweep waits on one it holds.
    for row in sorted(expired, key=lambda row: (row["job_id"], row["id"])):
        task = Claimed.from_rows(row)
        job = await tasks.job_state(conn, row["job_id"])
        if job.stopping:
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
            await tasks.notify_ready(conn, [(row["queue"], at)], at=at)
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
