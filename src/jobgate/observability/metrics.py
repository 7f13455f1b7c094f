"""Prometheus metrics, in one module-level registry that `GET /metrics` renders.

Counters and histograms are updated where things happen (the HTTP middleware, the
submit route, the worker); the gauges describe the store and are refreshed from it
when `/metrics` is scraped, so every API process reports the same, true values.

Waiting tasks and queued or running jobs are counted at every scrape (indexed, and few).
Finished jobs are as many as the store keeps, so counting them reads the whole table:
that count runs in the background at most every `FINISHED_REFRESH_S`, and a scrape
serves the last one (waiting `FINISHED_WAIT_S` at most for a fresh count, which a small
store gives at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.store import Database
from jobgate.store.repositories import tasks
from jobgate.store.tables import jobs

__all__ = [
    "CONTENT_TYPE",
    "HTTP_REQUESTS",
    "HTTP_REQUEST_DURATION",
    "JOBS",
    "JOBS_SUBMITTED",
    "JOB_STATUSES",
    "QUEUE_DEPTH",
    "REGISTRY",
    "STAGE_DURATION",
    "FinishedCounts",
    "refresh",
    "render",
]

log = structlog.get_logger("jobgate.metrics")

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running")
FINISHED_REFRESH_S = 60.0
FINISHED_WAIT_S = 0.5
FINISHED_TIMEOUT_S = 120.0
CONTENT_TYPE = CONTENT_TYPE_LATEST
REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    "jobgate_http_requests",
    "HTTP requests answered, by method, route template and status.",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_REQUEST_DURATION = Histogram(
    "jobgate_http_request_duration_seconds",
    "Time to answer an HTTP request (a stream: its whole life).",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
JOBS_SUBMITTED = Counter(
    "jobgate_jobs_submitted",
    "Jobs accepted, by pipeline.",
    ["pipeline"],
    registry=REGISTRY,
)
STAGE_DURATION = Histogram(
    "jobgate_stage_duration_seconds",
    "Time a stage attempt ran, by pipeline, stage and outcome.",
    ["pipeline", "stage", "outcome"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0),
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "jobgate_queue_depth",
    "Stage tasks waiting to be claimed, by queue (read from the store at scrape time).",
    ["queue"],
    registry=REGISTRY,
)
SSE_STREAMS = Gauge(
    "jobgate_sse_streams_open",
    "Event streams (per job and GET /v1/events) open in this API process.",
    registry=REGISTRY,
)
JOBS = Gauge(
    "jobgate_jobs",
    "Jobs in the store, by pipeline and status (read from the store at scrape time).",
    ["pipeline", "status"],
    registry=REGISTRY,
)


Counts = dict[tuple[str, str], int]


async def _job_counts(conn: AsyncConnection, *, active: bool) -> Counts:
    """Jobs by pipeline and status: the queued and running ones, or the finished ones."""
    in_active = jobs.c.status.in_(ACTIVE_STATUSES)
    rows = await conn.execute(
        select(jobs.c.pipeline, jobs.c.status, func.count())
        .where(in_active if active else ~in_active)
        .group_by(jobs.c.pipeline, jobs.c.status)
    )
    return {(pipeline, status): int(n) for pipeline, status, n in rows}


class FinishedCounts:
    """The last count of finished jobs in one store, taken in the background (see the
    module); one per application."""

    def __init__(self) -> None:
        self.counts: Counts = {}
        self._started = -FINISHED_REFRESH_S
        self._task: asyncio.Task[None] | None = None

    async def get(self, db: Database) -> Counts:
        """The newest count: a fresh one if it comes within `FINISHED_WAIT_S`."""
        due = time.monotonic() - self._started >= FINISHED_REFRESH_S
        if due and (self._task is None or self._task.done()):
            self._started = time.monotonic()
            self._task = asyncio.create_task(self._count(db), name="jobgate-metrics-count")
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), FINISHED_WAIT_S)
        return self.counts

    async def _count(self, db: Database) -> None:
        try:
            async with asyncio.timeout(FINISHED_TIMEOUT_S), db.read() as conn:
                self.counts = await _job_counts(conn, active=False)
        except Exception as exc:
            log.warning("metrics_count_failed", error=type(exc).__name__)


async def refresh(db: Database, finished: FinishedCounts) -> None:
    """Set the store gauges (`jobgate_queue_depth`, `jobgate_jobs`) from the store.

    Args:
        db: the store.
        finished: the count of finished jobs kept between scrapes.
    """
    async with db.read() as conn:
        depth = await tasks.depth(conn)
        counts = await _job_counts(conn, active=True)
    counts.update(await finished.get(db))
    # Drop queues that emptied out of the store, then set what is there now.
    QUEUE_DEPTH.clear()
    for queue, n in depth.items():
        QUEUE_DEPTH.labels(queue=queue).set(n)
    JOBS.clear()
    for pipeline in {p for p, _ in counts}:
        for status in JOB_STATUSES:
            JOBS.labels(pipeline=pipeline, status=status).set(counts.get((pipeline, status), 0))


def render() -> bytes:
    """Every metric in the Prometheus text exposition format."""
    return generate_latest(REGISTRY)
