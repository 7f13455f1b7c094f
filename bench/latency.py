"""Latency on an idle system: submit → `completed`, and cancel → `cancelled`.

One in-process worker (concurrency 4) on a fresh database, one job at a time:

- **submit → completed**: a `noop` job is written through `jobs.create` (what the API's
  submit does, without HTTP) and the clock stops when its `completed` event is in the
  store, polled every 2 ms (until issue 5 brings the live event bus, which an SSE
  stream will wait on instead). p50 and p99 over `samples` jobs.
- **cancel → stopped**: a `steps` job of long cooperative steps is submitted; once its
  `work` stage runs, `jobs.cancel` is called (what `POST /v1/jobs/{id}/cancel` does)
  and the clock stops when the job's status is `cancelled`. p50 and p99.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from sqlalchemy import select

from bench._common import Result, fresh_postgres, log, new_job, sqlite_url, temp_dir
from jobgate.blobs import open_blob_store
from jobgate.config import Settings
from jobgate.ids import now
from jobgate.pipelines import Registry
from jobgate.store import Database
from jobgate.store.repositories import jobs
from jobgate.store.tables import events, stages
from jobgate.store.tables import jobs as job_table
from jobgate.worker import Worker

POLL_S = 0.002


async def _submit(
    db: Database, registry: Registry, pipeline: str, params: dict[str, object]
) -> str:
    job = new_job(registry, pipeline, params)
    async with db.write() as conn:
        await jobs.create(conn, [job], at=now())
    return job.id


async def _until(db: Database, query: object, timeout_s: float = 10.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while True:
        async with db.read() as conn:
            if (await conn.execute(query)).first() is not None:  # type: ignore[call-overload]
                return
        if time.perf_counter() > deadline:
            raise TimeoutError(str(query))
        await asyncio.sleep(POLL_S)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def latency_once(database: str, samples: int) -> tuple[list[float], list[float]]:
    """One run: (submit→completed ms, cancel→cancelled ms) samples."""
    with temp_dir("latency") as tmp:
        url = sqlite_url(tmp) if database == "sqlite" else await fresh_postgres()
        settings = Settings(
            _env_file=None,
            data_dir=tmp,
            database_url=url,
            blobs_url=(tmp / "blobs").as_uri(),
            log_level="WARNING",
        )
        db = Database(url)
        blobs = open_blob_store(settings.blobs_url)
        registry = Registry.from_paths([])
        completed: list[float] = []
        cancelled: list[float] = []
        try:
            await db.create_all()
            worker = Worker(settings=settings, db=db, blobs=blobs, registry=registry, concurrency=4)
            await worker.start()
            try:
                for _ in range(samples):
                    started = time.perf_counter()
                    job_id = await _submit(db, registry, "noop", {})
                    worker.wake()  # what the API does after a submit in its own process
                    await _until(
                        db,
                        select(events.c.seq).where(
                            events.c.job_id == job_id, events.c.type == "completed"
                        ),
                    )
                    completed.append((time.perf_counter() - started) * 1000)
                for _ in range(max(3, samples // 20)):
                    job_id = await _submit(db, registry, "steps", {"steps": 1000, "step_ms": 20})
                    worker.wake()
                    await _until(
                        db,
                        select(stages.c.name).where(
                            stages.c.job_id == job_id,
                            stages.c.name == "work",
                            stages.c.status == "running",
                        ),
                    )
                    await asyncio.sleep(0.1)
                    started = time.perf_counter()
                    async with db.write() as conn:
                        await jobs.cancel(conn, job_id, owner=None, at=now())
                    await _until(
                        db,
                        select(job_table.c.id).where(
                            job_table.c.id == job_id, job_table.c.status == "cancelled"
                        ),
                    )
                    cancelled.append((time.perf_counter() - started) * 1000)
            finally:
                await worker.stop(grace_s=0)
        finally:
            await blobs.aclose()
            await db.aclose()
        return completed, cancelled


async def run(databases: list[str], *, samples: int, runs: int) -> list[Result]:
    results: list[Result] = []
    for database in databases:
        figures = {
            name: Result(benchmark=name, database=database, unit="ms")
            for name in (
                "submit -> completed p50",
                "submit -> completed p99",
                "cancel -> cancelled p50",
                "cancel -> cancelled p99",
            )
        }
        for n in range(runs):
            completed, cancelled = await latency_once(database, samples)
            figures["submit -> completed p50"].values.append(statistics.median(completed))
            figures["submit -> completed p99"].values.append(_percentile(completed, 0.99))
            figures["cancel -> cancelled p50"].values.append(statistics.median(cancelled))
            figures["cancel -> cancelled p99"].values.append(_percentile(cancelled, 0.99))
            log(
                f"latency {database} run {n + 1}: submit->completed p50 "
                f"{statistics.median(completed):.2f} ms, cancel->cancelled p50 "
                f"{statistics.median(cancelled):.1f} ms"
            )
        results.extend(figures.values())
    return results
