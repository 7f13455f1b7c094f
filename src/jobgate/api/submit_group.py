"""Group commit for submits: jobs that concurrent requests submit are written together.

On PostgreSQL a submit with no upload, file or idempotency key is one insert statement.
Under load, one statement per request spends more on round trips, parsing and WAL
flushes than on the rows, and the requests of one owner queue on that owner's
fair-share clock row, each holding it until its commit is flushed. One statement for
every submit that is waiting costs one of each for all of them.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from jobgate.batching import Batches
from jobgate.ids import now
from jobgate.store import Database
from jobgate.store.database import is_outage
from jobgate.store.repositories import jobs as job_repo
from jobgate.store.repositories.tasks import SlotLoan

log = structlog.get_logger("jobgate.api")


@dataclass
class _Pending:
    new_jobs: Sequence[job_repo.NewJob]
    done: asyncio.Future[list[job_repo.JobSnapshot]]


class SubmitGroup:
    """Writes the jobs of concurrent one-statement submits in shared statements
    (PostgreSQL: `Database.autocommit()`).

    Up to `writers` statements run at once; submits that arrive while they all do wait
    for the next, which takes every submit queued so far (up to `max_jobs` jobs, but
    never part of one submit). A lone submit is written at once; a burst costs one
    statement per batch. Each statement commits on its own, so every submit in it is
    stored whole or not at all. A submit of `alone_from` jobs or more already spreads a
    statement's cost over many rows: it is written at once, by itself. `on_written` is
    called after each statement that made tasks ready commits (the in-process worker's
    wake-up), with the payload of the notification the statement sent workers, unique to
    it.

    `lender`, when set, is the in-process worker: each statement asks it for its free
    slots (`lend`), the statement's jobs start in the statement itself if they all fit,
    leased to it (no claim between the submit and the stage), and it gets them back
    (`settle`) once the statement is done, with the tasks it is to run (none when the
    jobs did not fit, or the statement failed).

    When PostgreSQL refuses a batch of several submits (an error other than an outage:
    nothing was written), each is written again alone, so one submit's bad row fails
    that submit only. An outage fails them all: whether a statement whose connection
    broke committed is unknown, and writing its jobs again could store them twice.
    """

    def __init__(
        self,
        db: Database,
        *,
        aging_s: float,
        stride_s: float,
        writers: int = 2,
        max_jobs: int = 1000,
        alone_from: int = 50,
        on_written: Callable[[str], None] = lambda _notice: None,
    ) -> None:
        self.db = db
        self.on_written = on_written
        self._notice_prefix = f"submit-{uuid.uuid4().hex[:12]}-"
        self._notices = itertools.count()
        self.lender: Lender | None = None
        self.aging_s = aging_s
        self.stride_s = stride_s
        self.max_jobs = max_jobs
        self.alone_from = alone_from
        self.batches = Batches(
            self._write_batch, writers=writers, name="jobgate-submit-group", take=self._take
        )

    async def create(self, new_jobs: Sequence[job_repo.NewJob]) -> list[job_repo.JobSnapshot]:
        """Write `new_jobs` (one submit; `jobs.needs_transaction` false) with the other
        submits waiting; their snapshots, once committed.

        The write goes on if the caller is cancelled: the jobs may then be stored.
        """
        if len(new_jobs) >= self.alone_from:
            return await self._insert(new_jobs)
        done: asyncio.Future[list[job_repo.JobSnapshot]] = (
            asyncio.get_running_loop().create_future()
        )
        self.batches.put(_Pending(new_jobs, done))
        return await done

    async def aclose(self) -> None:
        """Wait for the statements being written."""
        await self.batches.wait()

    def _take(self, queue: deque[_Pending]) -> list[_Pending]:
        batch: list[_Pending] = []
        count = 0
        while queue:
            size = len(queue[0].new_jobs)
            if batch and count + size > self.max_jobs:
                break
            batch.append(queue.popleft())
            count += size
        return batch

    async def _write_batch(self, batch: list[_Pending]) -> None:
        try:
            snapshots = await self._insert([job for p in batch for job in p.new_jobs])
        except Exception as exc:
            if len(batch) == 1 or is_outage(exc):
                for pending in batch:
                    _fail(pending, exc)
                return
            log.warning("submit_group_refused", submits=len(batch), error=repr(exc))
            for pending in batch:
                try:
                    _settle(pending, await self._insert(pending.new_jobs))
                except Exception as alone:
                    _fail(pending, alone)
            return
        start = 0
        for pending in batch:
            end = start + len(pending.new_jobs)
            _settle(pending, snapshots[start:end])
            start = end

    async def _insert(self, new_jobs: Sequence[job_repo.NewJob]) -> list[job_repo.JobSnapshot]:
        notice = f"{self._notice_prefix}{next(self._notices)}"
        lender = self.lender
        loan = lender.lend() if lender is not None else None
        try:
            async with self.db.autocommit() as conn:
                snapshots = await job_repo.create(
                    conn,
                    new_jobs,
                    at=now(),
                    aging_s=self.aging_s,
                    stride_s=self.stride_s,
                    notice=notice,
                    loan=loan,
                )
        finally:
            # Failed: whether its tasks were stored is unknown; if they were, their lease
            # runs out unrenewed and the sweeper hands them back, as after a crash.
            if lender is not None and loan is not None:
                lender.settle(loan)
        if loan is None or loan.left_ready:
            # Before the submits' own tasks resume: an in-process worker's claim then
            # goes out while their answers are built, not after.
            self.on_written(notice)
        return snapshots


class Lender(Protocol):
    """An in-process worker that lends its free slots to submit statements."""

    def lend(self) -> SlotLoan | None:
        """Free slots to start new jobs on, reserved until `settle`; None to lend none."""

    def settle(self, loan: SlotLoan) -> None:
        """Run the tasks `loan.started` holds, and free the slots they do not use."""


def _settle(pending: _Pending, snapshots: list[job_repo.JobSnapshot]) -> None:
    if not pending.done.done():
        pending.done.set_result(snapshots)


def _fail(pending: _Pending, exc: BaseException) -> None:
    if not pending.done.done():
        pending.done.set_exception(exc)
