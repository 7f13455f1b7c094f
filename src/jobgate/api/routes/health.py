"""Liveness, readiness, the authenticated health view and Prometheus metrics.

Key contracts:

- `/healthz` answers while the process runs; it touches no backend.
- `/readyz` pings every backend concurrently, each with `CHECK_TIMEOUT_S`; any
  failure makes it 503 with `status: "unavailable"`. Errors name the failure's kind
  (`timeout`, an exception class), never its message: the route needs no credentials.
- `/metrics` needs no credentials unless `JOBGATE_METRICS_TOKEN` is set; its store
  gauges are refreshed at scrape time, and a store outage leaves the rest scrapeable.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import func, select

from jobgate.api.deps import CurrentPrincipal, StateDep
from jobgate.api.schemas import (
    Check,
    Health,
    Liveness,
    QueueInfo,
    Readiness,
    WorkersInfo,
    problem_responses,
)
from jobgate.api.state import AppState
from jobgate.auth.api_keys import AUTH_FAILED, bearer_token
from jobgate.errors import Unauthenticated
from jobgate.ids import now
from jobgate.observability import metrics
from jobgate.store.repositories import tasks
from jobgate.store.repositories import workers as worker_repo
from jobgate.store.tables import workers

CHECK_TIMEOUT_S = 2.0
router = APIRouter(tags=["health"])
log = structlog.get_logger("jobgate.api")

Ping = Callable[[], Awaitable[Any]]


async def run_check(ping: Ping, timeout_s: float = CHECK_TIMEOUT_S) -> Check:
    """Run one backend's `ping()` under a timeout, and time it."""
    started = time.perf_counter()
    error: str | None = None
    try:
        async with asyncio.timeout(timeout_s):
            await ping()
    except TimeoutError:
        error = f"timeout after {timeout_s:g} s"
    except Exception as exc:  # any failure means "not ready"; the kind is enough
        error = type(exc).__name__
    latency = round((time.perf_counter() - started) * 1000, 2)
    return Check(ok=error is None, latency_ms=latency, error=error)


async def readiness(state: AppState) -> Readiness:
    """Ping the store, the transport, the bus and the blob storage concurrently."""
    pings: dict[str, Ping] = {
        "store": state.db.ping,
        "blobs": state.blobs.ping,
        "bus": state.streams.bus.ping,
    }
    if state.transport is not None:
        pings["transport"] = state.transport.ping
    names = list(pings)
    results = await asyncio.gather(*(run_check(pings[name]) for name in names))
    checks = dict(zip(names, results, strict=True))
    if "transport" not in checks:  # the database transport: the store carries the tasks
        checks["transport"] = checks["store"]
    ordered = {name: checks[name] for name in ("store", "transport", "bus", "blobs")}
    ok = all(check.ok for check in ordered.values())
    return Readiness(status="ok" if ok else "unavailable", checks=ordered)


def _answer(body: Readiness) -> JSONResponse:
    status = 200 if body.status == "ok" else 503
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=status)


@router.get("/healthz", response_model=Liveness)
async def healthz() -> Liveness:
    """The process is running."""
    return Liveness()


@router.get(
    "/readyz",
    response_model=Readiness,
    response_model_exclude_none=True,
    responses={503: {"model": Readiness, "description": "A backend does not answer"}},
)
async def readyz(state: StateDep) -> JSONResponse:
    """Whether the store, transport, bus and blob storage all answer (else 503)."""
    return _answer(await readiness(state))


@router.get(
    "/v1/health",
    response_model=Health,
    response_model_exclude_none=True,
    responses={
        **problem_responses(401),
        503: {"model": Health, "description": "A backend does not answer"},
    },
)
async def health(state: StateDep, principal: CurrentPrincipal) -> JSONResponse:
    """Readiness, plus queue depth per queue and the number of live workers."""
    del principal
    ready = await readiness(state)
    depth: dict[str, int] = {}
    live = 0
    if ready.checks["store"].ok:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S), state.db.read() as conn:
                depth = await tasks.depth(conn)
                alive = worker_repo.is_live(
                    dialect=state.db.dialect,
                    at=now(),
                    lost_after_s=state.settings.worker_lost_after_s,
                    heartbeat_s=state.settings.worker_heartbeat_s,
                )
                live = int(
                    await conn.scalar(select(func.count()).select_from(workers).where(alive)) or 0
                )
        except Exception as exc:  # the checks already say whether the store is fine
            log.warning("health_query_failed", error=type(exc).__name__)
    body = Health(
        status=ready.status,
        checks=ready.checks,
        queue=QueueInfo(depth=depth),
        workers=WorkersInfo(live=live),
    )
    return _answer(body)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
        **problem_responses(401),
    },
)
async def prometheus_metrics(request: Request, state: StateDep) -> Response:
    """Every metric in Prometheus text format (Bearer `JOBGATE_METRICS_TOKEN` if set)."""
    expected = state.settings.metrics_token
    if expected and not hmac.compare_digest(bearer_token(request).encode(), expected.encode()):
        raise Unauthenticated(AUTH_FAILED)
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await metrics.refresh(state.db, state.finished_jobs)
    except Exception as exc:  # serve the process's own metrics even if the store is down
        log.warning("metrics_refresh_failed", error=type(exc).__name__)
    metrics.SSE_STREAMS.set(state.streams.open_streams)
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)
