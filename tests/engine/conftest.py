"""An engine under test: the store (SQLite and PostgreSQL), local blobs and a worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from jobgate.blobs import open_blob_store
from jobgate.blobs.base import BlobStore
from jobgate.config import Settings
from jobgate.ids import now, uuid7
from jobgate.pipelines import Registry
from jobgate.pipelines.files import sniff
from jobgate.store import Database
from jobgate.store.repositories import blobs as blob_repo
from jobgate.store.repositories import events, jobs
from jobgate.store.tables import tasks as task_table
from jobgate.store.tables import workers as worker_table
from jobgate.worker import Worker
from tests.engine import pipelines


@dataclass
class Engine:
    """The pieces of a running jobgate without HTTP, and helpers to drive them."""

    settings: Settings
    db: Database
    blobs: BlobStore
    registry: Registry
    workers: list[Worker] = field(default_factory=list)

    async def start_worker(self, concurrency: int = 4, **kwargs: Any) -> Worker:
        worker = Worker(
            settings=self.settings,
            db=self.db,
            blobs=self.blobs,
            registry=self.registry,
            concurrency=concurrency,
            **kwargs,
        )
        await worker.start()
        self.workers.append(worker)
        return worker

    async def upload(self, name: str, data: bytes) -> dict[str, Any]:
        stored = await self.blobs.put_bytes(data)
        kind = sniff(stored.head, name)
        async with self.db.write() as conn:
            await blob_repo.add(
                conn, [blob_repo.BlobRow(stored.sha256, stored.size, kind)], at=now()
            )
        return {"name": name, "sha256": stored.sha256, "size": stored.size, "content_type": kind}

    async def submit(
        self,
        pipeline: str,
        params: dict[str, Any] | None = None,
        *,
        files: list[dict[str, Any]] | None = None,
        priority: int = 0,
        budget_usd: float = 100.0,
        owner: str = "owner-1",
    ) -> str:
        p = self.registry.get(pipeline)
        stored = p.validate_params(params or {})
        job = jobs.NewJob(
            id=uuid7(),
            pipeline=p,
            owner=owner,
            params=stored,
            files=files or [],
            priority=priority,
            budget_usd=budget_usd,
            estimated_usd=p.estimate(stored, files or []),
        )
        async with self.db.write() as conn:
            await jobs.create(conn, [job], at=now())
        for worker in self.workers:
            worker.wake()
        return job.id

    async def job(self, job_id: str) -> jobs.JobSnapshot:
        async with self.db.read() as conn:
            return await jobs.get(conn, job_id)

    async def wait(
        self,
        job_id: str,
        until: Callable[[jobs.JobSnapshot], bool] | None = None,
        timeout: float = 20.0,
    ) -> jobs.JobSnapshot:
        """Poll until `until(snapshot)` (default: the job is terminal)."""
        check = until or (lambda s: s.job["status"] in jobs.TERMINAL)
        deadline = time.monotonic() + timeout
        while True:
            snapshot = await self.job(job_id)
            if check(snapshot):
                return snapshot
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} stuck: {dict(snapshot.job)}\n{await self.explain(job_id)}"
                )
            await asyncio.sleep(0.02)

    async def explain(self, job_id: str) -> str:
        """What a stuck job's tasks and the workers look like, for the failure message."""
        async with self.db.read() as conn:
            task_rows = (
                await conn.execute(select(task_table).where(task_table.c.job_id == job_id))
            ).all()
            worker_rows = (await conn.execute(select(worker_table))).all()
        states = [
            f"worker {w.id}: running={len(w._running)} lent={w._lent} idle={w._idle}"
            f" wakeup={w._wakeup.is_set()} listening={w._wakeups and w._wakeups.listening}"
            f" leads={w._wakeups and w._wakeups.elected.is_set()}"
            for w in self.workers
        ]
        return "\n".join(
            [f"at {now():.3f}"]
            + [f"task {dict(row._mapping)}" for row in task_rows]
            + [f"worker row {dict(row._mapping)}" for row in worker_rows]
            + states
        )

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        async with self.db.read() as conn:
            return await events.page(conn, job_id, limit=100_000)

    def stage(self, snapshot: jobs.JobSnapshot, name: str) -> Any:
        return next(s for s in snapshot.stages if s["name"] == name)


@pytest.fixture
async def engine(database: Database, tmp_path: Path) -> AsyncIterator[Engine]:
    settings = Settings(
        data_dir=tmp_path,
        database_url=database.url,
        lease_s=2.0,
        worker_poll_interval_s=0.05,
        cancel_grace_s=0.5,
        shutdown_grace_s=2.0,
        sweep_interval_s=0.5,
    )
    blobs = open_blob_store((tmp_path / "blobs").as_uri())
    registry = Registry.from_paths([])
    for pipeline in pipelines.ALL:
        registry.add(pipeline)
    engine = Engine(settings=settings, db=database, blobs=blobs, registry=registry)
    try:
        yield engine
    finally:
        for worker in engine.workers:
            await worker.stop(grace_s=0)
        await blobs.aclose()
