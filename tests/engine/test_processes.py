"""`isolation="process"`: sync stages in worker subprocesses, and every way they can end."""

from __future__ import annotations

import os
import time

import pytest

from jobgate.ids import now
from jobgate.store.repositories import jobs
from tests.engine.conftest import Engine


def _crunching(snapshot: jobs.JobSnapshot) -> bool:
    stage = next(s for s in snapshot.stages if s["name"] == "crunch")
    return stage["status"] == "running" and stage["progress"] > 0


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def cancel(engine: Engine, job_id: str) -> None:
    async with engine.db.write() as conn:
        await jobs.cancel(conn, job_id, owner=None, at=now())


async def test_process_stage_reports_saves_artifact_and_returns_output(engine: Engine) -> None:
    """Progress, logs, cost and an artifact travel from the child; its output is stored."""
    worker = await engine.start_worker()
    job_id = await engine.submit("proc")
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "succeeded", snapshot.job["error"]
    output = engine.stage(snapshot, "crunch")["output"]
    assert output["pid"] != os.getpid()
    assert output["pid"] in worker.processes.pids()
    assert output["n"] == 3
    assert output["cost"] == pytest.approx(1.5)
    assert output["artifact"] == "report.txt"
    assert snapshot.job["actual_usd"] == pytest.approx(1.5)
    assert [a["name"] for a in snapshot.artifacts] == ["report.txt"]
    log = await engine.events(job_id)
    messages = [e["data"]["text"] for e in log if e["type"] == "message"]
    assert f"pid {output['pid']}" in messages
    notes = [e["data"].get("message") for e in log if e["type"] == "progress"]
    assert "step 3" in notes
    assert sum(e["data"]["delta_usd"] for e in log if e["type"] == "cost_update") == 1.5

    # The next stage reuses the idle child.
    again = await engine.wait(await engine.submit("proc"))
    assert engine.stage(again, "crunch")["output"]["pid"] == output["pid"]

    # No child outlives the worker.
    pids = worker.processes.pids()
    assert pids
    await worker.stop(grace_s=0)
    assert worker.processes.pids() == []
    assert all(_gone(pid) for pid in pids)


async def test_stage_exception_comes_back_as_its_message(engine: Engine) -> None:
    """An exception in the child fails the attempt with its message, never a traceback."""
    await engine.start_worker()
    snapshot = await engine.wait(await engine.submit("proc", {"mode": "raise"}))
    assert snapshot.job["status"] == "failed"
    assert snapshot.job["error"] == {
        "type": "stage_failed",
        "message": "no crunching today",
        "stage": "crunch",
    }
    assert engine.stage(snapshot, "crunch")["attempt"] == 2


async def test_cooperative_cancel_stops_the_process_stage_within_a_second(
    engine: Engine,
) -> None:
    """`check_cancelled()` raises in the child once the job is cancelled; the child lives on."""
    worker = await engine.start_worker()
    job_id = await engine.submit("proc", {"mode": "cooperative"})
    await engine.wait(job_id, until=_crunching)
    pids = worker.processes.pids()
    asked = time.monotonic()
    await cancel(engine, job_id)
    snapshot = await engine.wait(job_id)
    assert time.monotonic() - asked < 1.0
    assert snapshot.job["status"] == "cancelled"
    assert engine.stage(snapshot, "crunch")["status"] == "cancelled"
    # It stopped on its own, so its child is kept for the next stage.
    assert worker.processes.pids() == pids


async def test_stage_ignoring_cancel_is_killed_after_the_grace(engine: Engine) -> None:
    """A busy loop never checks the flag: after `cancel_grace_s` its process group is killed."""
    worker = await engine.start_worker()
    job_id = await engine.submit("proc", {"mode": "busy"})
    await engine.wait(job_id, until=_crunching)
    [pid] = worker.processes.pids()
    asked = time.monotonic()
    await cancel(engine, job_id)
    snapshot = await engine.wait(job_id)
    waited = time.monotonic() - asked
    # Seen within a lease renewal (0.5 s), then the grace: about 1.1 s when idle. The
    # bound is loose for a loaded CI machine; the busy loop alone would never end.
    assert engine.settings.cancel_grace_s <= waited < engine.settings.cancel_grace_s + 3.0
    assert snapshot.job["status"] == "cancelled"
    assert engine.stage(snapshot, "crunch")["status"] == "cancelled"
    assert worker.processes.pids() == []
    deadline = time.monotonic() + 2
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _gone(pid)


async def test_timeout_kills_the_process_and_fails_timeout(engine: Engine) -> None:
    """A stage over its timeout is killed, not abandoned; the job fails `timeout`."""
    worker = await engine.start_worker()
    started = time.monotonic()
    snapshot = await engine.wait(await engine.submit("proc-slow"))
    assert time.monotonic() - started < 5
    assert snapshot.job["status"] == "failed"
    assert snapshot.job["error"]["type"] == "timeout"
    assert "longer than 0.5 s" in snapshot.job["error"]["message"]
    assert worker.processes.pids() == []


@pytest.mark.parametrize(("mode", "code"), [("exit", "exit code 3"), ("sigkill", "exit code -9")])
async def test_crashed_process_fails_the_attempt_and_the_retry_gets_a_fresh_one(
    engine: Engine, mode: str, code: str
) -> None:
    """`os._exit` or SIGKILL in a stage is a lost delivery; the retry succeeds."""
    await engine.start_worker()
    job_id = await engine.submit("proc", {"mode": mode})
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "succeeded", snapshot.job["error"]
    crunch = engine.stage(snapshot, "crunch")
    assert crunch["attempt"] == 2
    retried = [
        e["data"]["error"]
        for e in await engine.events(job_id)
        if e["type"] == "stage_update" and e["data"].get("error")
    ]
    assert len(retried) == 1
    assert retried[0]["type"] == "lost"
    assert retried[0]["message"].startswith(f"the stage's process died ({code}")

    # A poison stage that kills its process every time fails the job `lost` after
    # JOBGATE_MAX_DELIVERIES (5) runs, not its 1 retry; the worker keeps serving.
    failed = await engine.wait(await engine.submit("proc", {"mode": mode, "crash_attempts": 9}))
    assert failed.job["status"] == "failed"
    assert engine.stage(failed, "crunch")["attempt"] == 5
    assert failed.job["error"]["type"] == "lost"
    assert failed.job["error"]["message"].startswith(f"the stage's process died ({code}")
    fine = await engine.wait(await engine.submit("proc"))
    assert fine.job["status"] == "succeeded"


async def test_max_tasks_per_child_recycles_the_process(engine: Engine) -> None:
    """With `process_max_tasks_per_child=1`, consecutive stages run in different children."""
    engine.settings = engine.settings.model_copy(update={"process_max_tasks_per_child": 1})
    await engine.start_worker(concurrency=1)
    pids = []
    for _ in range(2):
        snapshot = await engine.wait(await engine.submit("proc"))
        assert snapshot.job["status"] == "succeeded"
        pids.append(engine.stage(snapshot, "crunch")["output"]["pid"])
    assert pids[0] != pids[1]


async def test_memory_limit_fails_a_greedy_attempt_and_the_worker_lives(engine: Engine) -> None:
    """Under `process_max_rss_mb`, a 500 MB allocation fails the attempt, not the worker."""
    engine.settings = engine.settings.model_copy(update={"process_max_rss_mb": 200})
    await engine.start_worker()
    snapshot = await engine.wait(await engine.submit("proc", {"mode": "alloc"}))
    assert snapshot.job["status"] == "failed"
    assert snapshot.job["error"]["type"] == "stage_failed"
    assert "out of memory" in snapshot.job["error"]["message"]
    fine = await engine.wait(await engine.submit("proc"))
    assert fine.job["status"] == "succeeded"


async def test_budget_exhausted_in_the_child_stops_it(engine: Engine) -> None:
    """A cost report over the budget stops the stage at once: `budget_exceeded`."""
    worker = await engine.start_worker()
    job_id = await engine.submit("proc", {"mode": "budget"}, budget_usd=10.0)
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "failed"
    assert snapshot.job["error"]["type"] == "budget_exceeded"
    texts = [e["data"]["text"] for e in await engine.events(job_id) if e["type"] == "message"]
    assert "still running after the budget" not in texts
    assert worker.processes.pids() == []
