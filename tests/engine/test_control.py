"""Cancel, retry, leases: the engine's control paths, and the fencing that keeps them safe."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from jobgate.errors import Conflict
from jobgate.ids import now
from jobgate.store.repositories import jobs, outcomes, tasks
from tests.engine.conftest import Engine


def _is_running(snapshot: jobs.JobSnapshot) -> bool:
    return any(s["status"] == "running" for s in snapshot.stages)


async def cancel(engine: Engine, job_id: str) -> bool:
    async with engine.db.write() as conn:
        return await jobs.cancel(conn, job_id, owner=None, at=now())


async def retry(engine: Engine, job_id: str) -> None:
    async with engine.db.write() as conn:
        await jobs.retry(conn, job_id, owner=None, registry=engine.registry, at=now(), aging_s=10.0)
    for worker in engine.workers:
        worker.wake()


async def test_cancel_queued_job_is_immediate(engine: Engine) -> None:
    """With no worker, cancel ends the job at once with a `cancelled` event and no task."""
    job_id = await engine.submit("steps")
    assert await cancel(engine, job_id) is True
    snapshot = await engine.job(job_id)
    assert snapshot.job["status"] == "cancelled"
    assert {s["status"] for s in snapshot.stages} == {"cancelled"}
    assert (await engine.events(job_id))[-1]["type"] == "cancelled"
    async with engine.db.read() as conn:
        assert await tasks.depth(conn) == {}
    with pytest.raises(Conflict):
        await cancel(engine, job_id)


async def test_cancel_running_async_stage_stops_within_a_second(engine: Engine) -> None:
    """A running async stage is stopped within 1 s and the job ends `cancelled` once."""
    await engine.start_worker()
    job_id = await engine.submit("steps", {"steps": 1000, "step_ms": 50})
    await engine.wait(job_id, until=lambda s: engine.stage(s, "work")["status"] == "running")
    asked = time.monotonic()
    assert await cancel(engine, job_id) is False
    assert (await engine.job(job_id)).job["cancel_requested"] is True
    snapshot = await engine.wait(job_id)
    assert time.monotonic() - asked < 1.0
    assert snapshot.job["status"] == "cancelled"
    assert engine.stage(snapshot, "work")["status"] == "cancelled"
    assert engine.stage(snapshot, "finish")["status"] == "cancelled"
    types = [e["type"] for e in await engine.events(job_id)]
    assert types.count("cancelled") == 1
    assert "completed" not in types


async def test_cancel_seen_twice_never_strands_the_stage(engine: Engine) -> None:
    """Stages that report progress all the time see a cancel twice, from the lease
    renewal and from a progress flush; each still ends `cancelled` at once, not when
    its lease runs out (regression: the second interruption dropped the outcome)."""
    engine.settings = engine.settings.model_copy(
        update={"lease_s": 60.0, "event_flush_interval_s": 0.01}
    )
    await engine.start_worker(concurrency=8)
    for _ in range(4):
        ids = [await engine.submit("steps", {"steps": 10_000, "step_ms": 1}) for _ in range(8)]
        for job_id in ids:
            await engine.wait(
                job_id, until=lambda s: engine.stage(s, "work")["status"] == "running"
            )
        await asyncio.sleep(0.2)
        for job_id in ids:
            await cancel(engine, job_id)
        for job_id in ids:
            snapshot = await engine.wait(job_id, timeout=10)
            assert snapshot.job["status"] == "cancelled"


async def test_cancel_running_thread_stage_cooperatively(engine: Engine) -> None:
    """A sync stage polling `check_cancelled()` stops; the job ends `cancelled`, artifacts gone."""
    await engine.start_worker()
    job_id = await engine.submit("cancellable")
    await engine.wait(job_id, until=lambda s: bool(s.artifacts))
    asked = time.monotonic()
    await cancel(engine, job_id)
    snapshot = await engine.wait(job_id)
    assert time.monotonic() - asked < 1.0
    assert snapshot.job["status"] == "cancelled"
    # Its intermediate artifact went with it.
    assert snapshot.artifacts == []


async def test_retry_resumes_at_the_failed_stage_and_continues_the_attempt_count(
    engine: Engine,
) -> None:
    """After 3 failed attempts, a retry runs `work` as attempt 4 and never reruns `prepare`."""
    await engine.start_worker()
    job_id = await engine.submit(
        "steps", {"steps": 2, "step_ms": 0, "fail_at": 1, "fail_attempts": 3}
    )
    failed = await engine.wait(job_id)
    assert failed.job["status"] == "failed"
    prepare_done_at = engine.stage(failed, "prepare")["finished_at"]
    await retry(engine, job_id)
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "succeeded"
    assert snapshot.job["error"] is None
    assert engine.stage(snapshot, "work")["attempt"] == 4
    assert engine.stage(snapshot, "prepare")["attempt"] == 1
    assert engine.stage(snapshot, "prepare")["finished_at"] == prepare_done_at


async def test_retry_of_a_cancelled_map_job_keeps_succeeded_items(engine: Engine) -> None:
    """Retrying reruns only the items that did not succeed."""
    job_id = await engine.submit("mapper", {"items": ["a", "b"]})
    await cancel(engine, job_id)
    await engine.start_worker()
    await retry(engine, job_id)
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "succeeded"
    assert snapshot.job["result"]["texts"] == ["A", "B"]


async def test_retry_of_a_job_cancelled_after_its_last_stage_succeeded_ends_it_succeeded(
    engine: Engine,
) -> None:
    """A cancel that waits for a running stage which then succeeds leaves the job
    `cancelled` with every stage succeeded; a retry has nothing to run and ends the
    job `succeeded` with its result (regression: it stayed `queued` for good)."""
    job_id = await engine.submit("noop", {"x": 7})
    [task] = await _claim(engine)
    assert await cancel(engine, job_id) is False
    await _complete(engine, task, {"x": 7})
    cancelled = await engine.job(job_id)
    assert cancelled.job["status"] == "cancelled"
    assert {s["status"] for s in cancelled.stages} == {"succeeded"}
    await retry(engine, job_id)
    snapshot = await engine.job(job_id)
    assert snapshot.job["status"] == "succeeded"
    assert snapshot.job["result"] == {"x": 7}
    assert [e["type"] for e in await engine.events(job_id)][-2:] == ["cancelled", "completed"]


async def test_retry_refuses_jobs_that_are_not_failed_or_cancelled(engine: Engine) -> None:
    job_id = await engine.submit("noop")
    with pytest.raises(Conflict):
        await retry(engine, job_id)


async def _claim(
    engine: Engine, *, at: float | None = None, worker: str = "w1", limit: int = 10
) -> list[tasks.Claimed]:
    async with engine.db.write() as conn:
        return await tasks.claim(
            conn,
            worker_id=worker,
            queues=["default"],
            pipelines=engine.registry.names(),
            limit=limit,
            lease_s=engine.settings.lease_s,
            at=at or now(),
            registry=engine.registry,
        )


async def test_a_task_is_claimed_by_one_worker_only(engine: Engine) -> None:
    """Two claims never get the same task."""
    await engine.submit("noop")
    first, second = await _claim(engine, worker="a"), await _claim(engine, worker="b")
    assert len(first) == 1
    assert second == []


async def test_zombie_cannot_commit_after_its_lease_was_taken_over(engine: Engine) -> None:
    """An expired lease is swept and re-claimed; the old holder's outcome is refused."""
    job_id = await engine.submit("noop", {"x": 1})
    [zombie] = await _claim(engine, worker="zombie")
    later = now() + engine.settings.lease_s + 1
    async with engine.db.write() as conn:
        assert await outcomes.sweep(conn, registry=engine.registry, at=later) == 1
    [fresh] = await _claim(engine, worker="fresh", at=later)
    assert fresh.attempt == 2
    assert fresh.lease_token != zombie.lease_token
    with pytest.raises(tasks.LeaseLost):
        async with engine.db.write() as conn:
            await outcomes.complete(
                conn, zombie, {"zombie": True}, tasks.Report(), registry=engine.registry, at=later
            )
    with pytest.raises(tasks.LeaseLost):
        async with engine.db.write() as conn:
            await tasks.flush(conn, zombie, tasks.Report(progress=0.5), lease_s=1, at=later)
    async with engine.db.write() as conn:
        await outcomes.complete(
            conn, fresh, {"x": 1}, tasks.Report(), registry=engine.registry, at=later
        )
    snapshot = await engine.job(job_id)
    assert snapshot.job["status"] == "succeeded"
    assert snapshot.job["result"] == {"x": 1}
    types = [e["type"] for e in await engine.events(job_id)]
    assert types.count("completed") == 1


async def _complete(engine: Engine, task: tasks.Claimed, output: object, **report: Any) -> None:
    async with engine.db.write() as conn:
        await outcomes.complete(
            conn, task, output, tasks.Report(**report), registry=engine.registry, at=now()
        )


async def test_a_cancelled_map_job_ends_when_its_last_running_item_succeeds(
    engine: Engine,
) -> None:
    """Cancel drops a map stage's waiting items; the running one that then succeeds
    (a stage that never checks) ends the job `cancelled`, with one terminal event
    (regression: the item was recorded and the job stayed `running` for good)."""
    job_id = await engine.submit("mapper", {"items": ["a", "b", "c"]})
    [first] = await _claim(engine)
    await _complete(engine, first, ["a", "b", "c"])
    [item] = await _claim(engine, limit=1)
    assert item.stage == "shout"
    assert await cancel(engine, job_id) is False  # an item runs: cancel waits for it
    await _complete(engine, item, {"text": "A"})
    snapshot = await engine.job(job_id)
    assert snapshot.job["status"] == "cancelled"
    assert engine.stage(snapshot, "shout")["status"] == "cancelled"
    assert engine.stage(snapshot, "collect")["status"] == "cancelled"
    types = [e["type"] for e in await engine.events(job_id)]
    assert types.count("cancelled") == 1
    assert types[-1] == "cancelled"
    async with engine.db.read() as conn:
        assert await tasks.depth(conn) == {}


async def test_runs_ending_after_a_sibling_failed_the_job_log_nothing_after_its_end(
    engine: Engine,
) -> None:
    """Two stages run; one fails the job. What the other reports afterwards (a flush,
    then its own failure; or its success) adds its cost to the job's `actual_usd` and
    writes nothing after the terminal `error` event (regression: a `cost_update` and a
    `stage_update` followed it)."""
    for ends in ("fails", "succeeds"):
        job_id = await engine.submit("spenders", {"ends": ends})
        east, west = sorted(await _claim(engine), key=lambda t: t.stage)
        async with engine.db.write() as conn:
            await outcomes.fail(
                conn,
                east,
                {"type": "stage_failed", "message": "east broke"},
                tasks.Report(),
                retryable=False,
                registry=engine.registry,
                at=now(),
            )
        ended = await engine.events(job_id)
        assert ended[-1]["type"] == "error"
        late = tasks.Report(
            events=[("message", {"level": "info", "text": "still going", "stage": "west"})],
            progress=0.5,
            cost_delta=1.5,
        )
        async with engine.db.write() as conn:
            flushed = await tasks.flush(conn, west, late, lease_s=30, at=now())
        assert flushed.stop is True
        last = tasks.Report(cost_delta=0.5)
        if ends == "fails":
            async with engine.db.write() as conn:
                await outcomes.fail(
                    conn,
                    west,
                    {"type": "stage_failed", "message": "west broke too"},
                    last,
                    retryable=True,
                    registry=engine.registry,
                    at=now(),
                )
        else:
            await _complete(engine, west, {"steps": 1}, cost_delta=0.5)
        assert await engine.events(job_id) == ended
        snapshot = await engine.job(job_id)
        assert snapshot.job["status"] == "failed"
        assert snapshot.job["error"]["message"] == "east broke"
        assert snapshot.job["actual_usd"] == pytest.approx(2.0)
        west_row = engine.stage(snapshot, "west")
        if ends == "fails":
            assert (west_row["status"], west_row["error"]) == ("cancelled", None)
        else:  # kept, so that a retry does not run it again
            assert west_row["status"] == "succeeded"
        async with engine.db.read() as conn:
            assert await tasks.depth(conn) == {}


async def test_task_delivered_too_often_fails_the_job_lost(engine: Engine) -> None:
    """A stage whose worker is lost on every delivery fails the job `lost`, not forever."""
    job_id = await engine.submit("noop")
    at = now()
    for _ in range(5):
        assert len(await _claim(engine, at=at)) == 1
        at += engine.settings.lease_s + 1
        async with engine.db.write() as conn:
            await outcomes.sweep(conn, registry=engine.registry, at=at, max_deliveries=5)
    snapshot = await engine.job(job_id)
    assert snapshot.job["status"] == "failed"
    assert snapshot.job["error"]["type"] == "lost"


async def test_abandoned_stage_is_finished_by_another_worker(engine: Engine) -> None:
    """A claimed task whose worker vanished runs again on a live worker after its lease."""
    job_id = await engine.submit("noop", {"y": 2})
    [abandoned] = await _claim(engine, worker="ghost")
    assert abandoned.job_id == job_id
    await engine.start_worker()
    snapshot = await engine.wait(job_id, timeout=15)
    assert snapshot.job["status"] == "succeeded"
    assert engine.stage(snapshot, "run")["attempt"] == 2


async def test_shutdown_hands_running_stages_back_unfinished(engine: Engine) -> None:
    """A worker stopped with no grace releases its stage; the next worker finishes it."""
    worker = await engine.start_worker()
    job_id = await engine.submit("steps", {"steps": 20, "step_ms": 50})
    await engine.wait(job_id, until=lambda s: engine.stage(s, "work")["status"] == "running")
    await worker.stop(grace_s=0)
    engine.workers.remove(worker)
    snapshot = await engine.job(job_id)
    assert engine.stage(snapshot, "work")["status"] == "queued"
    await engine.start_worker()
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "succeeded"
    # The handed-back run does not count as an attempt.
    assert engine.stage(snapshot, "work")["attempt"] == 1


async def test_shutdown_of_a_worker_with_every_slot_busy_keeps_to_its_grace(
    engine: Engine,
) -> None:
    """With no slot free the claim loop waits for one; stopping must not wait for a
    stage to end first: the grace starts at once and the stage is handed back."""
    worker = await engine.start_worker(concurrency=1)
    job_id = await engine.submit("steps", {"steps": 400, "step_ms": 50})  # 20 s
    await engine.wait(job_id, until=lambda s: engine.stage(s, "work")["status"] == "running")
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(worker.stop(grace_s=0.2), 10)
    assert asyncio.get_running_loop().time() - started < 5
    engine.workers.remove(worker)
    snapshot = await engine.job(job_id)
    assert engine.stage(snapshot, "work")["status"] == "queued"


async def test_a_lost_workers_stages_return_before_their_lease_expires(engine: Engine) -> None:
    """A worker silent for longer than the lost window loses its stages at the next sweep."""
    from jobgate.store.repositories import workers

    job_id = await engine.submit("noop")
    at = now()
    async with engine.db.write() as conn:
        await workers.register(
            conn,
            {
                "id": "ghost",
                "host": "h",
                "pid": 1,
                "queues": ["default"],
                "pipelines": ["noop"],
                "concurrency": 1,
                "running": 1,
                "version": "0",
                "started_at": at - 100,
                "last_seen_at": at - 100,
            },
        )
    [claimed] = await _claim(engine, worker="ghost", at=at)
    worker = await engine.start_worker()
    snapshot = await engine.wait(job_id, timeout=10)
    assert snapshot.job["status"] == "succeeded"
    assert engine.stage(snapshot, "run")["attempt"] == 2
    assert claimed.lease_expires_at > now()  # recovered well before the lease ran out
    async with engine.db.read() as conn:
        assert await workers.lost(conn, silent_since=now()) == [worker.id]


async def test_workers_forget_expired_idempotency_keys(engine: Engine) -> None:
    """Keys past `JOBGATE_IDEMPOTENCY_TTL_S` are deleted by the workers' maintenance."""
    from sqlalchemy import select

    from jobgate.store.repositories import idempotency
    from jobgate.store.tables import idempotency_keys

    engine.settings = engine.settings.model_copy(update={"idempotency_ttl_s": 1})
    async with engine.db.write() as conn:
        for key, age in (("old", 10.0), ("fresh", 0.0)):
            await idempotency.remember(
                conn, owner="o", key=key, request_hash="h", job_ids=[], at=now() - age, ttl_s=1
            )
    await engine.start_worker()
    await asyncio.sleep(2.0)
    async with engine.db.read() as conn:
        left = [row[0] for row in await conn.execute(select(idempotency_keys.c.key))]
    assert "old" not in left
