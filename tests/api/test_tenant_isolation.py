"""Tenant isolation: a second user walks every route of the OpenAPI schema at the
first user's resources, and nothing of the first user's leaks or changes.

The walk is driven by `/openapi.json`, and the test fails when the schema holds a
route the walk does not know: a new route cannot be added without saying here how
it is attacked. A control walk as an admin proves the requests really name the
victim's resources (an admin sees them), so a 404 is isolation, not a typo.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI

from tests.api.conftest import AppFactory
from tests.api.helpers import client_for, multipart
from tests.api.sse import stream_briefly

VICTIM = "tenant-a"
INTRUDER = "tenant-b"
MARKER = "marker-a-7781"
VICTIM_FILE = b"the plan of tenant a\n" + MARKER.encode() + b"\n"
VICTIM_UPLOAD = b"an upload tenant a kept for later\n"
SHARED_IDEMPOTENCY_KEY = "order-1"
TERMINAL = {"succeeded", "failed", "cancelled"}
VICTIM_HOOK = f"http://127.0.0.1:9/{MARKER}"  # nothing listens: its attempts just fail


@dataclass
class Victim:
    """What tenant A owns: jobs in every state, a blob, an API key, an idempotency key."""

    done_job: str  # text-stats, succeeded: records, artifacts, events
    failed_job: str  # retryable
    running_job: str  # cancellable
    replayable_job: str  # created with SHARED_IDEMPOTENCY_KEY
    blob: str  # uploaded through POST /v1/files
    key_id: str
    key: str
    artifacts: set[str]  # the done job's artifact hashes
    delivery: str  # the failed job's webhook delivery
    webhook_secret: str

    def secrets(self) -> set[str]:
        """Strings that must never appear in an answer to another tenant."""
        return {
            self.done_job,
            self.failed_job,
            self.running_job,
            self.replayable_job,
            self.blob,
            hashlib.sha256(VICTIM_FILE).hexdigest(),
            self.key_id,
            self.key[:12],
            *self.artifacts,
            self.delivery,
            self.webhook_secret,
            VICTIM,
            MARKER,
            "secret-plan.txt",
        }


async def _wait_for(client: httpx.AsyncClient, job_id: str, statuses: set[str]) -> None:
    for _ in range(400):
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] in statuses:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job['status']}")


async def _victim(victim: httpx.AsyncClient) -> Victim:
    body, headers = multipart(
        {"pipeline": "text-stats", "params": '{"top": 3}'},
        [("secret-plan.txt", VICTIM_FILE)],
    )
    done = (await victim.post("/v1/jobs", content=body, headers=headers)).json()["id"]
    failed = (
        await victim.post(
            "/v1/jobs",
            json={
                "pipeline": "steps",
                "params": {"steps": 1, "step_ms": 0, "fail_at": 1},
                "webhook": {"url": VICTIM_HOOK, "events": ["error"]},
            },
        )
    ).json()["id"]
    running = (
        await victim.post(
            "/v1/jobs", json={"pipeline": "steps", "params": {"steps": 10000, "step_ms": 50}}
        )
    ).json()["id"]
    replayable = (
        await victim.post(
            "/v1/jobs",
            json={"pipeline": "noop", "params": {"m": MARKER}},
            headers={"Idempotency-Key": SHARED_IDEMPOTENCY_KEY},
        )
    ).json()["id"]
    uploaded = await victim.post(
        "/v1/files", files=[("files", ("kept.txt", VICTIM_UPLOAD, "text/plain"))]
    )
    created = (await victim.post("/v1/api-keys", json={"name": MARKER})).json()
    await _wait_for(victim, done, {"succeeded"})
    await _wait_for(victim, failed, {"failed"})
    await _wait_for(victim, running, {"running"})
    artifacts = (await victim.get(f"/v1/jobs/{done}/artifacts")).json()["artifacts"]
    deliveries = (await victim.get(f"/v1/jobs/{failed}/webhooks")).json()["deliveries"]
    return Victim(
        delivery=deliveries[0]["id"],
        webhook_secret=(await victim.get("/v1/webhooks/secret")).json()["key"],
        artifacts={a["sha256"] for a in artifacts},
        done_job=done,
        failed_job=failed,
        running_job=running,
        replayable_job=replayable,
        blob=uploaded.json()["files"][0]["sha256"],
        key_id=created["id"],
        key=created["key"],
    )


Call = Callable[[httpx.AsyncClient, Victim], Awaitable[httpx.Response]]


def _get(path: str) -> Call:
    async def call(client: httpx.AsyncClient, v: Victim) -> httpx.Response:
        return await client.get(path.format(v=v))

    return call


def _post(path: str, **kwargs: Any) -> Call:
    async def call(client: httpx.AsyncClient, v: Victim) -> httpx.Response:
        return await client.post(path.format(v=v), **kwargs)

    return call


async def _submit_with_victims_file(client: httpx.AsyncClient, v: Victim) -> httpx.Response:
    return await client.post("/v1/jobs", json={"pipeline": "text-stats", "files": [v.blob]})


async def _batch_with_victims_file(client: httpx.AsyncClient, v: Victim) -> httpx.Response:
    jobs = [{"pipeline": "noop"}, {"pipeline": "text-stats", "files": [v.blob]}]
    return await client.post("/v1/jobs/batch", json={"jobs": jobs})


async def _status_of_victims_jobs(client: httpx.AsyncClient, v: Victim) -> httpx.Response:
    return await client.post("/v1/jobs/status", json={"ids": [v.done_job, v.running_job]})


async def _list_as_victim(client: httpx.AsyncClient, v: Victim) -> httpx.Response:
    return await client.get("/v1/jobs", params={"owner": VICTIM, "limit": 50})


async def _list(client: httpx.AsyncClient, v: Victim) -> httpx.Response:
    return await client.get("/v1/jobs", params={"limit": 50})


async def _delete_victims_key(client: httpx.AsyncClient, v: Victim) -> httpx.Response:
    return await client.delete(f"/v1/api-keys/{v.key_id}")


async def _victims_blob_unsigned(client: httpx.AsyncClient, v: Victim) -> httpx.Response:
    return await client.get(f"/v1/blobs/{v.blob}")


async def _all_events_from_the_start(client: httpx.AsyncClient, v: Victim) -> httpx.Response:
    headers = {"Accept": "text/event-stream", "Last-Event-ID": "0"}
    return await stream_briefly(client, "/v1/events", headers=headers)


async def _stream_of_victims_job(client: httpx.AsyncClient, v: Victim) -> httpx.Response:
    headers = {"Accept": "text/event-stream"}
    return await stream_briefly(client, f"/v1/jobs/{v.running_job}/events", headers=headers)


async def _upload(client: httpx.AsyncClient, v: Victim) -> httpx.Response:
    return await client.post("/v1/files", files=[("files", ("mine.txt", b"b's own\n"))])


# Every operation of the schema: how the intruder attacks it, and the status it must get.
# None: any status, but the body must not leak (public or the intruder's own things).
WALK: dict[tuple[str, str], tuple[Call, int | None]] = {
    ("GET", "/healthz"): (_get("/healthz"), None),
    ("GET", "/readyz"): (_get("/readyz"), None),
    ("GET", "/v1/health"): (_get("/v1/health"), None),
    ("GET", "/metrics"): (_get("/metrics"), None),
    ("GET", "/v1/pipelines"): (_get("/v1/pipelines"), None),
    ("GET", "/v1/pipelines/{name}"): (_get("/v1/pipelines/text-stats"), None),
    ("POST", "/v1/jobs"): (_submit_with_victims_file, 404),
    ("GET", "/v1/jobs"): (_list, 200),
    ("POST", "/v1/jobs/batch"): (_batch_with_victims_file, 404),
    ("POST", "/v1/jobs/status"): (_status_of_victims_jobs, 200),
    ("GET", "/v1/jobs/{job_id}"): (_get("/v1/jobs/{v.done_job}"), 404),
    ("POST", "/v1/jobs/{job_id}/cancel"): (_post("/v1/jobs/{v.running_job}/cancel"), 404),
    ("POST", "/v1/jobs/{job_id}/retry"): (_post("/v1/jobs/{v.failed_job}/retry"), 404),
    ("GET", "/v1/jobs/{job_id}/records"): (_get("/v1/jobs/{v.done_job}/records"), 404),
    ("GET", "/v1/jobs/{job_id}/events"): (_get("/v1/jobs/{v.done_job}/events"), 404),
    ("POST", "/v1/jobs/{job_id}/events/token"): (
        _post("/v1/jobs/{v.running_job}/events/token"),
        404,
    ),
    ("GET", "/v1/events"): (_all_events_from_the_start, 200),
    ("POST", "/v1/files"): (_upload, 201),
    ("GET", "/v1/jobs/{job_id}/artifacts"): (_get("/v1/jobs/{v.done_job}/artifacts"), 404),
    ("GET", "/v1/jobs/{job_id}/artifacts/{name}"): (
        _get("/v1/jobs/{v.done_job}/artifacts/report.json"),
        404,
    ),
    ("GET", "/v1/jobs/{job_id}/download"): (_get("/v1/jobs/{v.done_job}/download"), 404),
    ("GET", "/v1/blobs/{sha256}"): (_victims_blob_unsigned, 403),
    ("GET", "/v1/me"): (_get("/v1/me"), 200),
    ("GET", "/v1/workers"): (_get("/v1/workers"), 403),
    ("GET", "/v1/api-keys"): (_get("/v1/api-keys"), 200),
    ("POST", "/v1/api-keys"): (_post("/v1/api-keys", json={"name": "b"}), 201),
    ("DELETE", "/v1/api-keys/{key_id}"): (_delete_victims_key, 404),
    ("GET", "/v1/webhooks/secret"): (_get("/v1/webhooks/secret"), 200),
    ("POST", "/v1/webhooks/secret/rotate"): (_post("/v1/webhooks/secret/rotate"), 200),
    ("GET", "/v1/jobs/{job_id}/webhooks"): (_get("/v1/jobs/{v.failed_job}/webhooks"), 404),
    ("POST", "/v1/jobs/{job_id}/webhooks/{delivery_id}/redeliver"): (
        _post("/v1/jobs/{v.failed_job}/webhooks/{v.delivery}/redeliver"),
        404,
    ),
}

# More attacks on routes already walked: (operation, call, status).
EXTRA: list[tuple[tuple[str, str], Call, int]] = [
    (("GET", "/v1/jobs"), _list_as_victim, 403),
    (("GET", "/v1/jobs/{job_id}"), _get("/v1/jobs/{v.running_job}"), 404),
    (("GET", "/v1/jobs/{job_id}/events"), _get("/v1/jobs/{v.running_job}/events"), 404),
    (("GET", "/v1/jobs/{job_id}/events"), _stream_of_victims_job, 404),
    (("POST", "/v1/jobs/{job_id}/cancel"), _post("/v1/jobs/{v.failed_job}/cancel"), 404),
    (("POST", "/v1/jobs/{job_id}/retry"), _post("/v1/jobs/{v.done_job}/retry"), 404),
    (("GET", "/v1/jobs/{job_id}/artifacts/{name}"), _get("/v1/jobs/{v.done_job}/artifacts/x"), 404),
]

# Routes whose answer to an admin must show the victim's resource (the control walk).
CONTROL = {
    ("GET", "/v1/jobs/{job_id}"): 200,
    ("GET", "/v1/jobs/{job_id}/records"): 200,
    ("GET", "/v1/jobs/{job_id}/events"): 200,
    ("GET", "/v1/events"): 200,
    ("GET", "/v1/jobs/{job_id}/artifacts"): 200,
    ("GET", "/v1/jobs/{job_id}/artifacts/{name}"): 200,
    ("GET", "/v1/jobs/{job_id}/download"): 200,
    ("POST", "/v1/jobs/status"): 200,
    ("GET", "/v1/jobs"): 200,
    ("GET", "/v1/api-keys"): 200,
    ("GET", "/v1/jobs/{job_id}/webhooks"): 200,
    ("POST", "/v1/jobs/{job_id}/webhooks/{delivery_id}/redeliver"): 202,
}


def _leaked(secrets: set[str], response: httpx.Response) -> set[str]:
    """The victim's strings in an answer, but for those the request itself named."""
    sent = str(response.request.url) + response.request.read().decode(errors="replace")
    seen = response.text + str(response.headers)
    return {s for s in secrets if s in seen and s not in sent}


def _operations(app: FastAPI) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in app.openapi()["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    }


async def test_no_route_leaks_another_tenants_resources(app_factory: AppFactory) -> None:
    """Tenant B, on every route of the schema, neither sees nor changes tenant A's things."""
    # Loopback webhooks allowed: the victim's failed job has one (to a closed port).
    app = await app_factory(worker_concurrency=2, webhook_allow_private=True)
    assert _operations(app) == set(WALK), "a route was added or removed: extend WALK"
    async with (
        await client_for(app, VICTIM, ("user",)) as victim,
        await client_for(app, INTRUDER, ("user",)) as intruder,
        await client_for(app, "admin-9", ("admin",)) as admin,
    ):
        v = await _victim(victim)
        secrets = v.secrets()
        attacks = [(op, call, status) for op, (call, status) in sorted(WALK.items())] + EXTRA
        for (method, path), call, status in attacks:
            response = await call(intruder, v)
            if status is not None:
                assert response.status_code == status, (method, path, response.text)
            leaked = _leaked(secrets, response)
            assert not leaked, (method, path, leaked)

        for operation, status in CONTROL.items():
            response = await WALK[operation][0](admin, v)
            assert response.status_code == status, (operation, response.text)
            assert {s for s in secrets if s in response.text}, operation

        # Nothing the intruder did changed the victim's jobs or key.
        for job_id, expected in (
            (v.done_job, "succeeded"),
            (v.failed_job, "failed"),
            (v.running_job, "running"),
        ):
            job = (await victim.get(f"/v1/jobs/{job_id}")).json()
            assert (job["status"], job["cancel_requested"]) == (expected, False)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://test",
            headers={"Authorization": f"Bearer {v.key}"},
        ) as with_victims_new_key:
            assert (await with_victims_new_key.get("/v1/me")).json()["id"] == VICTIM
        secret = (await victim.get("/v1/webhooks/secret")).json()["key"]
        assert secret == v.webhook_secret
        await victim.post(f"/v1/jobs/{v.running_job}/cancel")
        await _wait_for(victim, v.running_job, TERMINAL)


async def test_an_idempotency_key_never_replays_another_tenants_job(
    app_factory: AppFactory,
) -> None:
    """The same Idempotency-Key and body from another owner creates that owner's own job."""
    app = await app_factory()
    body = {"pipeline": "noop", "params": {"m": MARKER}}
    headers = {"Idempotency-Key": SHARED_IDEMPOTENCY_KEY}
    async with (
        await client_for(app, VICTIM, ("user",)) as victim,
        await client_for(app, INTRUDER, ("user",)) as intruder,
    ):
        first = await victim.post("/v1/jobs", json=body, headers=headers)
        other = await intruder.post("/v1/jobs", json=body, headers=headers)
        again = await intruder.post("/v1/jobs", json=body, headers=headers)
    assert (first.status_code, other.status_code, again.status_code) == (202, 202, 200)
    assert other.json()["id"] != first.json()["id"]
    assert other.json()["owner"] == INTRUDER
    assert again.json()["id"] == other.json()["id"]
