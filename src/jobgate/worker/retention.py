"""The retention round a sweeping worker runs every `JOBGATE_RETENTION_INTERVAL_S`:
purge finished jobs past `JOBGATE_JOB_RETENTION_DAYS`, then collect the blobs nothing
refers to any more, files without a row included (`store/repositories/retention.py`,
`docs/retention.md`)."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.blobs.base import BlobError, BlobStore, StoredBlob
from jobgate.config import Settings
from jobgate.store import Database
from jobgate.store.repositories import retention

log = structlog.get_logger("jobgate.retention")

BATCH = 500
"""Jobs (or grants, or blobs) one transaction takes: each round is many short ones."""
ROUND_BUDGET_S = 5.0
"""A round stops starting transactions after this long; the next round goes on."""
SHARDS_PER_ROUND = 16
"""Of the blob store's 256 shards, how many a round lists for files without a row: the
whole store every 16 rounds (80 minutes at the default interval)."""


@dataclass
class RoundResult:
    """What one round did."""

    jobs: int = 0
    grants: int = 0
    marked: int = 0
    collected: int = 0
    adopted: int = 0


class Retention:
    """Runs retention rounds for one worker (the sweeping one: the leader on PostgreSQL)."""

    def __init__(self, db: Database, blobs: BlobStore, settings: Settings) -> None:
        self.db = db
        self.blobs = blobs
        self.settings = settings
        self._cursor: retention.Cursor | None = None  # where the marking pass got to
        self.next_shard = random.randrange(256)  # noqa: S311 - where the listing goes on

    @property
    def enabled(self) -> bool:
        return self.settings.job_retention_days > 0 or self.settings.blob_gc_grace_s > 0

    async def run(self, at: float) -> RoundResult:
        """One round: purge what is past retention, mark unreferenced blobs, and collect
        those marked longer than the grace period."""
        result = RoundResult()
        deadline = time.monotonic() + ROUND_BUDGET_S
        retention_s = self.settings.job_retention_days * 86_400
        if retention_s > 0:
            before = at - retention_s
            result.jobs = await self._in_batches(
                lambda conn: retention.purge_jobs(conn, finished_before=before, limit=BATCH),
                deadline,
            )
            result.grants = await self._in_batches(
                lambda conn: retention.purge_grants(conn, before=before, limit=BATCH), deadline
            )
        grace_s = self.settings.blob_gc_grace_s
        if grace_s > 0 and time.monotonic() < deadline:
            result.collected = await self._collect(at - grace_s)
            result.marked = await self._mark(at)
            # Files' ages by the wall clock, as their modification times are.
            written_before = time.time() - grace_s
            result.adopted = await self._adopt(at, written_before=written_before, deadline=deadline)
        if result.jobs or result.grants or result.collected or result.adopted:
            log.info(
                "retention_round",
                jobs_purged=result.jobs,
                grants_purged=result.grants,
                blobs_marked=result.marked,
                blobs_collected=result.collected,
                files_adopted=result.adopted,
            )
        return result

    async def _in_batches(
        self, purge: Callable[[AsyncConnection], Awaitable[int]], deadline: float
    ) -> int:
        """Run `purge` a transaction at a time until a batch comes short or time is up."""
        total = 0
        while time.monotonic() < deadline:
            async with self.db.write() as conn:
                done = await purge(conn)
            total += done
            if done < BATCH:
                break
        return total

    async def _mark(self, at: float) -> int:
        async with self.db.write() as conn:
            marked, self._cursor = await retention.mark_blobs(
                conn, at=at, limit=BATCH, after=self._cursor
            )
        if not marked:
            return 0
        # Read after the mark committed: a writer that publishes the same bytes later
        # moves the stamp, and the file stays.
        stamps = {sha256: await self.blobs.stamp(sha256) for sha256 in marked}
        async with self.db.write() as conn:
            await retention.stamp_blobs(conn, stamps, at=at)
        return len(marked)

    async def _adopt(self, at: float, *, written_before: float, deadline: float) -> int:
        """List the next shards for files without a row, written before the grace (a
        younger one may be a write whose row is still to commit), and mark them."""
        cutoff_ns = int(written_before * 1e9)
        adopted = 0
        for _ in range(SHARDS_PER_ROUND):
            if time.monotonic() >= deadline:
                break
            prefix = f"{self.next_shard:02x}"
            self.next_shard = (self.next_shard + 1) % 256
            try:
                files = await self.blobs.list_files(prefix)
            except BlobError as exc:
                log.warning("blob_listing_failed", shard=prefix, error=str(exc))
                continue
            old = [file for file in files if file.stamp < cutoff_ns]
            for start in range(0, len(old), BATCH):
                async with self.db.read() as conn:
                    rowless = await retention.without_rows(conn, old[start : start + BATCH])
                if rowless:
                    async with self.db.write() as conn:
                        adopted += len(await retention.adopt_files(conn, rowless, at=at))
        return adopted

    async def _collect(self, marked_before: float) -> int:
        async with self.db.write() as conn:
            collected = await retention.sweep_blobs(conn, marked_before=marked_before, limit=BATCH)
        removed = 0
        for blob in collected:
            if not blob.stamp:
                continue  # no file when it was marked; one written since is someone's
            stored = StoredBlob(blob.sha256, 0, b"", created=True, stamp=blob.stamp)
            try:
                removed += await self.blobs.withdraw(stored)
            except BlobError as exc:
                log.warning("blob_collect_failed", sha256=blob.sha256, error=str(exc))
        return removed
