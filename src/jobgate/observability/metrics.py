"""Prometheus metrics, in one module-level registry that `GET /metrics` renders.

Counters and histograms are updated where things happen (the HTTP middleware, the
submit route, the worker); the gauges describe the store and are refreshed from it
when `/metrics` is scraped, so every API process reports the same, true values.
"""

from __future__ import annotations

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
    "refresh",
    "render",
]

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
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


async def refresh(conn: AsyncConnection) -> None:
    """Set the store gauges (`jobgate_queue_depth`, `jobgate_jobs`) from the store.

    Args:
        conn: A read transaction.
    """
    depth = await tasks.depth(conn)
    counts = {
        (pipeline, status): int(n)
        for pipeline, status, n in await conn.execute(
            select(jobs.c.pipeline, jobs.c.status, func.count()).group_by(
                jobs.c.pipeline, jobs.c.status
            )
        )
    }
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
