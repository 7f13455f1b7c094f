"""Liveness, readiness, the authenticated health view, metrics and the access log."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
import structlog
from fastapi import FastAPI
from sqlalchemy import insert, update

from jobgate.api.routes import health
from jobgate.blobs import BlobError
from jobgate.ids import now
from jobgate.observability import metrics
from jobgate.store.tables import jobs, workers
from tests.api.sse import signed_in
from tests.conftest import TCP_SERVICES

AppFactory = Any
MakeClient = Any
ExpectProblem = Any


def state_of(app: FastAPI) -> Any:
    return app.state.jobgate


def worker_row(worker_id: str, last_seen_at: float) -> dict[str, Any]:
    return {
        "id": worker_id,
        "host": "box",
        "pid": 42,
        "queues": ["default"],
        "pipelines": ["steps"],
        "concurrency": 4,
        "running": 1,
        "version": "0.1.0",
        "started_at": last_seen_at - 60,
        "last_seen_at": last_seen_at,
    }


async def test_healthz_answers_without_credentials(anon: httpx.AsyncClient) -> None:
    """`/healthz` is 200 `{"status": "ok"}` and needs no key."""
    response = await anon.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["x-request-id"]


async def test_readyz_reports_every_backend(anon: httpx.AsyncClient) -> None:
    """`/readyz` is 200 with an ok check for store, transport, bus and blobs."""
    response = await anon.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"store", "transport", "bus", "blobs"}
    for check in body["checks"].values():
        assert check["ok"] is True
        assert check["latency_ms"] >= 0
        assert "error" not in check


@pytest.mark.parametrize(
    ("service", "url"),
    [
        pytest.param(
            "rabbitmq",
            "amqp://guest:guest@{addr}/",
            id="rabbitmq",
            marks=pytest.mark.service("rabbitmq"),
        ),
        pytest.param("redis", "redis://{addr}/0", id="redis", marks=pytest.mark.service("redis")),
    ],
)
async def test_readyz_pings_a_broker_transport(
    app_factory: AppFactory, service: str, url: str
) -> None:
    """With RabbitMQ or Redis carrying the tasks, readiness asks that broker: ok while it
    answers, failing (503) while it cannot be reached. (Regression: it said "not
    available", 503, whatever the broker did.)"""
    namespace = f"jgtest{uuid.uuid4().hex[:12]}"
    up = await app_factory(
        transport_url=url.format(addr=TCP_SERVICES[service]), transport_namespace=namespace
    )
    down = await app_factory(
        transport_url=url.format(addr="127.0.0.1:1"), transport_namespace=namespace
    )
    for app, status in ((up, 200), (down, 503)):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            response = await client.get("/readyz")
        assert response.status_code == status, response.text
        check = response.json()["checks"]["transport"]
        assert check["ok"] is (status == 200), check
        if status == 503:
            assert check["error"] in ("TransportError", "timeout after 2 s"), check


async def test_readyz_is_503_when_a_backend_fails(
    app: FastAPI, anon: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing blob store makes `/readyz` 503 `unavailable`, naming the failed check."""

    async def broken() -> float:
        raise BlobError("disk on fire: /secret/path")

    monkeypatch.setattr(state_of(app).blobs, "ping", broken)
    response = await anon.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["blobs"] == {
        "ok": False,
        "latency_ms": body["checks"]["blobs"]["latency_ms"],
        "error": "BlobError",
    }
    assert body["checks"]["store"]["ok"] is True
    assert "secret" not in response.text


async def test_a_check_that_hangs_times_out() -> None:
    """A ping slower than the timeout fails as `timeout`, without waiting for it."""

    async def hang() -> None:
        await asyncio.sleep(10)

    check = await health.run_check(hang, timeout_s=0.05)
    assert check.ok is False
    assert check.error is not None
    assert check.error.startswith("timeout")
    assert check.latency_ms < 1000


async def test_v1_health_needs_credentials(
    anon: httpx.AsyncClient, expect_problem: ExpectProblem
) -> None:
    """`/v1/health` is 401 without a key."""
    expect_problem(await anon.get("/v1/health"), 401, "unauthenticated")


async def test_v1_health_adds_queue_depth_and_live_workers(
    app: FastAPI, make_client: MakeClient
) -> None:
    """`/v1/health` counts workers seen within `worker_lost_after_s`, and the queues."""
    lost_after = state_of(app).settings.worker_lost_after_s
    async with state_of(app).db.write() as conn:
        await conn.execute(
            insert(workers),
            [worker_row("w-live", now()), worker_row("w-lost", now() - lost_after - 5)],
        )
    viewer = await make_client("someone", ["viewer"])
    response = await viewer.get("/v1/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["workers"] == {"live": 1}
    assert body["queue"] == {"depth": {}}
    assert set(body["checks"]) == {"store", "transport", "bus", "blobs"}


async def test_metrics_are_prometheus_text(
    anon: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    """`/metrics` needs no key by default and labels requests by route template."""
    await client.get("/v1/pipelines/steps")
    assert (await client.post("/v1/jobs", json={"pipeline": "noop"})).status_code == 202
    response = await anon.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert (
        'jobgate_http_requests_total{method="GET",route="/v1/pipelines/{name}",status="200"}'
        in text
    )
    assert "jobgate_http_request_duration_seconds_bucket" in text
    assert 'jobgate_jobs{pipeline="noop",status="queued"} 1.0' in text
    assert 'jobgate_jobs{pipeline="noop",status="succeeded"} 0.0' in text
    assert 'jobgate_queue_depth{queue="default"} 1.0' in text
    assert 'jobgate_jobs_submitted_total{pipeline="noop"}' in text
    assert "/v1/pipelines/steps" not in text


async def test_a_scrape_does_not_wait_for_a_slow_count_of_finished_jobs(
    app: FastAPI, anon: httpx.AsyncClient, client: httpx.AsyncClient, monkeypatch: Any
) -> None:
    """Counting finished jobs reads the whole jobs table: a scrape waits half a second
    for it at most and serves the last count meanwhile, while queued jobs and waiting
    tasks are counted at once. (The count is slowed to 3 s here. It used to be part of
    every scrape, inside its 2 s budget, so a big store left every store gauge unset.)"""
    monkeypatch.setattr(metrics, "FINISHED_REFRESH_S", 0.0)
    count = metrics._job_counts

    async def slow_count(conn: Any, *, active: bool) -> metrics.Counts:
        if not active:
            await asyncio.sleep(3.0)
        return await count(conn, active=active)

    monkeypatch.setattr(metrics, "_job_counts", slow_count)
    ids = []
    for _ in range(2):
        response = await client.post("/v1/jobs", json={"pipeline": "noop"})
        assert response.status_code == 202
        ids.append(response.json()["id"])
    async with app.state.jobgate.db.write() as conn:
        await conn.execute(update(jobs).where(jobs.c.id == ids[0]).values(status="succeeded"))

    started = asyncio.get_running_loop().time()
    text = (await anon.get("/metrics")).text
    assert asyncio.get_running_loop().time() - started < 2.0
    assert 'jobgate_jobs{pipeline="noop",status="queued"} 1.0' in text
    assert 'jobgate_queue_depth{queue="default"} 2.0' in text
    assert 'jobgate_jobs{pipeline="noop",status="succeeded"} 0.0' in text  # not counted yet

    counted = 'jobgate_jobs{pipeline="noop",status="succeeded"} 1.0'
    deadline = asyncio.get_running_loop().time() + 15
    while counted not in (await anon.get("/metrics")).text:
        assert asyncio.get_running_loop().time() < deadline, "the count never came"
        await asyncio.sleep(0.5)


async def test_metrics_count_open_event_streams(app: FastAPI, make_key: Any) -> None:
    """`jobgate_sse_streams_open` is the streams open in the process now: one while a
    `/v1/events` stream is held, none once it is closed."""
    _, key = await make_key("user-1", ("user",))

    async def open_streams(client: httpx.AsyncClient) -> float:
        text = (await client.get("/metrics")).text
        line = next(x for x in text.splitlines() if x.startswith("jobgate_sse_streams_open "))
        return float(line.split()[1])

    async with signed_in(app, key) as user:
        assert await open_streams(user) == 0
        async with user.stream("GET", "/v1/events") as stream:
            assert stream.status_code == 200
            assert await open_streams(user) == 1
        deadline = asyncio.get_running_loop().time() + 10
        while await open_streams(user) != 0:
            assert asyncio.get_running_loop().time() < deadline, "the stream stayed counted"
            await asyncio.sleep(0.05)


async def test_unknown_paths_share_one_metric_label(
    anon: httpx.AsyncClient,
) -> None:
    """Unmatched paths are counted under `<unmatched>`, never by their raw path."""
    await anon.get("/no/such/thing-12345")
    text = (await anon.get("/metrics")).text
    assert "thing-12345" not in text
    assert 'route="<unmatched>",status="404"' in text


async def test_metrics_token_is_required_when_set(
    app_factory: AppFactory, expect_problem: ExpectProblem
) -> None:
    """With `metrics_token` set, `/metrics` wants it as a Bearer token."""
    app = await app_factory(metrics_token="scrape-me")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as anon:
        expect_problem(await anon.get("/metrics"), 401, "unauthenticated")
        wrong = await anon.get("/metrics", headers={"Authorization": "Bearer nope"})
        expect_problem(wrong, 401, "unauthenticated")
        right = await anon.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert right.status_code == 200


async def test_one_access_line_per_request_without_the_query(
    anon: httpx.AsyncClient,
) -> None:
    """The access log has method, path, status and duration, never the query string."""
    with structlog.testing.capture_logs() as logs:
        response = await anon.get("/healthz?token=very-secret", headers={"X-Request-ID": "log-me"})
    lines = [entry for entry in logs if entry["event"] == "http_request"]
    assert len(lines) == 1
    line = lines[0]
    assert line["method"] == "GET"
    assert line["path"] == "/healthz"
    assert line["status"] == response.status_code == 200
    assert line["duration_ms"] >= 0
    assert "very-secret" not in repr(logs)
