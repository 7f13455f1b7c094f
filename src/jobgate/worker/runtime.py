"""`TaskRuntime`: the worker's side of a `StageContext`, for one claimed task.

Stage code may call it from the event loop (async stages) or from a thread (sync
stages), so everything it buffers is guarded by a lock, and everything it must write
is handed to the event loop.
"""

from __future__ import annotations

import asyncio
import mimetypes
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from jobgate.blobs.base import BlobError, StoredBlob
from jobgate.errors import BudgetExhausted, JobCancelled, StageError, StoreUnreachable
from jobgate.ids import now
from jobgate.pipelines.context import ArtifactSource
from jobgate.pipelines.files import sanitize_filename, sniff
from jobgate.store.database import is_outage
from jobgate.store.repositories import artifacts, tasks

if TYPE_CHECKING:
    from jobgate.worker.worker import Worker

log = structlog.get_logger("jobgate.worker")


class TaskRuntime:
    """Buffers a running stage's progress, messages and cost until the next flush."""

    def __init__(self, worker: Worker, task: tasks.Claimed, loop: asyncio.AbstractEventLoop):
        self._worker = worker
        self.task = task
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._lock = threading.Lock()
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._progress: tuple[float, str | None] | None = None
        self._cost_delta = 0.0
        # Cost taken into a report whose write has not returned: the store's total
        # does not hold it yet, and the budget check must not miss it meanwhile.
        self._cost_in_flight = 0.0
        self._cost_items: str = ""
        self._flush_lock = asyncio.Lock()
        self._cancelled = threading.Event()
        if task.cancel_requested:
            self._cancelled.set()
        self.dirty = asyncio.Event()
        self.lease_lost = False
        self.handing_back = False
        # Set once the outcome is being written: a renewal that then misses the task
        # row saw the outcome commit, not a lost lease.
        self.finishing = False
        # Set once the stage's runner was cancelled: it is cancelled at most once.
        self.interrupted = False
        self.flusher: asyncio.Task[None] | None = None
        # Set while the flusher writes a report: it must then finish, not be cancelled.
        self.flushing = False
        self.finish_requested = asyncio.Event()

    # -- StageRuntime ----------------------------------------------------------------

    def report_progress(self, fraction: float, message: str | None) -> None:
        with self._lock:
            self._progress = (fraction, message)
        self._mark_dirty()

    def report_log(self, level: str, text: str) -> None:
        with self._lock:
            self._events.append(
                ("message", {"level": level, "text": text[:10_000], "stage": self.task.stage})
            )
        self._mark_dirty()

    def report_cost(self, usd: float, item: str) -> None:
        with self._lock:
            self._cost_delta += usd
            self._cost_items = item
            total = self._job_cost()
        self._mark_dirty()
        if total > self.task.budget_usd + 1e-9:
            raise BudgetExhausted(
                f"the job's cost {total:.4f} USD passed its budget "
                f"of {self.task.budget_usd:.4f} USD"
            )

    def job_cost(self) -> float:
        with self._lock:
            return self._job_cost()

    def _job_cost(self) -> float:
        return self.task.actual_usd + self._cost_in_flight + self._cost_delta

    def cancel_requested(self) -> bool:
        return self._cancelled.is_set()

    def save_artifact_blocking(
        self, name: str, source: ArtifactSource, content_type: str | None, primary: bool
    ) -> dict[str, Any]:
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError("async stages save artifacts with `await ctx.asave_artifact(...)`")
        future = asyncio.run_coroutine_threadsafe(
            self.save_artifact(name, source, content_type, primary), self._loop
        )
        return future.result()

    async def save_artifact(
        self, name: str, source: ArtifactSource, content_type: str | None, primary: bool
    ) -> dict[str, Any]:
        safe_name = sanitize_filename(name)
        blobs = self._worker.blobs
        try:
            if isinstance(source, bytes):
                stored = await blobs.put_bytes(source)
            else:
                stored = await blobs.put_file(Path(source))
        except BlobError as exc:
            # The store's own words may name server paths: the server's log has them.
            log.warning("artifact_not_stored", artifact=safe_name, error=str(exc))
            raise StageError(f"the artifact {safe_name!r} could not be stored") from exc
        kind = content_type or mimetypes.guess_type(safe_name)[0] or sniff(stored.head, safe_name)
        delay = 0.05
        while True:
            try:
                return await self._record_artifact(safe_name, stored, kind, primary)
            except (JobCancelled, tasks.LeaseLost):
                raise
            except Exception as exc:
                if not is_outage(exc):
                    log.exception("artifact_not_recorded", artifact=safe_name)
                    message = f"the artifact {safe_name!r} could not be recorded"
                    raise StageError(message) from exc
                if now() + delay > self.task.lease_expires_at:
                    raise StoreUnreachable(
                        f"the store did not answer while the artifact {safe_name!r} was saved"
                    ) from exc
                # A store outage: wait it out while the lease lasts (its renewals fail
                # meanwhile; once it ends, the sweep hands the task to a worker anyway).
                log.warning("artifact_write_retry", artifact=safe_name, error=type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _record_artifact(
        self, name: str, stored: StoredBlob, kind: str, primary: bool
    ) -> dict[str, Any]:
        # Events buffered so far go first, so the log keeps the stage's own order.
        await self.flush()
        async with self._worker.db.write() as conn:
            job = await tasks.hold(conn, self.task)
            if job.status not in ("queued", "running"):
                # A sibling stage failed the job meanwhile: its log and artifacts are
                # closed, and this stage has nothing left to do.
                raise JobCancelled()
            return await artifacts.put(
                conn,
                job_id=self.task.job_id,
                stage=self.task.stage,
                name=name,
                sha256=stored.sha256,
                size=stored.size,
                content_type=kind,
                primary=primary,
                at=now(),
            )

    # -- the worker's side -----------------------------------------------------------

    def cancel(self) -> None:
        self._cancelled.set()

    def take_report(self) -> tasks.Report:
        """Everything buffered since the last call, as one `Report`."""
        with self._lock:
            report = tasks.Report(events=self._events, buffered=len(self._events))
            self._events = []
            if self._cost_delta:
                actual = self._job_cost()
                report.cost_delta = self._cost_delta
                self._cost_in_flight += self._cost_delta
                report.events.append(
                    (
                        "cost_update",
                        {
                            "actual_usd": round(actual, 10),
                            "delta_usd": round(self._cost_delta, 10),
                            "item": self._cost_items,
                        },
                    )
                )
                self._cost_delta = 0.0
            if self._progress is not None and self.task.item_index is None:
                fraction, message = self._progress
                report.progress, report.progress_message = fraction, message
                data: dict[str, Any] = {"stage": self.task.stage, "stage_progress": fraction}
                if message is not None:
                    data["message"] = message
                report.events.append(("progress", data))
                self._progress = None
            return report

    def put_back(self, report: tasks.Report) -> None:
        """Return a report that could not be written, so the next flush retries it.

        Its cost and progress events are not kept: the next report makes them again, from
        the cost and progress put back here (merged with what came since)."""
        with self._lock:
            self._events = report.events[: report.buffered] + self._events
            self._cost_in_flight -= report.cost_delta
            self._cost_delta += report.cost_delta
            if self._progress is None and report.progress is not None:
                self._progress = (report.progress, report.progress_message)

    async def flush(self) -> None:
        """Write what is buffered (renewing the lease); raises `LeaseLost`.

        One flush at a time (the flusher's and an artifact's), so the stored total a
        flush returns holds every report this stage has written."""
        async with self._flush_lock:
            report = self.take_report()
            if not report:
                return
            try:
                async with self._worker.db.write() as conn:
                    flushed = await tasks.flush(
                        conn, self.task, report, lease_s=self._worker.settings.lease_s, at=now()
                    )
            except tasks.LeaseLost:
                raise
            except Exception:
                self.put_back(report)
                raise
            # The stored cost includes parallel stages' reports, so the next
            # `report_cost` checks the budget against the whole job's spending.
            with self._lock:
                self.task.actual_usd = flushed.actual_usd
                self._cost_in_flight -= report.cost_delta
        if flushed.stop:
            self.cancel()

    def _mark_dirty(self) -> None:
        if threading.get_ident() == self._loop_thread:
            self.dirty.set()
        else:
            self._loop.call_soon_threadsafe(self.dirty.set)
