"""Retention: finished jobs past `JOBGATE_JOB_RETENTION_DAYS` are purged with all their
rows, their cost stays counted, and blobs nothing refers to are collected after a grace
period, never one that a job, an artifact or an upload uses again meanwhile."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select, text

from jobgate.api.routes.me import usage_of
from jobgate.config import Settings
from jobgate.ids import month_start, now
from jobgate.store.repositories import blobs as blob_repo
from jobgate.store.repositories import jobs as job_repo
from jobgate.store.tables import (
    artifacts,
    blob_grants,
    blobs,
    events,
    jobs,
    purged_usage,
    stages,
)
from jobgate.worker import retention as retention_module
from jobgate.worker.retention import Retention
from tests.engine.conftest import Engine

DAY = 86_400.0
GRACE = 60.0


def _retention(engine: Engine, **overrides: Any) -> Retention:
    settings = engine.settings.model_copy(
        update={"job_retention_days": 1.0, "blob_gc_grace_s": GRACE, **overrides}
    )
    return Retention(engine.db, engine.blobs, settings)


async def _upload(engine: Engine, name: str, data: bytes, owner: str = "owner-1") -> dict[str, Any]:
    file = await engine.upload(name, data)
    async with engine.db.write() as conn:
        await blob_repo.grant(conn, [file["sha256"]], owner=owner, at=now())
    return file


async def _age(engine: Engine, job_id: str, *, days: float) -> None:
    """Move a job (and the grants of its files) `days` into the past."""
    async with engine.db.write() as conn:
        await conn.execute(
            text(
                "UPDATE jobs SET created_at = created_at - :s,"
                " finished_at = finished_at - :s WHERE id = :id"
            ),
            {"s": days * DAY, "id": job_id},
        )
        await conn.execute(
            text("UPDATE blob_grants SET created_at = created_at - :s"), {"s": days * DAY}
        )


async def _rows(engine: Engine, table: Any, job_id: str) -> int:
    async with engine.db.read() as conn:
        return int(
            (await conn.execute(select(func.count()).where(table.c.job_id == job_id))).scalar_one()
        )


async def _blob_row(engine: Engine, sha256: str) -> Any:
    async with engine.db.read() as conn:
        return (await conn.execute(select(blobs).where(blobs.c.sha256 == sha256))).first()


async def _artifact_sha(engine: Engine, job_id: str) -> str:
    async with engine.db.read() as conn:
        return str(
            (
                await conn.execute(select(artifacts.c.sha256).where(artifacts.c.job_id == job_id))
            ).scalar_one()
        )


async def test_old_finished_jobs_are_purged_with_their_rows_and_their_blobs_collected(
    engine: Engine,
) -> None:
    old_file = await _upload(engine, "old.txt", b"used only by the old job")
    new_file = await _upload(engine, "new.txt", b"used by the new job")
    await engine.start_worker()
    old = await engine.submit("threads", files=[old_file])
    new = await engine.submit("threads", files=[new_file])
    for job_id in (old, new):
        assert (await engine.wait(job_id)).job["status"] == "succeeded"
    for worker in engine.workers:
        await worker.stop(grace_s=0)
    engine.workers.clear()
    waiting = await engine.submit("slow")  # no worker: it stays queued, however old
    old_artifact, new_artifact = [await _artifact_sha(engine, j) for j in (old, new)]
    async with engine.db.read() as conn:
        usage_before = await usage_of(conn, "owner-1")
        old_cost = float(
            (await conn.execute(select(jobs.c.actual_usd).where(jobs.c.id == old))).scalar_one()
        )
    await _age(engine, old, days=3)
    await _age(engine, waiting, days=3)
    # Only the old job's upload grant is past retention (the new job's is aged too, but
    # the new job still names that blob among its files).
    retention = _retention(engine)
    at = now()

    first = await retention.run(at)

    assert first.jobs == 1
    assert first.grants == 2
    async with engine.db.read() as conn:
        left = {row[0] for row in await conn.execute(select(jobs.c.id))}
    assert left == {new, waiting}
    for table in (stages, events, artifacts):
        assert await _rows(engine, table, old) == 0, table.name
        assert await _rows(engine, table, new) > 0, table.name
    # Unreferenced now, but only marked: their files stay for the grace period.
    assert first.marked == 2
    assert first.collected == 0
    for sha256 in (old_file["sha256"], old_artifact):
        row = await _blob_row(engine, sha256)
        assert row is not None
        assert row.gc_marked_at == at
        assert row.gc_stamp
        assert await engine.blobs.exists(sha256)

    second = await retention.run(at + GRACE / 2)
    assert second.collected == 0

    third = await retention.run(at + GRACE + 1)

    assert third.collected == 2
    for sha256 in (old_file["sha256"], old_artifact):
        assert await _blob_row(engine, sha256) is None
        assert not await engine.blobs.exists(sha256)
    for sha256 in (new_file["sha256"], new_artifact):
        row = await _blob_row(engine, sha256)
        assert row is not None
        assert row.gc_marked_at is None
        assert await engine.blobs.exists(sha256)
    # What the purged job cost is still the owner's: in all, and in its month.
    async with engine.db.read() as conn:
        usage_after = await usage_of(conn, "owner-1")
        ledger = (await conn.execute(select(purged_usage))).all()
        month_spent = await job_repo.spent_since(conn, "owner-1", month_start(now()))
    assert usage_after.jobs_total == usage_before.jobs_total
    assert usage_after.spent_usd == pytest.approx(usage_before.spent_usd)
    assert [(r.owner, r.jobs) for r in ledger] == [("owner-1", 1)]
    assert ledger[0].spent_usd == pytest.approx(old_cost)
    assert ledger[0].month < month_start(now()) or month_spent >= old_cost


async def test_a_blob_used_again_after_its_mark_is_not_collected(engine: Engine) -> None:
    """Marked blobs that an upload records again, that a job's owner is granted, or whose
    bytes a writer publishes again (its row not committed yet) keep their files."""
    recorded = await engine.upload("a.txt", b"uploaded again")
    granted = await engine.upload("b.txt", b"granted to a job")
    republished = await engine.upload("c.txt", b"written again by a stage")
    forgotten = await engine.upload("d.txt", b"nobody wants this")
    retention = _retention(engine, job_retention_days=0.0)
    at = now()
    assert (await retention.run(at)).marked == 4

    await _upload(engine, "a.txt", b"uploaded again", owner="owner-3")
    async with engine.db.write() as conn:
        await blob_repo.grant(conn, [granted["sha256"]], owner="owner-2", at=now())
    again = await engine.blobs.put_bytes(b"written again by a stage")
    assert not again.created

    result = await retention.run(at + GRACE + 1)

    assert await _blob_row(engine, forgotten["sha256"]) is None
    assert not await engine.blobs.exists(forgotten["sha256"])
    for file in (recorded, granted):
        row = await _blob_row(engine, file["sha256"])
        assert row is not None, file["name"]
        assert row.gc_marked_at is None, file["name"]
        assert await engine.blobs.exists(file["sha256"])
    # Its row went (nothing referred to it), but not the bytes another writer now holds.
    assert await _blob_row(engine, republished["sha256"]) is None
    assert await engine.blobs.exists(republished["sha256"])
    assert result.collected == 1


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_sweep_waits_for_a_transaction_recording_the_blob_again(engine: Engine) -> None:
    """A sweep that meets a marked blob while an upload records it again (and grants it)
    waits for that transaction, then leaves the blob: the upload's grant and bytes stay."""
    file = await engine.upload("x.txt", b"uploaded while being collected")
    retention = _retention(engine, job_retention_days=0.0)
    at = now()
    assert (await retention.run(at)).marked == 1
    row = blob_repo.BlobRow(file["sha256"], file["size"], file["content_type"])
    async with engine.db.write() as conn:
        await blob_repo.add(conn, [row], at=now())
        await blob_repo.grant(conn, [file["sha256"]], owner="owner-9", at=now())
        sweep = asyncio.create_task(retention.run(at + GRACE + 1))
        deadline = time.monotonic() + 10
        while not await _waiting_for_a_lock(engine):
            assert not sweep.done(), "the sweep did not wait for the upload"
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    result = await asyncio.wait_for(sweep, 10)
    assert result.collected == 0
    found = await _blob_row(engine, file["sha256"])
    assert found is not None
    assert found.gc_marked_at is None
    assert await engine.blobs.exists(file["sha256"])
    async with engine.db.read() as conn:
        owners = [r[0] for r in await conn.execute(select(blob_grants.c.owner))]
    assert owners == ["owner-9"]


async def _waiting_for_a_lock(engine: Engine) -> bool:
    async with engine.db.read() as conn:
        waiting = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)


async def test_a_blob_named_by_a_job_is_not_collected(engine: Engine) -> None:
    """A job's input files keep their blobs, even with no grant left."""
    file = await _upload(engine, "in.txt", b"an input of a queued job")
    job_id = await engine.submit("threads", files=[file])
    async with engine.db.write() as conn:
        await conn.execute(text("DELETE FROM blob_grants"))
    retention = _retention(engine, job_retention_days=0.0)
    at = now()
    assert (await retention.run(at)).marked == 0
    assert (await retention.run(at + GRACE + 1)).collected == 0
    assert await _blob_row(engine, file["sha256"]) is not None
    assert (await engine.job(job_id)).job["status"] == "queued"


async def test_blobs_only_jobs_name_do_not_hide_the_ones_after_them(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Marking pages through the unreferenced blobs: however many of the oldest only
    a job's files name (never marked), a newer orphan gets its turn. (Regression: each
    round looked at the same oldest batch, so such blobs could hide every orphan.)"""
    monkeypatch.setattr(retention_module, "BATCH", 2)
    files = [await _upload(engine, f"in{i}.txt", f"input {i}".encode()) for i in range(3)]
    await engine.submit("threads", files=files)
    async with engine.db.write() as conn:
        await conn.execute(text("DELETE FROM blob_grants"))
    orphan = await engine.upload("orphan.txt", b"nobody's")
    retention = _retention(engine, job_retention_days=0.0)
    marked = [(await retention.run(now())).marked for _ in range(3)]
    assert sum(marked) == 1
    row = await _blob_row(engine, orphan["sha256"])
    assert row is not None
    assert row.gc_marked_at is not None
    for file in files:
        named = await _blob_row(engine, file["sha256"])
        assert named is not None
        assert named.gc_marked_at is None


async def test_nothing_is_purged_without_retention(engine: Engine) -> None:
    file = await _upload(engine, "in.txt", b"kept for ever")
    await engine.start_worker()
    job_id = await engine.submit("threads", files=[file])
    await engine.wait(job_id)
    await _age(engine, job_id, days=3650)
    result = await _retention(engine, job_retention_days=0.0).run(now() + GRACE + 1)
    assert (result.jobs, result.grants, result.marked, result.collected) == (0, 0, 0, 0)
    assert (await engine.job(job_id)).job["status"] == "succeeded"
    async with engine.db.read() as conn:
        grants = (await conn.execute(select(func.count()).select_from(blob_grants))).scalar_one()
    assert grants == 1


async def test_the_worker_purges_on_its_own(engine: Engine) -> None:
    engine.settings = engine.settings.model_copy(
        update={"job_retention_days": 1.0, "retention_interval_s": 0.2}
    )
    await engine.start_worker()
    job_id = await engine.submit("slow", {"seconds": 0})
    await engine.wait(job_id)
    await _age(engine, job_id, days=2)
    deadline = time.monotonic() + 15
    while await _rows(engine, stages, job_id):
        assert time.monotonic() < deadline, "the worker never purged the old job"
        await asyncio.sleep(0.1)
    async with engine.db.read() as conn:
        assert (await conn.execute(select(jobs).where(jobs.c.id == job_id))).first() is None


def test_retention_shorter_than_the_idempotency_ttl_is_refused() -> None:
    with pytest.raises(ValidationError, match="JOBGATE_JOB_RETENTION_DAYS"):
        Settings(job_retention_days=0.5, idempotency_ttl_s=86_400)
    assert Settings(job_retention_days=0.5, idempotency_ttl_s=3600).job_retention_days == 0.5


def _make_old(engine: Engine, sha256: str, *, seconds: float) -> None:
    """Date a blob's file `seconds` back, as if written then."""
    path = engine.blobs.local_path(sha256)
    assert path is not None
    old = int((time.time() - seconds) * 1e9)
    os.utime(path, ns=(old, old))


async def test_a_file_without_a_row_is_collected_after_the_grace(engine: Engine) -> None:
    """A file the store has no row for (its writer died before committing one) is found
    by listing the blob store once it is older than the grace, given a marked row, and
    collected a grace later; a younger one is left alone (its row may be on its way)."""
    orphan = await engine.blobs.put_bytes(b"written by a process that died")
    young = await engine.blobs.put_bytes(b"written a moment ago")
    _make_old(engine, orphan.sha256, seconds=2 * GRACE)
    retention = _retention(engine, job_retention_days=0.0)
    at = now()
    for stored in (orphan, young):
        retention.next_shard = int(stored.sha256[:2], 16)
        await retention.run(at)

    adopted = await _blob_row(engine, orphan.sha256)
    assert adopted is not None
    assert (adopted.size, adopted.gc_marked_at) == (orphan.size, at)
    assert await _blob_row(engine, young.sha256) is None
    assert await engine.blobs.exists(orphan.sha256)

    result = await retention.run(at + GRACE + 1)

    assert result.collected == 1
    assert await _blob_row(engine, orphan.sha256) is None
    assert not await engine.blobs.exists(orphan.sha256)
    assert await engine.blobs.exists(young.sha256)


async def test_a_file_recorded_after_its_adoption_stays_with_its_type(engine: Engine) -> None:
    """An upload of the same bytes after the file was adopted records the blob for real:
    the mark goes, the row takes the upload's type, and no later round collects it."""
    orphan = await engine.blobs.put_bytes(b"plain text that was orphaned\n")
    _make_old(engine, orphan.sha256, seconds=2 * GRACE)
    retention = _retention(engine, job_retention_days=0.0)
    retention.next_shard = int(orphan.sha256[:2], 16)
    at = now()
    assert (await retention.run(at)).adopted == 1

    file = await _upload(engine, "notes.txt", b"plain text that was orphaned\n")
    await retention.run(at + GRACE + 1)
    await retention.run(at + 3 * GRACE)

    row = await _blob_row(engine, orphan.sha256)
    assert row is not None
    assert row.gc_marked_at is None
    assert row.content_type == file["content_type"] == "text/plain"
    assert await engine.blobs.exists(orphan.sha256)


async def test_listing_a_shard_finds_its_files_only(engine: Engine) -> None:
    """`list_files` gives a shard's blobs with their sizes and stamps; shards are two
    lowercase hex digits."""
    stored = await engine.blobs.put_bytes(b"listed")
    listed = await engine.blobs.list_files(stored.sha256[:2])
    assert [(f.sha256, f.size) for f in listed] == [(stored.sha256, 6)]
    assert listed[0].stamp == await engine.blobs.stamp(stored.sha256)
    other = f"{(int(stored.sha256[:2], 16) + 1) % 256:02x}"
    assert await engine.blobs.list_files(other) == []
    for bad in ("A0", "0", "../", "zz"):
        with pytest.raises(ValueError, match="shard"):
            await engine.blobs.list_files(bad)
