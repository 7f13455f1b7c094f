"""`outcomes.complete_many` (PostgreSQL's one statement for many successful runs) and
`outcomes.finish_many` (the same for the runs that finish their jobs, on its own) leave
the store exactly as `outcomes.complete`, run by run, does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import select, text, update

from jobgate.ids import now, uuid7
from jobgate.pipelines import Registry
from jobgate.store.database import Database
from jobgate.store.repositories import jobs as job_repo
from jobgate.store.repositories import outcomes, tasks
from jobgate.store.tables import events, jobs, stages, webhook_deliveries
from jobgate.store.tables import tasks as task_table
from jobgate.worker.group_commit import GroupCommit

pytestmark = pytest.mark.service("postgres")

REGISTRY = Registry.from_paths([])
WEBHOOK = {"url": "https://hooks.example/jobgate", "events": ["completed", "error"]}


@pytest.fixture
async def db(postgres_db_url: str) -> AsyncIterator[Database]:
    database = Database(postgres_db_url)
    try:
        yield database
    finally:
        await database.aclose()


async def _submit(db: Database, pipeline: str, *, webhook: dict[str, Any] | None = None) -> str:
    job = job_repo.NewJob(
        id=uuid7(),
        pipeline=REGISTRY.get(pipeline),
        owner="o",
        params=REGISTRY.get(pipeline).validate_params({"steps": 1}),
        files=[],
        priority=0,
        budget_usd=1.0,
        estimated_usd=0.0,
        webhook=webhook,
    )
    async with db.write() as conn:
        await job_repo.create(conn, [job], at=now())
    return job.id


async def _claim(db: Database, job_id: str) -> tasks.Claimed:
    """The job's waiting task, claimed (moved to a queue of its own first)."""
    queue = f"only-{job_id}"
    async with db.write() as conn:
        await conn.execute(
            text("UPDATE tasks SET queue = :queue WHERE job_id = :job AND lease_token IS NULL"),
            {"queue": queue, "job": job_id},
        )
    async with db.write() as conn:
        claimed = await tasks.claim(
            conn,
            worker_id="w",
            queues=[queue],
            pipelines=["noop", "steps"],
            limit=10,
            lease_s=30,
            at=now(),
            registry=REGISTRY,
        )
    (task,) = claimed
    return task


async def _complete(db: Database, task: tasks.Claimed, output: Any, at: float) -> None:
    async with db.write() as conn:
        await outcomes.complete(conn, task, output, tasks.Report(), registry=REGISTRY, at=at)


async def _state(db: Database, job_id: str, at: float = 0.0) -> dict[str, Any]:
    """What a client could see of the job, its stages, events, tasks and webhooks (the
    times of the events before `at`, the time of the outcomes, left out)."""
    async with db.read() as conn:
        job = (
            await conn.execute(
                select(
                    jobs.c.status,
                    jobs.c.result,
                    jobs.c.error,
                    jobs.c.progress,
                    jobs.c.cancel_requested,
                    jobs.c.finished_at,
                    jobs.c.last_seq,
                ).where(jobs.c.id == job_id)
            )
        ).one()
        stage_rows = await conn.execute(
            select(
                stages.c.name,
                stages.c.status,
                stages.c.output,
                stages.c.progress,
                stages.c.error,
                stages.c.finished_at,
            )
            .where(stages.c.job_id == job_id)
            .order_by(stages.c.position)
        )
        event_rows = await conn.execute(
            select(events.c.seq, events.c.type, events.c.data, events.c.created_at)
            .where(events.c.job_id == job_id)
            .order_by(events.c.seq)
        )
        task_rows = await conn.execute(
            select(task_table.c.stage, task_table.c.lease_token.is_(None))
            .where(task_table.c.job_id == job_id)
            .order_by(task_table.c.stage)
        )
        deliveries = await conn.execute(
            select(webhook_deliveries.c.event).where(webhook_deliveries.c.job_id == job_id)
        )
        return {
            "job": tuple(job),
            "stages": [tuple(row) for row in stage_rows],
            "events": [
                (seq, kind, data, created if created == at else "before")
                for seq, kind, data, created in event_rows
            ],
            "tasks": [tuple(row) for row in task_rows],
            "webhooks": sorted(deliveries.scalars()),
        }


async def _twins(db: Database, pipeline: str, **kwargs: Any) -> tuple[str, str]:
    return await _submit(db, pipeline, **kwargs), await _submit(db, pipeline, **kwargs)


async def _run_twins(
    db: Database, cases: list[tuple[str, str, Any]], cancelled: tuple[str, str], at: float
) -> list[outcomes.Completion]:
    """Per (job, twin, output): both claimed, the `cancelled` pair asked to cancel, the
    job completed by `complete`; the twin's run, to record otherwise."""
    runs: list[outcomes.Completion] = []
    for by_one, twin, output in cases:
        alone = await _claim(db, by_one)
        together = await _claim(db, twin)
        if by_one in cancelled:
            async with db.write() as conn:
                await conn.execute(
                    update(jobs).where(jobs.c.id.in_(cancelled)).values(cancel_requested=True)
                )
        await _complete(db, alone, output, at)
        runs.append(outcomes.Completion(together, output))
    return runs


async def test_finishing_a_job_writes_what_complete_writes(db: Database) -> None:
    """A one-stage job, a multi-stage job's last stage, a job whose first stage
    unblocks the next, one cancelled while it ran and one with a webhook: all in one
    call, each ends exactly as `complete` would have left it."""
    cases: list[tuple[str, str, Any]] = []  # (by complete, by complete_many, output)
    at = now()
    noop = await _twins(db, "noop")
    cases.append((*noop, {"echo": {"a": [1, 2.5, None, "x\n\u2028"]}}))
    first = await _twins(db, "steps")
    cases.append((*first, {"steps": 1}))
    last = await _twins(db, "steps")
    for job_id in last:  # run prepare and work the usual way first
        for output in ({"steps": 1}, {"steps": 1, "cost_usd": 0.0}):
            await _complete(db, await _claim(db, job_id), output, at)
    cases.append((*last, {"steps": 1, "cost_usd": 0.0}))
    cancelled = await _twins(db, "noop")
    cases.append((*cancelled, {"late": True}))
    hooked = await _twins(db, "noop", webhook=WEBHOOK)
    cases.append((*hooked, {"hooked": True}))

    runs = await _run_twins(db, [(a, b, output) for a, b, output in cases], cancelled, at)
    async with db.write() as conn:
        answers = await outcomes.complete_many(conn, runs, registry=REGISTRY, at=at)
    assert answers == [None] * len(runs)

    for by_one, by_many, _ in cases:
        expected, got = await _state(db, by_one, at), await _state(db, by_many, at)
        assert got == expected, (by_one, by_many)
    ends = [(await _state(db, by_many))["job"][0] for _, by_many, _ in cases]
    assert ends == ["succeeded", "running", "succeeded", "cancelled", "succeeded"]
    assert (await _state(db, hooked[1]))["webhooks"] == ["completed"]


async def test_a_run_whose_lease_is_gone_writes_nothing_and_the_others_commit(
    db: Database,
) -> None:
    kept, lost = await _submit(db, "noop"), await _submit(db, "noop")
    kept_task, lost_task = await _claim(db, kept), await _claim(db, lost)
    before = await _state(db, lost)
    async with db.write() as conn:  # another worker took the lease over
        await conn.execute(
            text("UPDATE tasks SET lease_token = 'someone-else' WHERE id = :id"),
            {"id": lost_task.task_id},
        )
    async with db.write() as conn:
        answers = await outcomes.complete_many(
            conn,
            [outcomes.Completion(lost_task, 1), outcomes.Completion(kept_task, 2)],
            registry=REGISTRY,
            at=now(),
        )
    assert isinstance(answers[0], tasks.LeaseLost)
    assert answers[1] is None
    assert (await _state(db, lost))["job"] == before["job"]
    assert (await _state(db, lost))["events"] == before["events"]
    assert (await _state(db, kept))["job"][:2] == ("succeeded", 2)


async def test_a_group_writes_its_completions_in_one_statement(db: Database) -> None:
    """Through group commit: runs ready together are written by one call, the bus is
    told of every finished job, and a lone run later is written at once."""
    job_ids = [await _submit(db, "noop") for _ in range(6)]
    claimed = [await _claim(db, job_id) for job_id in job_ids]
    calls: list[int] = []
    told: dict[str, int] = {}
    db.on_changes = told.update

    async def complete_many(conn: Any, runs: Any) -> list[tasks.LeaseLost | None]:
        calls.append(len(runs))
        return await outcomes.complete_many(conn, runs, registry=REGISTRY, at=now())

    def never(conn: Any) -> Any:
        raise AssertionError("a completion is written by complete_many")

    group = GroupCommit(db, writers=1, complete_many=complete_many)
    await asyncio.gather(
        *(
            group.write(t.job_id, t.task_id, never, outcomes.Completion(t, n))
            for n, t in enumerate(claimed[:5])
        )
    )
    lone = claimed[5]
    await asyncio.wait_for(
        group.write(lone.job_id, lone.task_id, never, outcomes.Completion(lone, 5)), 5
    )
    assert calls == [5, 1]
    for n, job_id in enumerate(job_ids):
        state = await _state(db, job_id)
        assert state["job"][:2] == ("succeeded", n)
        assert [kind for _, kind, _, _ in state["events"]][-2:] == ["stage_update", "completed"]
        assert told[job_id] == state["job"][-1]  # the bus hears of the last event


async def test_finishing_on_its_own_writes_what_complete_writes(db: Database) -> None:
    """`finish_many` on an autocommit connection completes the runs that finish their
    jobs and writes nothing for the others (a first stage, a job cancelled meanwhile, one
    with a webhook); those, completed next by `complete_many` as group commit does, end
    exactly as `complete` leaves them too."""
    at = now()
    noop = await _twins(db, "noop")
    first = await _twins(db, "steps")
    last = await _twins(db, "steps")
    for job_id in last:
        for output in ({"steps": 1}, {"steps": 1, "cost_usd": 0.0}):
            await _complete(db, await _claim(db, job_id), output, at)
    cancelled = await _twins(db, "noop")
    hooked = await _twins(db, "noop", webhook=WEBHOOK)
    cases = [
        (*noop, {"echo": [1, 2.5, None]}, True),
        (*first, {"steps": 1}, False),
        (*last, {"steps": 1, "cost_usd": 0.0}, True),
        (*cancelled, {"late": True}, False),
        (*hooked, {"hooked": True}, False),
    ]
    runs = await _run_twins(db, [(a, b, output) for a, b, output, _ in cases], cancelled, at)
    untouched = {by_finish: await _state(db, by_finish) for _, by_finish, _, _ in cases}

    async with db.autocommit() as conn:
        answers = await outcomes.finish_many(conn, runs, registry=REGISTRY, at=at)
    assert answers == [done for *_, done in cases]
    for (_, by_finish, _, _), answer in zip(cases, answers, strict=True):
        if not answer:
            assert await _state(db, by_finish) == untouched[by_finish], by_finish
    rest = [run for run, answer in zip(runs, answers, strict=True) if not answer]
    async with db.write() as conn:
        assert await outcomes.complete_many(conn, rest, registry=REGISTRY, at=at) == [None] * 3
    for by_one, by_finish, _, _ in cases:
        assert await _state(db, by_finish, at) == await _state(db, by_one, at), by_finish


async def test_finishing_on_its_own_tells_a_lost_lease_from_a_job_that_goes_on(
    db: Database,
) -> None:
    lost_job, kept_job, later_job = [await _submit(db, p) for p in ("noop", "noop", "steps")]
    lost, kept, later = [await _claim(db, j) for j in (lost_job, kept_job, later_job)]
    async with db.write() as conn:  # another worker took the lease over
        await conn.execute(
            text("UPDATE tasks SET lease_token = 'someone-else' WHERE id = :id"),
            {"id": lost.task_id},
        )
    before = await _state(db, lost_job)
    async with db.autocommit() as conn:
        answers = await outcomes.finish_many(
            conn,
            [outcomes.Completion(t, n) for n, t in enumerate((lost, kept, later))],
            registry=REGISTRY,
            at=now(),
        )
    assert isinstance(answers[0], tasks.LeaseLost)
    assert answers[1:] == [True, False]
    assert await _state(db, lost_job) == before
    assert (await _state(db, kept_job))["job"][:2] == ("succeeded", 1)
    assert (await _state(db, later_job))["job"][0] == "running"


async def test_a_group_of_finishing_runs_needs_no_transaction(db: Database) -> None:
    """Through group commit with `finish_many`: runs that finish their jobs are written
    by that one statement and no transaction is begun; a run whose job goes on is then
    written in a transaction by `complete_many`."""
    finishing = [await _submit(db, "noop") for _ in range(4)]
    going_on = await _submit(db, "steps")
    claimed = [await _claim(db, job_id) for job_id in (*finishing, going_on)]
    begun: list[object] = []
    sqlalchemy_event.listen(db.engine.sync_engine, "begin", begun.append)
    calls: list[tuple[str, int]] = []

    async def finish_many(conn: Any, runs: Any) -> list[bool | tasks.LeaseLost]:
        calls.append(("finish", len(runs)))
        return await outcomes.finish_many(conn, runs, registry=REGISTRY, at=now())

    async def complete_many(conn: Any, runs: Any) -> list[tasks.LeaseLost | None]:
        calls.append(("complete", len(runs)))
        return await outcomes.complete_many(conn, runs, registry=REGISTRY, at=now())

    def never(conn: Any) -> Any:
        raise AssertionError("a completion is written by finish_many or complete_many")

    group = GroupCommit(db, writers=1, complete_many=complete_many, finish_many=finish_many)
    await asyncio.gather(
        *(
            group.write(t.job_id, t.task_id, never, outcomes.Completion(t, n))
            for n, t in enumerate(claimed[:4])
        )
    )
    assert (calls, begun) == ([("finish", 4)], [])
    last = claimed[4]
    await group.write(last.job_id, last.task_id, never, outcomes.Completion(last, {"steps": 1}))
    assert calls[1:] == [("finish", 1), ("complete", 1)]
    assert len(begun) == 1
    for n, job_id in enumerate(finishing):
        assert (await _state(db, job_id))["job"][:2] == ("succeeded", n)
    prepare = (await _state(db, going_on))["stages"][0]
    assert prepare[:2] == ("prepare", "succeeded")


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(node for child in plan.get("Plans", ()) for node in _nodes(child))]


@pytest.mark.parametrize(
    ("sql_name", "answered"),
    [
        ("_COMPLETE_MANY_PG", 80),  # 40 taken, 40 finished
        ("_FINISH_MANY_PG", 80),
        ("_COMPLETE_MANY_ROWS_PG", 160),  # and their 80 events, for live streams
        ("_FINISH_MANY_ROWS_PG", 160),
    ],
)
async def test_a_batch_reads_by_key_and_never_loops_over_its_own_rows(
    db: Database, sql_name: str, answered: int
) -> None:
    """With a backlog and a batch of 40, neither the plan made for the values nor the
    generic plan of the prepared statement scans a table or walks a batch's rows once
    per row of another (the generic plan once did, growing with the batch's cube)."""
    for _ in range(40):  # one by one: 40 at once would take 40 of the server's connections
        await _submit(db, "noop")
    async with db.write() as conn:
        await conn.execute(text("UPDATE tasks SET queue = 'batch'"))
    for _ in range(2000 // 500):  # a backlog besides
        async with db.write() as conn:
            new = [
                job_repo.NewJob(
                    id=uuid7(),
                    pipeline=REGISTRY.get("noop"),
                    owner="o",
                    params={},
                    files=[],
                    priority=0,
                    budget_usd=1.0,
                    estimated_usd=0.0,
                )
                for _ in range(500)
            ]
            await job_repo.create(conn, new, at=now())
    async with db.write() as conn:
        await conn.execute(text("ANALYZE"))
        claimed = await tasks.claim(
            conn,
            worker_id="w",
            queues=["batch"],
            pipelines=["noop"],
            limit=40,
            lease_s=30,
            at=now(),
            registry=REGISTRY,
        )
    assert len(claimed) == 40
    args = [
        [t.task_id for t in claimed],
        [t.lease_token for t in claimed],
        ["{}"] * 40,
        [t.stage for t in claimed],
        [True] * 40,
        [json.dumps(outcomes._succeeded(t)) for t in claimed],
        ['{"result":{}}'] * 40,
        now(),
    ]
    driver = await db.engine.raw_connection()
    try:
        connection: Any = driver.driver_connection
        for mode in ("force_custom_plan", "force_generic_plan"):
            await connection.execute(f"SET plan_cache_mode = {mode}")
            transaction = connection.transaction()
            await transaction.start()
            try:
                statement = await connection.prepare(
                    "EXPLAIN (ANALYZE, FORMAT JSON) " + getattr(outcomes, sql_name)
                )
                (plan,) = await statement.fetchval(*args)
            finally:
                await transaction.rollback()
            nodes = _nodes(plan["Plan"])
            assert len([n for n in nodes if n.get("Relation Name") == "tasks"]) >= 2, mode
            scans = [n for n in nodes if n["Node Type"] == "Seq Scan"]
            assert not scans, (mode, scans)
            looped = [n for n in nodes if n["Node Type"] == "CTE Scan" and n["Actual Loops"] > 1]
            assert not looped, (mode, looped)
            assert plan["Plan"]["Actual Rows"] == answered, mode
    finally:
        driver.close()
