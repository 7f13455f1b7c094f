"""Signed webhooks: durable deliveries, the sender, signatures, SSRF rules, the log.

Receivers are real HTTP servers on loopback (`webhook_receiver.py`), so every test
sets `webhook_allow_private=True` or an allowlist. Tests that drive retries build a
sender of their own on a clock they move (`send_due()`, no background loop) while the
app's sender is off (`webhook_concurrency=0`); the others use the app's own sender.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from fastapi import FastAPI
from sqlalchemy import select

from jobgate.api.models import WebhookDelivery, WebhookDeliveryList
from jobgate.config import Settings
from jobgate.ids import now, parse_rfc3339
from jobgate.store import Database
from jobgate.store.tables import webhook_deliveries
from jobgate.webhooks import WebhookSender
from tests.api.conftest import AppFactory, state_of
from tests.api.helpers import client_for
from tests.api.webhook_receiver import Clock, Receiver, verify

ROOT = Path(__file__).resolve().parents[2]
PRIVATE_OK = {"webhook_allow_private": True}
ALL_EVENTS = ["completed", "error", "cancelled"]

MakeSender = Callable[..., WebhookSender]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as started:
        yield started


@pytest.fixture
async def make_sender() -> AsyncIterator[MakeSender]:
    """Senders of the tests' own (not started) on an app's store, closed at the end.
    `clock`, `jitter`, `resolver` and `transport` go to the sender, the rest to its
    settings (loopback allowed, a 2 s timeout, unless given)."""
    made: list[WebhookSender] = []

    def make(app: FastAPI, **options: Any) -> WebhookSender:
        state = state_of(app)
        parts = {
            k: options.pop(k) for k in ("clock", "jitter", "resolver", "transport") if k in options
        }
        settings = Settings(
            database_url=state.settings.database_url,
            **{"webhook_allow_private": True, "webhook_timeout_s": 2.0, **options},
        )
        sender = WebhookSender(state.db, settings, **parts)
        made.append(sender)
        return sender

    yield make
    for sender in made:
        await sender.aclose()


# The senders' clock starts this far ahead of the requests that make deliveries due, so
# that they are due however slowly those requests run on a loaded machine.
SENDER_AHEAD_S = 60.0


async def _webhook_job(
    client: httpx.AsyncClient,
    url: str,
    *,
    events: list[str] | None = None,
    pipeline: str = "steps",
    params: dict[str, Any] | None = None,
) -> str:
    webhook: dict[str, Any] = {"url": url}
    if events is not None:
        webhook["events"] = events
    response = await client.post(
        "/v1/jobs", json={"pipeline": pipeline, "params": params or {}, "webhook": webhook}
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def _cancelled_job(client: httpx.AsyncClient, url: str, **kwargs: Any) -> str:
    """A queued job (no worker runs it) with a webhook, cancelled at once: one delivery."""
    job_id = await _webhook_job(client, url, **kwargs)
    assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
    return job_id


async def _rows(app: FastAPI, job_id: str | None = None) -> list[dict[str, Any]]:
    query = select(webhook_deliveries).order_by(webhook_deliveries.c.created_at)
    if job_id is not None:
        query = query.where(webhook_deliveries.c.job_id == job_id)
    async with state_of(app).db.read() as conn:
        return [dict(row) for row in (await conn.execute(query)).mappings()]


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Poll `check` until it holds; fail after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def _wait_status(client: httpx.AsyncClient, job_id: str, statuses: set[str]) -> None:
    async def reached() -> bool:
        return (await client.get(f"/v1/jobs/{job_id}")).json()["status"] in statuses

    await _eventually(reached)


# -- the whole path: terminal events, the app's sender, signatures -----------------------


async def test_each_terminal_event_sends_one_signed_delivery(
    app_factory: AppFactory, receiver: Receiver
) -> None:
    """Completed, failed and cancelled jobs each send exactly one delivery, signed with
    the owner's secret, whose body is the event and the job as GET shows it; an event
    the webhook did not ask for sends nothing."""
    app = await app_factory(worker_concurrency=2, **PRIVATE_OK)
    async with await client_for(app, "hooked") as client:
        done = await _webhook_job(client, receiver.url, pipeline="noop", params={"x": 1})
        failed = await _webhook_job(
            client, receiver.url, params={"steps": 1, "step_ms": 0, "fail_at": 1}
        )
        running = await _webhook_job(client, receiver.url, params={"steps": 10000, "step_ms": 20})
        unasked = await _webhook_job(client, receiver.url, pipeline="noop", events=["error"])
        await _wait_status(client, running, {"running"})
        # 202 while a stage runs; 200 if caught between two stages.
        assert (await client.post(f"/v1/jobs/{running}/cancel")).status_code in (200, 202)

        with structlog.testing.capture_logs() as logs:
            received = await receiver.wait_for(3)
            for job_id in (done, failed, running, unasked):
                await _wait_status(client, job_id, {"succeeded", "failed", "cancelled"})

            async def all_recorded() -> bool:
                rows = await _rows(app)
                return len(rows) == 3 and all(r["status"] == "succeeded" for r in rows)

            await _eventually(all_recorded)
        secret = (await client.get("/v1/webhooks/secret")).json()["key"]
        by_id = {r.headers["webhook-id"]: r for r in received}
        assert len(receiver.requests) == 3
        assert len(by_id) == 3
        for job_id, event in ((done, "completed"), (failed, "error"), (running, "cancelled")):
            log = (await client.get(f"/v1/jobs/{job_id}/webhooks")).json()["deliveries"]
            assert [(d["event"], d["status"], d["attempts"]) for d in log] == [
                (event, "succeeded", 1)
            ]
            request = by_id[log[0]["id"]]
            assert (request.method, request.path) == ("POST", "/hooks")
            assert request.headers["content-type"] == "application/json"
            assert request.headers["user-agent"].startswith("jobgate-webhooks/")
            assert verify(secret, request.headers, request.body) == [0]
            assert abs(int(request.headers["webhook-timestamp"]) - now()) < 60
            payload = json.loads(request.body)
            assert payload["type"] == event
            assert abs(parse_rfc3339(payload["timestamp"]) - now()) < 60
            assert payload["data"]["job"] == (await client.get(f"/v1/jobs/{job_id}")).json()
        assert (await client.get(f"/v1/jobs/{unasked}/webhooks")).json() == {"deliveries": []}
    assert secret.removeprefix("whsec_") not in repr(logs)


async def test_an_event_left_out_of_events_queues_nothing(
    app_factory: AppFactory, make_sender: MakeSender, receiver: Receiver
) -> None:
    """A job cancelled whose webhook asks only for `completed` has no delivery."""
    app = await app_factory(webhook_concurrency=0, **PRIVATE_OK)
    async with await client_for(app) as client:
        job_id = await _cancelled_job(client, receiver.url, events=["completed", "error"])
    assert await _rows(app, job_id) == []
    assert await make_sender(app).send_due() == 0
    assert receiver.requests == []


# -- signing secrets -----------------------------------------------------------------


async def test_each_owner_has_one_stable_secret(app_factory: AppFactory) -> None:
    """`GET /v1/webhooks/secret` makes the caller's secret once (whsec_, 32 random
    bytes) and then always shows it; owners have their own; viewers may not read it."""
    app = await app_factory(webhook_concurrency=0)
    async with (
        await client_for(app, "owner-a") as a,
        await client_for(app, "owner-b") as b,
        await client_for(app, "owner-a", ("viewer",)) as viewer,
    ):
        first = (await a.get("/v1/webhooks/secret")).json()["key"]
        again = (await a.get("/v1/webhooks/secret")).json()["key"]
        other = (await b.get("/v1/webhooks/secret")).json()["key"]
        refused = await viewer.get("/v1/webhooks/secret")
    assert first == again != other
    assert first.startswith("whsec_")
    assert len(base64.b64decode(first[6:])) == 32
    assert refused.status_code == 403


async def test_rotation_signs_with_both_secrets_for_a_day(
    app_factory: AppFactory, make_sender: MakeSender, receiver: Receiver
) -> None:
    """After a rotation deliveries carry two signatures, one verifying with the old
    secret and one with the new; 24 h later only the new one signs."""
    app = await app_factory(webhook_concurrency=0, **PRIVATE_OK)
    clock = Clock(now() + SENDER_AHEAD_S)
    sender = make_sender(app, clock=clock)
    async with await client_for(app) as client:
        old = (await client.get("/v1/webhooks/secret")).json()["key"]
        rotated = await client.post("/v1/webhooks/secret/rotate")
        new = rotated.json()["key"]
        assert rotated.status_code == 200
        assert new != old
        assert (await client.get("/v1/webhooks/secret")).json()["key"] == new
        job_id = await _cancelled_job(client, receiver.url)

        assert await sender.send_due() == 1
        (during,) = await receiver.wait_for(1)
        assert len(during.headers["webhook-signature"].split(" ")) == 2
        assert verify(new, during.headers, during.body) == [0]
        assert verify(old, during.headers, during.body) == [1]

        clock.advance(86_400 + 1)
        (delivery,) = (await client.get(f"/v1/jobs/{job_id}/webhooks")).json()["deliveries"]
        redelivered = await client.post(f"/v1/jobs/{job_id}/webhooks/{delivery['id']}/redeliver")
        assert redelivered.status_code == 202
        assert await sender.send_due() == 1
        after = (await receiver.wait_for(2))[1]
    assert after.headers["webhook-id"] == during.headers["webhook-id"]
    assert after.body == during.body
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    assert verify(new, after.headers, after.body) == [0]
    assert verify(old, after.headers, after.body) == []


async def test_a_second_rotation_ends_the_first_overlap(
    app_factory: AppFactory, make_sender: MakeSender, receiver: Receiver
) -> None:
    """Two rotations in a day: the newest secret and the one it replaced sign; the
    first is dropped, so a delivery never carries more than two signatures."""
    app = await app_factory(webhook_concurrency=0, **PRIVATE_OK)
    async with await client_for(app) as client:
        first = (await client.get("/v1/webhooks/secret")).json()["key"]
        second = (await client.post("/v1/webhooks/secret/rotate")).json()["key"]
        third = (await client.post("/v1/webhooks/secret/rotate")).json()["key"]
        await _cancelled_job(client, receiver.url)
    assert await make_sender(app).send_due() == 1
    (request,) = await receiver.wait_for(1)
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert verify(third, request.headers, request.body) == [0]
    assert verify(second, request.headers, request.body) == [1]
    assert verify(first, request.headers, request.body) == []


# -- retries, timeouts, redirects ------------------------------------------------------


async def test_failed_attempts_are_retried_with_growing_delays_until_one_succeeds(
    app_factory: AppFactory, make_sender: MakeSender, receiver: Receiver
) -> None:
    """A reset, a 500 and a stalled answer (timed out) are each retried, after 1, 2
    and 4 s (base 1 s, jitter at its top); the fourth attempt succeeds. Every attempt
    sends the same body under the same webhook-id."""
    app = await app_factory(webhook_concurrency=0, **PRIVATE_OK)
    clock = Clock(now() + SENDER_AHEAD_S)
    sender = make_sender(
        app,
        clock=clock,
        jitter=lambda: 1.0,
        webhook_timeout_s=0.5,
        webhook_retry_base_s=1.0,
        webhook_retry_max_s=100.0,
    )
    receiver.plan("reset", 500, "stall", "ok")
    async with await client_for(app) as client:
        job_id = await _cancelled_job(client, receiver.url)
    outcomes = []
    for expected_delay in (1.0, 2.0, 4.0):
        assert await sender.send_due() == 1
        (row,) = await _rows(app, job_id)
        outcomes.append((row["status"], row["attempts"], row["last_status_code"]))
        assert row["next_attempt_at"] - clock() == pytest.approx(expected_delay)
        clock.advance(expected_delay - 0.01)
        assert await sender.send_due() == 0, "sent again before its delay"
        clock.advance(0.01)
    assert await sender.send_due() == 1
    (row,) = await _rows(app, job_id)

    assert outcomes == [("pending", 1, None), ("pending", 2, 500), ("pending", 3, None)]
    assert (row["status"], row["attempts"], row["last_status_code"]) == ("succeeded", 4, 200)
    assert row["last_error"] is None
    assert row["delivered_at"] == clock()
    requests = receiver.requests
    assert [r.answered for r in requests] == ["reset", 500, "stall", "ok"]
    assert len({r.headers["webhook-id"] for r in requests}) == 1
    assert len({r.body for r in requests}) == 1


async def test_a_stalled_receiver_times_out(
    app_factory: AppFactory, make_sender: MakeSender, receiver: Receiver
) -> None:
    """An attempt that gets no answer ends at the timeout and is recorded as such."""
    app = await app_factory(webhook_concurrency=0, **PRIVATE_OK)
    sender = make_sender(app, webhook_timeout_s=0.3)
    receiver.plan("stall")
    async with await client_for(app) as client:
        job_id = await _cancelled_job(client, receiver.url)
        async with asyncio.timeout(5):
            assert await sender.send_due() == 1
        (delivery,) = (await client.get(f"/v1/jobs/{job_id}/webhooks")).json()["deliveries"]
    assert delivery["status"] == "pending"
    assert delivery["last_error"] == "timed out after 0.3 s"
    assert delivery["next_attempt_at"] is not None


async def test_a_delivery_is_dead_after_its_attempts_and_redelivery_goes_on_counting(
    app_factory: AppFactory, make_sender: MakeSender, receiver: Receiver
) -> None:
    """Max attempts failed: dead, never claimed again; a redelivery sends it once more
    (same id), its attempts counting on from there."""
    app = await app_factory(webhook_concurrency=0, **PRIVATE_OK)
    clock = Clock(now() + SENDER_AHEAD_S)
    sender = make_sender(app, clock=clock, webhook_max_attempts=3)
    receiver.plan(500, 503, 502)
    async with await client_for(app) as client:
        job_id = await _cancelled_job(client, receiver.url)
        for _ in range(3):
            assert await sender.send_due() == 1
            clock.advance(10_000)
        assert await sender.send_due() == 0
        (dead,) = (await client.get(f"/v1/jobs/{job_id}/webhooks")).json()["deliveries"]
        assert (dead["status"], dead["attempts"], dead["last_status_code"]) == ("dead", 3, 502)
        assert dead["next_attempt_at"] is None

        again = await client.post(f"/v1/jobs/{job_id}/webhooks/{dead['id']}/redeliver")
        assert again.status_code == 202
        assert again.json()["id"] == dead["id"]
        assert again.json()["status"] == "pending"
        WebhookDelivery.model_validate(again.json())
        assert await sender.send_due() == 1
        log = (await client.get(f"/v1/jobs/{job_id}/webhooks")).json()
    WebhookDeliveryList.model_validate(log)
    (done,) = log["deliveries"]
    assert (done["id"], done["status"], done["attempts"]) == (dead["id"], "succeeded", 4)
    assert done["delivered_at"] is not None
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1


async def test_a_gone_endpoint_is_not_retried(
    app_factory: AppFactory, make_sender: MakeSender, receiver: Receiver
) -> None:
    """410 Gone fails the delivery at once."""
    app = await app_factory(webhook_concurrency=0, **PRIVATE_OK)
    clock = Clock(now() + SENDER_AHEAD_S)
    sender = make_sender(app, clock=clock)
    receiver.plan(410)
    async with await client_for(app) as client:
        job_id = await _cancelled_job(client, receiver.url)
    assert await sender.send_due() == 1
    clock.advance(1e6)
    assert await sender.send_due() == 0
    (row,) = await _rows(app, job_id)
    assert (row["status"], row["attempts"], row["last_status_code"]) == ("failed", 1, 410)


async def test_redirects_are_never_followed(
    app_factory: AppFactory, make_sender: MakeSender, receiver: Receiver
) -> None:
    """A 302 is a failed attempt; the place it points to is never contacted."""
    app = await app_factory(webhook_concurrency=0, **PRIVATE_OK)
    sender = make_sender(app)
    async with Receiver() as target, await client_for(app) as client:
        receiver.plan(("redirect", target.url))
        job_id = await _cancelled_job(client, receiver.url)
        assert await sender.send_due() == 1
        assert target.requests == []
    (row,) = await _rows(app, job_id)
    assert (row["status"], row["last_status_code"]) == ("pending", 302)
    assert "redirects are not followed" in row["last_error"]
    assert len(receiver.requests) == 1


# -- SSRF at delivery ------------------------------------------------------------------


async def test_a_name_resolving_to_loopback_is_refused_at_delivery(
    app_factory: AppFactory, make_sender: MakeSender, receiver: Receiver
) -> None:
    """`localhost` (127.0.0.1 by the system resolver) is refused by a sender without
    allow_private: failed, with the reason, never retried, nothing sent. A sender whose
    allowlist names the host delivers it after a redelivery."""
    # The app accepts the URL (its own settings allow private targets); senders decide.
    app = await app_factory(webhook_concurrency=0, **PRIVATE_OK)
    clock = Clock(now() + SENDER_AHEAD_S)
    strict = make_sender(app, clock=clock, webhook_allow_private=False)
    url = receiver.url.replace("127.0.0.1", "localhost")
    async with await client_for(app) as client:
        job_id = await _cancelled_job(client, url)
        assert await strict.send_due() == 1
        clock.advance(1e6)
        assert await strict.send_due() == 0
        (refused,) = (await client.get(f"/v1/jobs/{job_id}/webhooks")).json()["deliveries"]
        assert receiver.requests == []
        assert (refused["status"], refused["attempts"]) == ("failed", 1)
        assert "localhost resolves to 127.0.0.1, a loopback address" in refused["last_error"]

        allowing = make_sender(app, webhook_allow_private=False, webhook_allowlist="localhost")
        await client.post(f"/v1/jobs/{job_id}/webhooks/{refused['id']}/redeliver")
        assert await allowing.send_due() == 1
        (request,) = await receiver.wait_for(1)
    assert request.headers["host"] == f"localhost:{receiver.port}"
    assert (await _rows(app, job_id))[0]["status"] == "succeeded"


@pytest.mark.parametrize(
    ("addresses", "reason"),
    [
        (["93.184.216.34", "10.0.0.7"], "resolves to 10.0.0.7, a private address"),
        (["::ffff:127.0.0.1"], "resolves to ::ffff:7f00:1, a loopback address"),
        (["169.254.169.254"], "resolves to 169.254.169.254, a cloud metadata address"),
    ],
    ids=["any-address", "ipv4-mapped", "metadata"],
)
async def test_every_resolved_address_is_checked(
    app_factory: AppFactory, make_sender: MakeSender, addresses: list[str], reason: str
) -> None:
    """One refused address among those a name resolves to refuses the target."""
    app = await app_factory(webhook_concurrency=0)
    sent: list[httpx.Request] = []

    async def resolver(host: str, port: int) -> list[str]:
        return addresses

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    sender = make_sender(
        app,
        webhook_allow_private=False,
        resolver=resolver,
        transport=httpx.MockTransport(handler),
    )
    async with await client_for(app) as client:
        job_id = await _cancelled_job(client, "https://hooks.example.com/x")
    assert await sender.send_due() == 1
    (row,) = await _rows(app, job_id)
    assert sent == []
    assert row["status"] == "failed"
    assert row["last_error"] == f"refused: hooks.example.com {reason}"


async def test_the_connection_goes_to_the_checked_address(
    app_factory: AppFactory, make_sender: MakeSender
) -> None:
    """The request goes to the address that was checked, with the original Host and
    TLS server name; a name that rebinds to loopback later is refused at that attempt."""
    app = await app_factory(webhook_concurrency=0)
    answers = [["93.184.216.34"], ["127.0.0.1"]]
    asked: list[str] = []
    sent: list[httpx.Request] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append(f"{host}:{port}")
        return answers.pop(0)

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    clock = Clock(now() + SENDER_AHEAD_S)
    sender = make_sender(
        app,
        clock=clock,
        webhook_allow_private=False,
        resolver=resolver,
        transport=httpx.MockTransport(handler),
    )
    async with await client_for(app) as client:
        job_id = await _cancelled_job(client, "https://hooks.example.com:8443/in")
    assert await sender.send_due() == 1
    (request,) = sent
    assert str(request.url) == "https://93.184.216.34:8443/in"
    assert request.headers["host"] == "hooks.example.com:8443"
    assert request.extensions["sni_hostname"] == "hooks.example.com"

    clock.advance(1e6)
    assert await sender.send_due() == 1
    assert asked == ["hooks.example.com:8443", "hooks.example.com:8443"]
    assert len(sent) == 1
    (row,) = await _rows(app, job_id)
    assert row["status"] == "failed"
    assert "127.0.0.1, a loopback address" in row["last_error"]


async def test_an_allowlisted_address_may_be_submitted(app_factory: AppFactory) -> None:
    """A literal loopback target is refused at submit, unless its network is allow-listed."""
    strict = await app_factory(webhook_concurrency=0)
    listed = await app_factory(webhook_concurrency=0, webhook_allowlist="127.0.0.0/8")
    body = {"pipeline": "noop", "webhook": {"url": "http://127.0.0.1:9/hook"}}
    async with await client_for(strict) as a, await client_for(listed) as b:
        assert (await a.post("/v1/jobs", json=body)).status_code == 422
        assert (await b.post("/v1/jobs", json=body)).status_code == 202


# -- several senders, crashes ----------------------------------------------------------


async def test_several_senders_never_send_one_delivery_twice(
    app_factory: AppFactory, receiver: Receiver
) -> None:
    """Three senders, each with its own connection pool (as in three processes), share
    40 deliveries: each is sent exactly once."""
    app = await app_factory(webhook_concurrency=0, **PRIVATE_OK)
    url = state_of(app).settings.database_url
    receiver.delay_s = 0.02  # a slow receiver, so that claims overlap sends
    async with await client_for(app) as client:
        jobs = [await _cancelled_job(client, receiver.url) for _ in range(40)]
    settings = Settings(
        database_url=url, webhook_allow_private=True, webhook_concurrency=4, webhook_poll_s=0.02
    )
    databases = [Database(url) for _ in range(3)]
    senders = [WebhookSender(db, settings) for db in databases]
    try:
        for sender in senders:
            await sender.start()
        await receiver.wait_for(40, timeout=30)

        async def all_succeeded() -> bool:
            return all(r["status"] == "succeeded" for r in await _rows(app))

        await _eventually(all_succeeded)
    finally:
        for sender in senders:
            await sender.aclose()
        for db in databases:
            await db.aclose()
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    assert len(ids) == len(set(ids)) == len(jobs)


async def test_a_sender_killed_mid_send_leaves_the_delivery_to_another(
    app_factory: AppFactory, make_sender: MakeSender, receiver: Receiver
) -> None:
    """A sender process SIGKILLed while its request is in flight records nothing; once
    its lease lapses another sender sends the same delivery again (at least once)."""
    app = await app_factory(webhook_concurrency=0, **PRIVATE_OK)
    receiver.plan("stall")
    async with await client_for(app) as client:
        job_id = await _cancelled_job(client, receiver.url)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.api.webhook_sender_process",
        state_of(app).settings.database_url,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        (first,) = await receiver.wait_for(1, timeout=30)
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    (row,) = await _rows(app, job_id)
    assert (row["status"], row["attempts"]) == ("pending", 1)

    clock = Clock(now() + 1)
    successor = make_sender(app, clock=clock)
    assert await successor.send_due() == 0, "claimed while the dead sender's lease holds"
    clock.now = row["next_attempt_at"] + 0.001
    assert await successor.send_due() == 1
    second = (await receiver.wait_for(2))[1]
    assert second.headers["webhook-id"] == first.headers["webhook-id"] == row["id"]
    assert second.body == first.body
    (row,) = await _rows(app, job_id)
    assert (row["status"], row["attempts"]) == ("succeeded", 2)


async def test_a_delivery_wakes_the_apps_sender_at_once(
    app_factory: AppFactory, receiver: Receiver
) -> None:
    """A delivery queued by the app's own process is sent when its transaction
    commits, not at the next poll (an hour away here)."""
    app = await app_factory(webhook_poll_s=3600, **PRIVATE_OK)
    async with await client_for(app) as client:
        job_id = await _cancelled_job(client, receiver.url)
        (request,) = await receiver.wait_for(1, timeout=5)
    assert request.headers["webhook-id"] == (await _rows(app, job_id))[0]["id"]


# -- the delivery log ------------------------------------------------------------------


async def test_the_delivery_log_is_scoped_like_its_job(
    app_factory: AppFactory, receiver: Receiver
) -> None:
    """Another owner gets 404 for a job's log and for redelivering; an unknown delivery
    is 404; a viewer of the owner reads the log but may not redeliver."""
    app = await app_factory(webhook_concurrency=0, **PRIVATE_OK)
    async with (
        await client_for(app, "owner-a") as owner,
        await client_for(app, "owner-a", ("viewer",)) as viewer,
        await client_for(app, "owner-b") as intruder,
        await client_for(app, "admin-7", ("admin",)) as admin,
    ):
        job_id = await _cancelled_job(owner, receiver.url)
        own_job = await _cancelled_job(intruder, receiver.url)
        (delivery,) = (await owner.get(f"/v1/jobs/{job_id}/webhooks")).json()["deliveries"]
        redeliver = f"/v1/jobs/{job_id}/webhooks/{delivery['id']}/redeliver"

        assert (await intruder.get(f"/v1/jobs/{job_id}/webhooks")).status_code == 404
        assert (await intruder.post(redeliver)).status_code == 404
        crossed = f"/v1/jobs/{own_job}/webhooks/{delivery['id']}/redeliver"
        assert (await intruder.post(crossed)).status_code == 404
        unknown = f"/v1/jobs/{job_id}/webhooks/msg_nope/redeliver"
        assert (await owner.post(unknown)).status_code == 404
        assert (await viewer.get(f"/v1/jobs/{job_id}/webhooks")).status_code == 200
        assert (await viewer.post(redeliver)).status_code == 403
        assert (await admin.get(f"/v1/jobs/{job_id}/webhooks")).status_code == 200
        assert delivery["url"] == receiver.url
        assert delivery["event"] == "cancelled"
