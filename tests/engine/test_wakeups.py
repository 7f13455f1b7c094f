"""PostgreSQL `LISTEN/NOTIFY`: committed tasks wake listeners; a lost connection recovers."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import event, func, select

from jobgate.blobs import open_blob_store
from jobgate.blobs.base import BlobStore
from jobgate.config import Settings
from jobgate.ids import now, uuid7
from jobgate.pipelines import Registry
from jobgate.store import Database
from jobgate.store.repositories import jobs
from jobgate.store.tables import jobs as job_table
from jobgate.transport.wakeups import PostgresWakeups, asyncpg_dsn
from jobgate.worker import Worker

pytestmark = pytest.mark.service("postgres")


async def _submit(db: Database, *, roll_back: bool = False) -> None:
    noop = Registry.from_paths([]).get("noop")
    job = jobs.NewJob(
        id=uuid7(),
        pipeline=noop,
        owner="o",
        params={},
        files=[],
        priority=0,
        budget_usd=1,
        estimated_usd=0,
    )
    async with db.write() as conn:
        await jobs.create(conn, [job], at=now())
        if roll_back:
            raise RuntimeError("roll back")


def _noop_worker(
    url: str, tmp_path: Path, *, poll_s: float, concurrency: int
) -> tuple[Worker, Database, BlobStore]:
    """A worker of the built-in pipelines polling every `poll_s`, with its store."""
    settings = Settings(data_dir=tmp_path, database_url=url, worker_poll_interval_s=poll_s)
    db = Database(url)
    blobs = open_blob_store((tmp_path / "blobs").as_uri())
    worker = Worker(
        settings=settings,
        db=db,
        blobs=blobs,
        registry=Registry.from_paths([]),
        concurrency=concurrency,
    )
    return worker, db, blobs


async def _succeeded(db: Database) -> int:
    async with db.read() as conn:
        return int(
            await conn.scalar(
                select(func.count()).select_from(job_table).where(job_table.c.status == "succeeded")
            )
            or 0
        )


async def test_a_committed_task_wakes_a_listener_and_a_rolled_back_one_does_not(
    postgres_db_url: str,
) -> None:
    db = Database(postgres_db_url)
    woken = asyncio.Event()
    listener = PostgresWakeups(postgres_db_url, woken.set)
    await listener.start()
    try:
        woken.clear()  # the wake every (re)connect gives
        with pytest.raises(RuntimeError):
            await _submit(db, roll_back=True)
        await asyncio.sleep(0.3)
        assert not woken.is_set()
        await _submit(db)
        await asyncio.wait_for(woken.wait(), timeout=2)
    finally:
        await listener.aclose()
        await db.aclose()


async def test_listener_reconnects_after_its_connection_is_killed(postgres_db_url: str) -> None:
    db = Database(postgres_db_url)
    woken = asyncio.Event()
    listener = PostgresWakeups(postgres_db_url, woken.set)
    await listener.start()
    try:
        admin = await asyncpg.connect(asyncpg_dsn(postgres_db_url))
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid() "
                "AND datname = current_database()"
            )
        finally:
            await admin.close()
        assert killed >= 1
        await asyncio.sleep(1.0)  # reconnects (and wakes once, for what it missed)
        woken.clear()
        await _submit(db)
        await asyncio.wait_for(woken.wait(), timeout=3)
    finally:
        await listener.aclose()
        await db.aclose()


async def test_a_worker_is_woken_by_another_process_commit_not_by_its_poll(
    postgres_db_url: str, tmp_path: Path
) -> None:
    """With a 30 s poll, a job committed elsewhere still runs within a second or two."""
    worker, db, blobs = _noop_worker(postgres_db_url, tmp_path, poll_s=30, concurrency=2)
    await worker.start()
    try:
        await asyncio.sleep(0.5)  # past the first poll
        submitted = time.monotonic()
        await _submit(db)  # a separate transaction; nobody calls worker.wake()
        while not await _succeeded(db):
            assert time.monotonic() - submitted < 3, "the worker waited for its poll"
            await asyncio.sleep(0.02)
    finally:
        await worker.stop(grace_s=0)
        await blobs.aclose()
        await db.aclose()


async def test_an_idle_worker_barely_touches_the_database(
    postgres_db_url: str, tmp_path: Path
) -> None:
    """Woken by notifications, an idle worker only heartbeats, sweeps and polls rarely."""
    settings = Settings(data_dir=tmp_path, database_url=postgres_db_url)
    db = Database(postgres_db_url)
    statements: list[str] = []
    event.listen(
        db.engine.sync_engine,
        "before_cursor_execute",
        lambda _c, _cur, sql, *_rest: statements.append(sql),
    )
    blobs = open_blob_store((tmp_path / "blobs").as_uri())
    worker = Worker(
        settings=settings, db=db, blobs=blobs, registry=Registry.from_paths([]), concurrency=4
    )
    await worker.start()
    try:
        await asyncio.sleep(1.0)  # start-up claims and registration
        statements.clear()
        await asyncio.sleep(6.0)
        per_second = len(statements) / 6.0
        print(f"idle worker: {per_second:.2f} statements/s: {statements}")
        assert per_second < 1.5
    finally:
        await worker.stop(grace_s=0)
        await blobs.aclose()
        await db.aclose()


async def test_an_idle_worker_claims_once_per_job_not_again_when_it_ends(
    postgres_db_url: str, tmp_path: Path
) -> None:
    """A one-stage job's end makes nothing ready: the worker, whose last claim found
    the queue empty, does not claim again for it. (On an idle system that claim would
    run just as live streams read the job's end.) A second job is still claimed at once."""
    worker, db, blobs = _noop_worker(postgres_db_url, tmp_path, poll_s=30, concurrency=4)
    claims: list[int] = []
    claim = worker._claim

    async def counted(*args: object, **kwargs: object) -> list[object]:
        found = await claim(*args, **kwargs)  # type: ignore[arg-type]
        claims.append(len(found))
        return list(found)

    worker._claim = counted  # type: ignore[method-assign]

    await worker.start()
    try:
        await asyncio.sleep(0.5)  # past the start-up claim
        for done in (1, 2):
            claims.clear()
            await _submit(db)
            async with asyncio.timeout(3):
                while await _succeeded(db) < done:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            assert claims == [1], f"job {done}: claims after its submit found {claims}"
    finally:
        await worker.stop(grace_s=0)
        await blobs.aclose()
        await db.aclose()


async def test_a_failed_claim_is_tried_again_without_a_new_wake_up(
    postgres_db_url: str, tmp_path: Path
) -> None:
    """The claim a notification woke fails (a deadlock, a dropped connection): the worker
    claims again after `worker_poll_interval_s`, not at its next idle poll (60 s)."""
    worker, db, blobs = _noop_worker(postgres_db_url, tmp_path, poll_s=0.2, concurrency=2)
    failures: list[float] = []
    claim = worker._claim

    async def fails_once(*args: object, **kwargs: object) -> list[object]:
        if armed and not failures:
            failures.append(time.monotonic())
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        return list(await claim(*args, **kwargs))  # type: ignore[arg-type]

    worker._claim = fails_once  # type: ignore[method-assign]
    armed = False
    await worker.start()
    try:
        await asyncio.sleep(0.5)  # past the start-up claim
        armed = True
        await _submit(db)
        async with asyncio.timeout(5):
            while not failures:
                await asyncio.sleep(0.02)
            while not await _succeeded(db):
                await asyncio.sleep(0.02)
        assert worker._poll_interval() == worker.settings.worker_idle_poll_s  # it was listening
    finally:
        await worker.stop(grace_s=0)
        await blobs.aclose()
        await db.aclose()


async def test_claims_that_keep_failing_back_off_and_recover(
    postgres_db_url: str, tmp_path: Path
) -> None:
    """While every claim fails, the pause between them doubles (up to 2 s) instead of
    logging a failure every poll; the first claim that works runs what waited."""
    worker, db, blobs = _noop_worker(postgres_db_url, tmp_path, poll_s=0.1, concurrency=2)
    attempts: list[float] = []
    claim = worker._claim
    broken = True

    async def out_of_reach(*args: object, **kwargs: object) -> list[object]:
        attempts.append(time.monotonic())
        if broken:
            raise OSError("connection refused")
        return list(await claim(*args, **kwargs))  # type: ignore[arg-type]

    worker._claim = out_of_reach  # type: ignore[method-assign]
    await worker.start()
    try:
        await _submit(db)
        await asyncio.sleep(2.5)
        gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
        # 0.1, 0.2, 0.4, 0.8 s: a fixed 0.1 s pause would have made some 25 attempts.
        assert 3 <= len(attempts) <= 6, gaps
        assert all(later > 1.5 * earlier for earlier, later in itertools.pairwise(gaps)), gaps
        broken = False
        async with asyncio.timeout(2 + 3):
            while not await _succeeded(db):
                await asyncio.sleep(0.02)
    finally:
        await worker.stop(grace_s=0)
        await blobs.aclose()
        await db.aclose()
