"""Claims: the best waiting tasks over several queues, read in order from an index."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.ids import now, uuid7
from jobgate.pipelines import Registry
from jobgate.store import pg
from jobgate.store.database import Database
from jobgate.store.repositories import jobs as job_repo
from jobgate.store.repositories import outcomes, tasks, workers

REGISTRY = Registry.from_paths([])


async def _submit(db: Database, count: int, *, pipeline: str = "noop") -> list[str]:
    new = [
        job_repo.NewJob(
            id=uuid7(),
            pipeline=REGISTRY.get(pipeline),
            owner="o",
            params=REGISTRY.get(pipeline).validate_params({}),
            files=[],
            priority=0,
            budget_usd=1.0,
            estimated_usd=0.0,
        )
        for _ in range(count)
    ]
    async with db.write() as conn:
        for start in range(0, count, 500):
            await job_repo.create(conn, new[start : start + 500], at=now())
    return [job.id for job in new]


async def _place(conn: AsyncConnection, job_id: str, queue: str, sort_key: float) -> None:
    await conn.execute(
        text("UPDATE tasks SET queue = :queue, sort_key = :key WHERE job_id = :job"),
        {"queue": queue, "key": sort_key, "job": job_id},
    )


async def _claim(db: Database, queues: list[str], limit: int, **kwargs: Any) -> list[str]:
    async with db.write() as conn:
        claimed = await tasks.claim(
            conn,
            worker_id="w",
            queues=queues,
            pipelines=kwargs.pop("pipelines", ["noop", "steps"]),
            limit=limit,
            lease_s=30,
            at=now(),
            registry=REGISTRY,
        )
    return [task.job_id for task in claimed]


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
async def test_a_claim_takes_the_best_tasks_over_all_its_queues(database: Database) -> None:
    """Each queue is read in order; together the claim takes the smallest sort keys
    of all its queues, skips other queues, other pipelines and tasks not yet due."""
    ids = await _submit(database, 8)
    (steps_job,) = await _submit(database, 1, pipeline="steps")
    layout = [
        ("gpu", 5.0),
        ("default", 1.0),
        ("gpu", 2.0),
        ("default", 7.0),
        ("cpu", 0.5),  # a queue the claim does not name
        ("gpu", 3.0),
        ("default", 4.0),
        ("default", 0.1),  # not due yet, below
    ]
    async with database.write() as conn:
        for job_id, (queue, key) in zip(ids, layout, strict=True):
            await _place(conn, job_id, queue, key)
        await _place(conn, steps_job, "gpu", 0.2)  # a pipeline the claim does not name
        await conn.execute(
            text("UPDATE tasks SET available_at = :later WHERE job_id = :job"),
            {"later": now() + 3600, "job": ids[7]},
        )
    best = await _claim(database, ["default", "gpu"], 4, pipelines=["noop"])
    assert best == [ids[1], ids[2], ids[5], ids[6]]
    rest = await _claim(database, ["gpu", "default"], 10, pipelines=["noop"])
    assert rest == [ids[0], ids[3]]
    assert await _claim(database, ["cpu"], 10) == [ids[4]]
    assert await _claim(database, ["gpu"], 10, pipelines=["noop", "steps"]) == [steps_job]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_claims_and_renewals_read_indexes_not_the_backlog(database: Database) -> None:
    """With thousands of waiting tasks, a claim's pick walks `ix_tasks_ready` in order
    and a renewal finds its tasks by id: neither scans a table, with a plan made for
    the values or PostgreSQL's generic plan of the prepared statement."""
    await _submit(database, 3000)
    async with database.write() as conn:
        await conn.execute(text("ANALYZE"))
    driver = await database.engine.raw_connection()
    try:
        connection: Any = driver.driver_connection
        at = now()
        lease_args = f"'w', 'p-', {at + 30}, {at}, ARRAY['default', 'gpu'], ARRAY['noop']"
        for limit in (4, 48):
            claim = tasks._claim_next_pg(limit)
            for mode in ("force_custom_plan", "force_generic_plan"):
                await connection.execute(f"SET plan_cache_mode = {mode}")
                async with connection.transaction():
                    await connection.execute("PREPARE claim_plan AS " + claim)
                    rows = await connection.fetch(f"EXPLAIN EXECUTE claim_plan({lease_args})")
                    await connection.execute("DEALLOCATE claim_plan")
                plan = "\n".join(row[0] for row in rows)
                assert "ix_tasks_ready" in plan, plan
                # nor of stages or jobs: the claimed rows' own are found by key
                assert "Seq Scan" not in plan, plan
    finally:
        driver.close()
    async with database.write() as conn:
        (task_id, token), *_ = [
            tuple(row)
            for row in await pg.records(
                conn,
                "UPDATE tasks SET lease_token = 't-' || id WHERE id IN "
                "(SELECT id FROM tasks ORDER BY id LIMIT 2) RETURNING id, lease_token",
            )
        ]
        leases = {task_id: token, 10**9: "gone"}
        held, _ = await tasks.renew(conn, leases, lease_s=30, at=now())
    assert held == {token}
    driver = await database.engine.raw_connection()
    try:
        connection = driver.driver_connection
        for mode in ("force_custom_plan", "force_generic_plan"):
            await connection.execute(f"SET plan_cache_mode = {mode}")
            async with connection.transaction():
                await connection.execute("PREPARE renew_plan AS " + tasks._RENEW_PG)
                rows = await connection.fetch(
                    f"EXPLAIN EXECUTE renew_plan(ARRAY[{task_id}], ARRAY['{token}'], 1, 2, 'w')"
                )
                await connection.execute("DEALLOCATE renew_plan")
            plan = "\n".join(row[0] for row in rows)
            assert "pk_tasks" in plan, plan
            # (the workers table holds no worker here: scanning it is the right plan)
            assert "Seq Scan on tasks" not in plan, plan
            assert "Seq Scan on jobs" not in plan, plan
    finally:
        driver.close()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_claim_waits_for_an_outcome_holding_its_job_without_deadlock(
    database: Database,
) -> None:
    """An outcome locks its job, then writes the job's stages; a claim of one of the
    job's tasks meanwhile waits for the job before it touches a stage, so the two
    never lock each other out (PostgreSQL would abort one after `deadlock_timeout`)."""
    (job_id,) = await _submit(database, 1)
    async with database.write() as outcome:
        await outcome.execute(text("SET LOCAL lock_timeout = '10s'"))
        await outcome.execute(
            text("SELECT id FROM jobs WHERE id = :job FOR UPDATE"), {"job": job_id}
        )
        claim = asyncio.create_task(_claim(database, ["default"], 1))
        deadline = time.monotonic() + 10
        while not await _waiting_for_a_lock(database):
            assert not claim.done(), claim.result()
            assert time.monotonic() < deadline, "the claim never waited for the job"
            await asyncio.sleep(0.02)
        # The outcome's own write to the job's stage: free to go, the claim holds no stage.
        await outcome.execute(
            text("UPDATE stages SET progress = 0.5 WHERE job_id = :job"), {"job": job_id}
        )
    assert await asyncio.wait_for(claim, 10) == [job_id]
    async with database.read() as conn:
        stage = (
            await conn.execute(
                text("SELECT status, progress FROM stages WHERE job_id = :job"), {"job": job_id}
            )
        ).one()
    assert tuple(stage) == ("running", 0.5)


async def _waiting_for_a_lock(db: Database) -> bool:
    async with db.read() as conn:
        waiting = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_renewal_skips_a_task_another_transaction_holds(database: Database) -> None:
    """A renewal does not wait for a task row its outcome is being written on: that
    lease counts as held, unrenewed; the free one is renewed, a lost one is not held."""
    await _submit(database, 3)
    async with database.write() as conn:
        rows = await conn.execute(
            text(
                "UPDATE tasks SET lease_token = 't-' || id, lease_expires_at = 1"
                " RETURNING id, lease_token"
            )
        )
        leases: dict[int, str] = {row.id: row.lease_token for row in rows}
    busy, free, lost = sorted(leases)
    async with database.write() as conn:
        await conn.execute(
            text("UPDATE tasks SET lease_token = 'taken' WHERE id = :id"), {"id": lost}
        )
    async with database.write() as outcome:
        await outcome.execute(text("SELECT id FROM tasks WHERE id = :id FOR UPDATE"), {"id": busy})
        async with database.write() as conn:
            await conn.execute(text("SET LOCAL lock_timeout = '2s'"))
            held, _ = await tasks.renew(conn, leases, lease_s=30, at=now())
    assert held == {leases[busy], leases[free]}
    async with database.read() as conn:
        expiries = dict(
            tuple(row) for row in await conn.execute(text("SELECT id, lease_expires_at FROM tasks"))
        )
    assert expiries[free] > 1
    assert expiries[busy] == 1


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_sweep_locks_jobs_in_order_without_deadlock(database: Database) -> None:
    """A sweep requeues expired leases job by job in job order, whatever order the
    leases expired in: a transaction locking the same jobs in that order (a claim, a
    group commit) waits for it or it for them, never both."""
    first, second = sorted(await _submit(database, 2))
    async with database.write() as conn:
        for job_id, expired_at in ((second, 1.0), (first, 2.0)):  # the second expired first
            await conn.execute(
                text(
                    "UPDATE tasks SET lease_token = 't-' || id, leased_by = 'gone',"
                    " lease_expires_at = :at WHERE job_id = :job"
                ),
                {"at": expired_at, "job": job_id},
            )
    lock_job = text("SELECT id FROM jobs WHERE id = :job FOR UPDATE")
    async with database.write() as other:
        await other.execute(text("SET LOCAL lock_timeout = '10s'"))
        await other.execute(lock_job, {"job": first})
        sweep = asyncio.create_task(_sweep(database))
        deadline = time.monotonic() + 10
        while not await _waiting_for_a_lock(database):
            assert not sweep.done(), sweep.result()
            assert time.monotonic() < deadline, "the sweep never waited for the first job"
            await asyncio.sleep(0.02)
        await other.execute(lock_job, {"job": second})  # free: the sweep holds no job
    assert await asyncio.wait_for(sweep, 10) == 2
    async with database.read() as conn:
        leased = await conn.scalar(text("SELECT count(*) FROM tasks WHERE lease_token IS NOT NULL"))
    assert leased == 0


async def _sweep(db: Database) -> int:
    async with db.write() as conn:
        return await outcomes.sweep(conn, registry=REGISTRY, at=now())


async def test_a_renewal_names_the_jobs_to_stop_and_sees_the_worker(database: Database) -> None:
    """A renewal extends every lease held, answers which of their jobs should stop
    (cancel requested, or no longer running), and marks its worker seen; on
    PostgreSQL it does so in one statement on an autocommit connection."""
    running, cancelled, finished = await _submit(database, 3)
    async with database.write() as conn:
        await workers.register(
            conn,
            {
                "id": "w-1",
                "host": "h",
                "pid": 1,
                "queues": ["default"],
                "pipelines": [],
                "concurrency": 3,
                "running": 3,
                "version": "test",
                "started_at": 1.0,
                "last_seen_at": 1.0,
            },
        )
        rows = await conn.execute(
            text(
                "UPDATE tasks SET lease_token = 't-' || id, lease_expires_at = 1"
                " RETURNING id, lease_token, job_id"
            )
        )
        leases: dict[int, str] = {row.id: row.lease_token for row in rows}
        await conn.execute(text("UPDATE jobs SET status = 'running'"))
        await conn.execute(
            text("UPDATE jobs SET cancel_requested = true WHERE id = :id"), {"id": cancelled}
        )
        await conn.execute(
            text("UPDATE jobs SET status = 'completed' WHERE id = :id"), {"id": finished}
        )
    at = now()
    renewing = database.write() if database.is_sqlite else database.autocommit()
    async with renewing as conn:
        held, stopping = await tasks.renew(
            conn, {**leases, 10**9: "gone"}, lease_s=30, at=at, worker_id="w-1"
        )
    assert held == set(leases.values())
    assert stopping == {cancelled, finished}
    async with database.read() as conn:
        expiries = [
            row[0] for row in await conn.execute(text("SELECT lease_expires_at FROM tasks"))
        ]
        seen = (await conn.execute(text("SELECT last_seen_at FROM workers"))).scalar_one()
    assert expiries == [pytest.approx(at + 30)] * 3
    assert seen == pytest.approx(at)
    assert running not in stopping
