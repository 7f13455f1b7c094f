"""Jobs run to the right end: DAGs, map stages, retries, timeouts, artifacts, budgets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import select

from jobgate.store import tables
from jobgate.store.repositories import artifacts, tasks
from tests.engine.conftest import Engine


async def test_steps_job_succeeds_with_result_cost_and_contiguous_events(engine: Engine) -> None:
    """A `steps` job reaches succeeded with its result, its cost, and events numbered 1..n."""
    await engine.start_worker()
    job_id = await engine.submit("steps", {"steps": 4, "step_ms": 5, "cost_per_step": 0.25})
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "succeeded"
    assert snapshot.job["result"] == {"steps": 4, "cost_usd": 1.0}
    assert snapshot.job["actual_usd"] == pytest.approx(1.0)
    assert snapshot.job["progress"] == 1.0
    assert [s["status"] for s in snapshot.stages] == ["succeeded"] * 3
    log = await engine.events(job_id)
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))
    assert log[-1]["type"] == "completed"
    assert log[-1]["data"] == {"result": {"steps": 4, "cost_usd": 1.0}}
    assert any(e["type"] == "progress" for e in log)
    assert sum(e["data"]["delta_usd"] for e in log if e["type"] == "cost_update") == 1.0


async def test_parallel_branches_overlap_and_join_gets_both_outputs(engine: Engine) -> None:
    """Stages with no order between them run at the same time; the join sees both."""
    await engine.start_worker(concurrency=4)
    job_id = await engine.submit("diamond", {"n": 5, "branch_s": 0.4})
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "succeeded"
    assert snapshot.job["result"] == {"sum": 5 * 2 + 5 + 1}
    left = engine.stage(snapshot, "left")["output"]
    right = engine.stage(snapshot, "right")["output"]
    assert left["started"] < right["ended"]
    assert right["started"] < left["ended"]


async def test_branches_finishing_together_always_release_the_join(engine: Engine) -> None:
    """Concurrent outcomes of one job serialise: a fan-in stage is never left pending."""
    await engine.start_worker(concurrency=8)
    job_ids = [await engine.submit("fan") for _ in range(8)]
    for job_id in job_ids:
        snapshot = await engine.wait(job_id)
        assert snapshot.job["status"] == "succeeded"
        assert snapshot.job["result"] == sum(1 + i for i in range(6))


async def test_map_stage_records_each_item_and_job_succeeds_with_partial_failure(
    engine: Engine,
) -> None:
    """Each item is a record; the failed item is retried then recorded failed."""
    await engine.start_worker()
    job_id = await engine.submit("mapper", {"items": ["a", "bad", "c"]})
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "succeeded"
    assert snapshot.job["result"] == {"texts": ["A", "C"], "failed": ["1"]}
    assert snapshot.job["records_succeeded"] == 2
    assert snapshot.job["records_failed"] == 1
    # Known only once `items` has run (regression: counted before the stage's total).
    assert snapshot.job["records_expected"] == 3
    shout = engine.stage(snapshot, "shout")
    assert (shout["items_total"], shout["items_succeeded"], shout["items_failed"]) == (3, 2, 1)
    error = shout["output"]["errors"][0]["error"]
    assert error["type"] == "stage_failed"
    assert "cannot shout 'bad'" in error["message"]


async def test_empty_map_stage_succeeds_at_once(engine: Engine) -> None:
    """A map over an empty list finishes with no records and the job goes on."""
    await engine.start_worker()
    job_id = await engine.submit("mapper", {"items": []})
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "succeeded"
    assert snapshot.job["result"] == {"texts": [], "failed": []}


async def test_retries_then_fails_with_the_stage_message(engine: Engine) -> None:
    """A stage that always fails is run 1 + retries times; the job fails with its message."""
    await engine.start_worker()
    job_id = await engine.submit("steps", {"steps": 3, "step_ms": 0, "fail_at": 2})
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "failed"
    assert snapshot.job["error"] == {
        "type": "stage_failed",
        "message": "planned failure at step 2",
        "stage": "work",
    }
    assert engine.stage(snapshot, "work")["attempt"] == 3
    assert engine.stage(snapshot, "finish")["status"] == "skipped"
    log = await engine.events(job_id)
    assert log[-1] == {**log[-1], "type": "error", "data": {"error": snapshot.job["error"]}}
    assert "Traceback" not in str(snapshot.job["error"])


async def test_nan_and_infinities_in_outputs_are_stored_as_null(engine: Engine) -> None:
    """JSON has no NaN or Infinity, and PostgreSQL cannot store them: outputs and records
    keep null there, as the API shows them (regression on PostgreSQL: the outcome's
    write failed and was retried until the lease ran out, the job left `running`)."""
    await engine.start_worker()
    started = time.monotonic()
    job_id = await engine.submit("odd-values", {"kind": "nan"})
    snapshot = await engine.wait(job_id)
    assert time.monotonic() - started < 10
    assert snapshot.job["status"] == "succeeded"
    assert engine.stage(snapshot, "metrics")["output"] == {"loss": None, "best": None, "steps": 3}
    async with engine.db.read() as conn:
        rows = await conn.execute(
            select(tables.records.c.data).where(tables.records.c.job_id == job_id)
        )
        records = [r[0] for r in rows]
    assert sorted(records, key=lambda r: r["item"]) == [
        {"item": 1, "score": None},
        {"item": 2, "score": None},
    ]


async def test_an_output_holding_a_nul_fails_the_stage_with_a_clear_error(engine: Engine) -> None:
    """A NUL character (U+0000), which PostgreSQL cannot store, fails the attempt with
    an error that says so, on every store, at once (regression on PostgreSQL: the write
    was retried until the lease ran out, then redelivered, and the job ended `lost`)."""
    await engine.start_worker()
    started = time.monotonic()
    job_id = await engine.submit("odd-values", {"kind": "nul"})
    snapshot = await engine.wait(job_id)
    assert time.monotonic() - started < 10
    assert snapshot.job["status"] == "failed"
    assert snapshot.job["error"]["stage"] == "metrics"
    assert "NUL" in snapshot.job["error"]["message"]


async def test_fail_attempts_lets_a_later_attempt_succeed(engine: Engine) -> None:
    """`fail_attempts=2`: attempts 1 and 2 fail, attempt 3 succeeds within the retries."""
    await engine.start_worker()
    job_id = await engine.submit(
        "steps", {"steps": 3, "step_ms": 0, "fail_at": 2, "fail_attempts": 2, "cost_per_step": 1}
    )
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "succeeded"
    assert engine.stage(snapshot, "work")["attempt"] == 3
    # Each failed attempt paid for step 1 before raising at step 2.
    assert snapshot.job["actual_usd"] == pytest.approx(1 + 1 + 3)
    assert snapshot.job["result"]["cost_usd"] == pytest.approx(5)


async def test_timeout_fails_the_attempt_and_then_the_job(engine: Engine) -> None:
    """An async stage over its timeout is stopped; after its retry the job fails `timeout`."""
    await engine.start_worker()
    job_id = await engine.submit("slow")
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "failed"
    assert snapshot.job["error"]["type"] == "timeout"
    assert engine.stage(snapshot, "wait")["attempt"] == 2


async def test_thread_stage_timeout(engine: Engine) -> None:
    """A sync stage over its timeout fails `timeout`; its thread sees the cancel flag."""
    await engine.start_worker()
    job_id = await engine.submit("threads", {"mode": "sleep"})
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "failed"
    assert snapshot.job["error"]["type"] == "timeout"


async def test_threads_abandoned_past_their_timeout_keep_their_slot_not_a_later_stage(
    engine: Engine,
) -> None:
    """Two sync stages overrun their 0.3 s timeout by far on a worker of concurrency 1:
    each fails `timeout`, and its thread, which cannot be stopped, keeps the slot until
    it returns; the next stage then gets the whole of its own timeout (regression: it
    waited in the thread pool behind the overrunning threads and timed out there)."""
    await engine.start_worker(concurrency=1)
    overruns = [await engine.submit("overrun", {"sleep_s": 1.0}) for _ in range(2)]
    quick = await engine.submit("overrun", {"sleep_s": 0.05})
    ended = [await engine.wait(job_id) for job_id in overruns]
    assert [s.job["error"]["type"] for s in ended] == ["timeout", "timeout"]
    snapshot = await engine.wait(quick)
    assert snapshot.job["status"] == "succeeded", snapshot.job["error"]
    # One slot: the quick stage ran after both overrunning threads had returned.
    last_overrun_started = max(engine.stage(s, "crawl")["started_at"] for s in ended)
    assert snapshot.job["result"]["started"] >= last_overrun_started + 1.0 - 0.05


async def test_thread_stage_reads_files_saves_artifacts_returns_model(engine: Engine) -> None:
    """Files reach a sync stage; its artifact is recorded; a pydantic output is stored as JSON."""
    await engine.start_worker()
    files = [await engine.upload("a.txt", b"hello"), await engine.upload("b.txt", b"worlds")]
    job_id = await engine.submit("threads", files=files)
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "succeeded", snapshot.job["error"]
    assert snapshot.job["result"] == {"total": 11, "names": ["a.txt", "b.txt"]}
    [artifact] = snapshot.artifacts
    assert artifact["name"] == "names.txt"
    assert artifact["is_primary"]
    path = engine.blobs.local_path(artifact["sha256"])
    assert path is not None
    assert path.read_bytes() == b"a.txt\nb.txt"
    types = [e["type"] for e in await engine.events(job_id)]
    assert "artifact" in types
    assert "message" in types


async def test_text_stats_counts_files_and_fails_bad_utf8_as_its_own_record(
    engine: Engine,
) -> None:
    """The built-in `text-stats`: per-file records, one bad file, totals and two artifacts."""
    await engine.start_worker()
    files = [
        await engine.upload("one.txt", b"the cat\nthe dog\n"),
        await engine.upload("bad.txt", b"caf\xe9 latin-1\n"),
        await engine.upload("two.md", "# Title\nthe end \u00e9\n".encode()),
    ]
    job_id = await engine.submit("text-stats", {"top": 2}, files=files)
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "succeeded", snapshot.job["error"]
    result = snapshot.job["result"]
    assert result["files"] == 2
    assert result["failed"] == 1
    assert result["lines"] == 4
    assert result["words"] == 9
    assert result["chars"] == len("the cat\nthe dog\n") + len("# Title\nthe end \u00e9\n")
    assert result["top_words"] == [["the", 3], ["cat", 1]]
    assert sorted(a["name"] for a in snapshot.artifacts) == ["report.csv", "report.json"]
    csv_artifact = next(a for a in snapshot.artifacts if a["name"] == "report.csv")
    path = engine.blobs.local_path(csv_artifact["sha256"])
    assert path is not None
    assert path.read_text().splitlines() == [
        "file,lines,words,chars",
        "one.txt,2,4,16",
        f"two.md,2,5,{len('# Title' + chr(10) + 'the end é' + chr(10))}",
    ]


async def test_text_stats_fails_when_no_file_can_be_counted(engine: Engine) -> None:
    """With every file undecodable the report stage fails the job."""
    await engine.start_worker()
    files = [await engine.upload("bad.txt", b"\xff\xfe\xfa not utf-8")]
    job_id = await engine.submit("text-stats", files=files)
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "failed"
    assert snapshot.job["error"]["stage"] == "report"


async def test_budget_exceeded_fails_the_job_past_its_budget_by_one_step(engine: Engine) -> None:
    """Actual cost over the budget fails the job `budget_exceeded`, without retries."""
    await engine.start_worker()
    job_id = await engine.submit(
        "steps", {"steps": 10, "step_ms": 0, "cost_per_step": 1.0}, budget_usd=3.5
    )
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "failed"
    assert snapshot.job["error"]["type"] == "budget_exceeded"
    assert snapshot.job["actual_usd"] == pytest.approx(4.0)
    assert engine.stage(snapshot, "work")["attempt"] == 1


async def test_parallel_stages_share_the_jobs_budget(engine: Engine) -> None:
    """Two branches spending at once: each sees the other's cost, and the job fails
    `budget_exceeded` with both stopped, though each alone would stay under budget."""
    await engine.start_worker(concurrency=4)
    job_id = await engine.submit(
        "spenders", {"steps": 16, "step_s": 0.05, "cost": 1.0}, budget_usd=20.0
    )
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "failed"
    assert snapshot.job["error"]["type"] == "budget_exceeded"
    # Each branch alone would spend 16; both 32. A branch learns the other's cost at
    # each flush (0.1 s, two steps here), so the job passes 20 by a few steps at most.
    assert 20.0 < snapshot.job["actual_usd"] <= 26.0
    assert {engine.stage(snapshot, n)["status"] for n in ("east", "west")} <= {
        "failed",
        "cancelled",
    }


async def test_a_charge_made_while_the_last_one_is_being_written_still_counts(
    engine: Engine,
) -> None:
    """The budget check counts a charge whose write has not returned: with the job's row
    locked, the first charge's flush waits, and the second passes the budget at once
    (regression: it saw the stored total without the first and ran on)."""
    await engine.start_worker()
    job_id = await engine.submit("charger", budget_usd=1.5)
    await engine.wait(job_id, until=lambda s: engine.stage(s, "charge")["status"] == "running")
    async with engine.db.write() as conn:
        await conn.execute(
            select(tables.jobs.c.id).where(tables.jobs.c.id == job_id).with_for_update()
        )
        await asyncio.sleep(2.0)  # the charges come at 1.0 s and 1.5 s into the stage
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "failed"
    assert snapshot.job["error"]["type"] == "budget_exceeded"
    assert snapshot.job["actual_usd"] == pytest.approx(2.0)


async def test_cost_updates_of_parallel_stages_tell_the_jobs_stored_cost(
    engine: Engine,
) -> None:
    """Each `cost_update` carries the job's cost as stored, parallel stages' charges
    included: in log order, each `actual_usd` is the last one plus its own `delta_usd`,
    and the last is the job's `actual_usd` (regression: a stage's stale view of it)."""
    await engine.start_worker(concurrency=4)
    job_id = await engine.submit("spenders", {"steps": 12, "step_s": 0.02, "cost": 1.0})
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "succeeded"
    updates = [e["data"] for e in await engine.events(job_id) if e["type"] == "cost_update"]
    total = 0.0
    for update in updates:
        total += update["delta_usd"]
        assert update["actual_usd"] == pytest.approx(total)
    assert total == pytest.approx(24.0)
    assert snapshot.job["actual_usd"] == pytest.approx(24.0)


async def test_an_artifact_saved_after_a_sibling_failed_the_job_is_refused(
    engine: Engine,
) -> None:
    """A stage that saves an artifact after its job failed gets `JobCancelled`: the
    artifact is not stored and the log ends with the job's `error` (regression: an
    `artifact` event followed it)."""
    await engine.start_worker()
    job_id = await engine.submit("late-saver")
    snapshot = await engine.wait(job_id)
    deadline = time.monotonic() + 10
    while True:  # until `saves_late` has ended: its task is gone
        async with engine.db.read() as conn:
            if not await tasks.has_tasks(conn, job_id):
                break
        assert time.monotonic() < deadline, "saves_late never ended"
        await asyncio.sleep(0.02)
    log = await engine.events(job_id)
    assert snapshot.job["status"] == "failed"
    assert snapshot.job["error"]["message"] == "broken on purpose"
    assert log[-1]["type"] == "error"
    assert "artifact" not in [e["type"] for e in log]
    async with engine.db.read() as conn:
        assert await artifacts.artifact(conn, job_id, "late.txt") is None


async def test_higher_priority_is_claimed_first(engine: Engine) -> None:
    """With both waiting, a priority-10 job runs before an earlier priority-0 one."""
    low = await engine.submit("noop", {"n": "low"}, priority=0)
    high = await engine.submit("noop", {"n": "high"}, priority=10)
    await engine.start_worker(concurrency=1)
    low_done = await engine.wait(low)
    high_done = await engine.wait(high)
    assert high_done.job["started_at"] < low_done.job["started_at"]


async def test_create_returns_what_load_reads_back(engine: Engine) -> None:
    """The snapshot `jobs.create` builds from its rows is the one the store holds."""
    from jobgate.api import views
    from jobgate.ids import now, uuid7
    from jobgate.store.repositories import jobs

    files = [await engine.upload("a.txt", b"hello")]
    new = [
        jobs.NewJob(
            id=uuid7(),
            pipeline=engine.registry.get(name),
            owner="o",
            params=engine.registry.get(name).validate_params(params),
            files=job_files,
            priority=3,
            budget_usd=9.5,
            estimated_usd=0.25,
            correlation_id="c-1",
        )
        for name, params, job_files in (
            ("noop", {"a": [1, {"b": None}]}, []),
            ("steps", {"steps": 2}, []),
            ("text-stats", {}, files),
            ("diamond", {}, []),
        )
    ]
    async with engine.db.write() as conn:
        built = await jobs.create(conn, new, at=now())
    async with engine.db.read() as conn:
        stored = await jobs.load(conn, [job.id for job in new])
    assert [views.job(s) for s in built] == [views.job(s) for s in stored]


async def test_one_owners_backlog_does_not_hold_up_another_owners_job(engine: Engine) -> None:
    """Fair share: a job submitted after 60 of another owner's runs within the first few."""
    backlog = [await engine.submit("noop", {"i": i}, owner="busy") for i in range(60)]
    other = await engine.submit("noop", {"i": "mine"}, owner="quiet")
    await engine.start_worker(concurrency=1)
    mine = await engine.wait(other)
    finished_before = 0
    for job_id in backlog:
        job = (await engine.wait(job_id)).job
        finished_before += job["finished_at"] <= mine.job["finished_at"]
    assert finished_before <= 3


def _noop_job(engine: Engine, owner: str) -> Any:
    """A `noop` job of `owner`, ready for `jobs.create`."""
    from jobgate.ids import uuid7
    from jobgate.store.repositories import jobs

    return jobs.NewJob(
        id=uuid7(), pipeline=engine.registry.get("noop"), owner=owner, params={}, files=[],
        priority=0, budget_usd=1, estimated_usd=0,
    )  # fmt: skip


async def test_fair_share_can_be_turned_off(engine: Engine) -> None:
    """With a stride of 0 the order is plain arrival order."""
    from jobgate.ids import now
    from jobgate.store.repositories import jobs

    busy = [_noop_job(engine, "busy") for _ in range(5)]
    async with engine.db.write() as conn:
        first = await jobs.create(conn, busy, at=now(), stride_s=0)
        last = await jobs.create(conn, [_noop_job(engine, "quiet")], at=now() + 1, stride_s=0)
    keys = [s.job["fair_key"] for s in first + last]
    assert keys == sorted(keys)
    assert keys[0] == keys[4]  # one submit, one instant


def _max_overlap(spans: list[dict[str, float]]) -> int:
    edges = sorted([(s["started"], 1) for s in spans] + [(s["ended"], -1) for s in spans])
    now_running = peak = 0
    for _, step in edges:
        now_running += step
        peak = max(peak, now_running)
    return peak


async def test_a_pipelines_max_running_caps_it_across_the_worker(engine: Engine) -> None:
    """`Pipeline(max_running=1)`: its stages never overlap, even with free slots."""
    await engine.start_worker(concurrency=4)
    ids = [await engine.submit("capped") for _ in range(4)]
    spans = [(await engine.wait(i)).job["result"] for i in ids]
    assert _max_overlap(spans) == 1


async def test_max_running_per_owner_leaves_room_for_others(engine: Engine) -> None:
    """With a per-owner cap of 1, one owner's stages run one at a time, others alongside."""
    engine.settings = engine.settings.model_copy(update={"max_running_per_owner": 1})
    await engine.start_worker(concurrency=4)
    busy = [await engine.submit("nap", owner="busy") for _ in range(3)]
    other = await engine.submit("nap", owner="other")
    busy_spans = [(await engine.wait(i)).job["result"] for i in busy]
    other_span = (await engine.wait(other)).job["result"]
    assert _max_overlap(busy_spans) == 1
    assert _max_overlap([*busy_spans, other_span]) == 2


async def test_a_write_that_fails_after_the_report_loses_no_message_and_no_cost(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A progress flush or outcome whose transaction fails after the report's rows were
    sent (so they roll back) puts the whole report back: the retry stores every message
    and every cent, once."""
    real = tasks.apply_report
    failures = 0

    async def apply_then_fail(conn: Any, task: Any, report: Any, **kwargs: Any) -> None:
        nonlocal failures
        await real(conn, task, report, **kwargs)
        if failures < 2 and report.events:
            failures += 1
            raise RuntimeError("the connection dropped mid-transaction")

    monkeypatch.setattr(tasks, "apply_report", apply_then_fail)
    await engine.start_worker()
    job_id = await engine.submit(
        "steps", {"steps": 6, "step_ms": 40, "cost_per_step": 0.5, "message_every": 1}
    )
    snapshot = await engine.wait(job_id)
    assert failures == 2
    assert snapshot.job["status"] == "succeeded"
    assert snapshot.job["actual_usd"] == pytest.approx(3.0)
    log = await engine.events(job_id)
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))
    messages = [e["data"]["text"] for e in log if e["type"] == "message"]
    assert messages == [f"step {n} of 6" for n in range(1, 7)]
    assert sum(e["data"]["delta_usd"] for e in log if e["type"] == "cost_update") == 3.0


async def test_a_stage_ending_during_a_flush_waits_for_it_and_loses_no_message(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage that returns while its report is being flushed: the outcome waits for
    that flush to end (it is never cancelled), and every message is stored once, in
    order."""
    real = tasks.flush
    flushes: list[str] = []

    async def slow_flush(conn: Any, task: Any, report: Any, *, lease_s: float, at: float) -> Any:
        flushes.append("started")
        await asyncio.sleep(0.4)  # the stage returns meanwhile
        runtime, _ = worker._running[task.task_id]
        flushes.append("outcome due" if runtime.finishing else "stage running")
        written = await real(conn, task, report, lease_s=lease_s, at=at)
        flushes.append("written")
        return written

    monkeypatch.setattr(tasks, "flush", slow_flush)
    worker = await engine.start_worker()
    # Step 1 reports at 200 ms; its flush starts a flush interval (100 ms) later and
    # lasts 400 ms; the stage returns at 400 ms, in the middle of it.
    assert engine.settings.event_flush_interval_s == 0.1
    job_id = await engine.submit("steps", {"steps": 2, "step_ms": 200, "message_every": 1})
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "succeeded"
    assert flushes[:3] == ["started", "outcome due", "written"]
    log = await engine.events(job_id)
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))
    messages = [e["data"]["text"] for e in log if e["type"] == "message"]
    assert messages == ["step 1 of 2", "step 2 of 2"]


async def test_one_submit_of_several_owners_moves_each_owners_clock(engine: Engine) -> None:
    """Jobs of several owners written together get the keys they would get apart: each
    owner's jobs a stride apart from where that owner's clock stood."""
    from sqlalchemy import select

    from jobgate.store.repositories import jobs
    from jobgate.store.tables import owner_clocks

    at = 1000.0
    async with engine.db.write() as conn:
        backlog = [_noop_job(engine, "b") for _ in range(3)]
        await jobs.create(conn, backlog, at=at, stride_s=2.0)
    owners = ["a", "b", "a", "c", "b", "a"]
    async with engine.db.write() as conn:
        new = [_noop_job(engine, o) for o in owners]
        built = await jobs.create(conn, new, at=at + 1, stride_s=2.0)
    async with engine.db.read() as conn:
        stored = await jobs.load(conn, [s.job["id"] for s in built])
        clocks = {row.owner: row.clock for row in await conn.execute(select(owner_clocks))}
    keys = [(s.job["owner"], s.job["fair_key"]) for s in stored]
    assert keys == [
        ("a", 1001.0),
        ("b", 1006.0),  # behind b's own three jobs: 1000, 1002, 1004
        ("a", 1003.0),
        ("c", 1001.0),
        ("b", 1008.0),
        ("a", 1005.0),
    ]
    assert [s.job["fair_key"] for s in built] == [key for _, key in keys]
    assert clocks == {"a": 1007.0, "b": 1010.0, "c": 1003.0}
