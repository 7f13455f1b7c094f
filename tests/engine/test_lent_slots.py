"""An idle in-process worker lends its free slots to submit statements: the jobs that
fit start in the submit's own statement, leased to it, with no claim in between."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from jobgate.api.submit_group import SubmitGroup
from jobgate.blobs import open_blob_store
from jobgate.config import Settings
from jobgate.ids import now, uuid7
from jobgate.pipelines import Registry
from jobgate.store import Database
from jobgate.store.repositories import events, jobs, tasks
from jobgate.store.tables import tasks as task_table
from jobgate.worker import Worker
from tests.engine import pipelines
from tests.waiting import idle

pytestmark = pytest.mark.service("postgres")


class Rig:
    """A worker and a submit group wired as `jobgate serve` wires them."""

    def __init__(self, db: Database, tmp_path: Path, **settings: Any) -> None:
        self.db = db
        self.settings = Settings(
            data_dir=tmp_path,
            database_url=db.url,
            worker_poll_interval_s=30,  # only wake-ups (or loans) start anything
            lease_s=2.0,
            sweep_interval_s=0.5,
            **settings,
        )
        self.blobs = open_blob_store((tmp_path / "blobs").as_uri())
        self.registry = Registry.from_paths([])
        self.registry.add(pipelines.napper)  # no pipeline with a cap: that stops loans
        self.workers: list[Worker] = []
        self.claims: list[int] = []
        self.group = SubmitGroup(db, aging_s=10.0, stride_s=1.0, on_written=self._written)

    def _written(self, notice: str) -> None:
        for worker in self.workers:
            worker.expect_notice(notice)
            worker.wake()

    async def start_worker(self, concurrency: int, *, lend: bool = True) -> Worker:
        worker = Worker(
            settings=self.settings,
            db=self.db,
            blobs=self.blobs,
            registry=self.registry,
            concurrency=concurrency,
        )
        claim = worker._claim

        async def counted(*args: Any, **kwargs: Any) -> list[tasks.Claimed]:
            found = await claim(*args, **kwargs)
            self.claims.extend(1 for _ in found)
            return found

        worker._claim = counted  # type: ignore[method-assign]
        await worker.start()
        self.workers.append(worker)
        if lend:
            self.group.lender = worker
        await idle(worker)
        return worker

    def new_job(self, pipeline: str = "noop", params: dict[str, Any] | None = None) -> jobs.NewJob:
        p = self.registry.get(pipeline)
        return jobs.NewJob(
            id=uuid7(),
            pipeline=p,
            owner="o",
            params=p.validate_params(params or {}),
            files=[],
            priority=0,
            budget_usd=10,
            estimated_usd=0,
        )

    async def wait_done(self, job_ids: list[str], timeout: float = 10) -> list[jobs.JobSnapshot]:
        async with asyncio.timeout(timeout):
            while True:
                async with self.db.read() as conn:
                    found = [await jobs.get(conn, job_id) for job_id in job_ids]
                if all(s.job["status"] in jobs.TERMINAL for s in found):
                    return found
                await asyncio.sleep(0.02)

    async def events(self, job_id: str) -> list[tuple[str, dict[str, Any]]]:
        async with self.db.read() as conn:
            found = await events.page(conn, job_id, limit=1000)
        return [(e["type"], e["data"]) for e in found]

    async def aclose(self) -> None:
        await self.group.aclose()
        for worker in self.workers:
            await worker.stop(grace_s=0)
        await self.blobs.aclose()


@pytest.fixture
async def rig(postgres_db_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    db = Database(postgres_db_url)
    rig = Rig(db, tmp_path)
    try:
        yield rig
    finally:
        await rig.aclose()
        await db.aclose()


async def test_an_idle_worker_runs_a_new_job_with_no_claim(rig: Rig) -> None:
    worker = await rig.start_worker(concurrency=2)
    rig.claims.clear()
    job = rig.new_job("nap")
    (snapshot,) = await rig.group.create([job])

    # The submit's answer already shows the job running, as a claim would leave it.
    assert snapshot.job["status"] == "running"
    assert snapshot.job["stage"] == "sleep"
    assert snapshot.job["started_at"] is not None
    (stage,) = snapshot.stages
    assert (stage["status"], stage["attempt"]) == ("running", 1)
    # The task is leased to the worker, which renews the lease while the stage runs.
    async with rig.db.read() as conn:
        (row,) = (await conn.execute(select(task_table).where(task_table.c.job_id == job.id))).all()
    assert (row.leased_by, row.attempt, row.deliveries) == (worker.id, 1, 1)
    assert [runtime.task.task_id for runtime, _ in worker._running.values()] == [row.id]

    (done,) = await rig.wait_done([job.id])
    assert done.job["status"] == "succeeded"
    assert rig.claims == [], "the job was claimed, not started by its submit"
    kinds = await rig.events(job.id)
    assert kinds[:2] == [
        ("stage_update", {"stage": "sleep", "status": "queued", "attempt": 0}),
        ("stage_update", {"stage": "sleep", "status": "running", "attempt": 1}),
    ]
    assert [k for k, _ in kinds].count("completed") == 1
    running = [d for k, d in kinds if k == "stage_update" and d.get("status") == "running"]
    assert len(running) == 1


async def test_a_statement_whose_jobs_all_fit_starts_them_all(rig: Rig) -> None:
    await rig.start_worker(concurrency=2)
    rig.claims.clear()
    batch = [rig.new_job("nap") for _ in range(2)]
    snapshots = await rig.group.create(batch)
    assert [s.job["status"] for s in snapshots] == ["running", "running"]
    done = await rig.wait_done([job.id for job in batch])
    assert [s.job["status"] for s in done] == ["succeeded"] * 2
    assert rig.claims == []


async def test_a_statement_whose_jobs_do_not_all_fit_starts_none(rig: Rig) -> None:
    """Their claim order depends on where each owner's clock ends, which only the
    statement finds out: starting some could let them skip the others. They queue, and
    the claims take them in their order."""
    await rig.start_worker(concurrency=2)
    rig.claims.clear()
    batch = [rig.new_job("nap") for _ in range(3)]
    snapshots = await rig.group.create(batch)
    assert [s.job["status"] for s in snapshots] == ["queued"] * 3
    done = await rig.wait_done([job.id for job in batch])
    assert [s.job["status"] for s in done] == ["succeeded"] * 3
    assert sum(rig.claims) == 3, "each job was claimed once"
    started = [s.job["result"]["started"] for s in done]
    assert started[2] >= max(started[:2]), "the last job ran before the first ones"


async def test_a_busy_worker_lends_nothing_and_waiting_jobs_keep_their_order(rig: Rig) -> None:
    await rig.start_worker(concurrency=1)
    first = rig.new_job("nap")
    (running,) = await rig.group.create([first])
    assert running.job["status"] == "running"
    later = [rig.new_job("nap") for _ in range(2)]
    for job in later:
        (snapshot,) = await rig.group.create([job])
        assert snapshot.job["status"] == "queued"
    done = await rig.wait_done([first.id, *(job.id for job in later)])
    spans = [(s.job["result"]["started"], s.job["result"]["ended"]) for s in done]
    assert spans == sorted(spans), "the waiting jobs ran out of their order"
    for (_, ended), (started, _) in itertools.pairwise(spans):
        assert started >= ended, "one slot ran two stages at once"


async def test_a_worker_told_of_waiting_tasks_lends_nothing(rig: Rig) -> None:
    """Tasks another process made ready wake the worker: until its claim has looked,
    a new job could skip them, so it queues."""
    worker = await rig.start_worker(concurrency=2)
    worker.wake()  # what a notification from another process does
    assert worker.lend() is None
    await idle(worker)
    loan = worker.lend()
    assert loan is not None
    assert loan.slots == 2
    worker.settle(loan)


async def test_a_capped_worker_lends_nothing(postgres_db_url: str, tmp_path: Path) -> None:
    db = Database(postgres_db_url)
    rig = Rig(db, tmp_path, max_running_per_owner=1)
    try:
        await rig.start_worker(concurrency=2)
        job = rig.new_job()
        (snapshot,) = await rig.group.create([job])
        assert snapshot.job["status"] == "queued"
        (done,) = await rig.wait_done([job.id])
        assert done.job["status"] == "succeeded"
        assert rig.claims == [1]
    finally:
        await rig.aclose()
        await db.aclose()


async def test_a_failed_statement_gives_its_slots_back(rig: Rig) -> None:
    worker = await rig.start_worker(concurrency=2)
    job = rig.new_job()
    await rig.group.create([job])
    await rig.wait_done([job.id])
    with pytest.raises(Exception, match=r"duplicate key|UniqueViolation"):
        await rig.group.create([job])  # the same id again: refused, nothing written
    assert worker._lent == 0
    again = rig.new_job()
    (snapshot,) = await rig.group.create([again])
    assert snapshot.job["status"] == "running"
    (done,) = await rig.wait_done([again.id])
    assert done.job["status"] == "succeeded"


async def test_a_lent_task_whose_worker_never_ran_it_is_handed_back(rig: Rig) -> None:
    """The statement committed but its worker never learned of it (its connection broke
    as the answer came back): unrenewed, the lease runs out, and the job runs anyway."""
    lost = tasks.SlotLoan(
        worker_id="gone-worker",
        token_prefix=tasks.lease_prefix(),
        expires_at=now() + 1.0,
        queues=frozenset({"default"}),
        pipelines=frozenset({"noop"}),
        slots=1,
    )
    job = rig.new_job()
    async with rig.db.autocommit() as conn:
        (snapshot,) = await jobs.create(conn, [job], at=now(), loan=lost)
    assert snapshot.job["status"] == "running"
    assert len(lost.started) == 1
    await rig.start_worker(concurrency=1, lend=False)
    (done,) = await rig.wait_done([job.id], timeout=15)
    assert done.job["status"] == "succeeded"
    (stage,) = done.stages
    assert stage["attempt"] == 2, "the second delivery ran it"
