"""Rate limits and quotas (API.md "Rate limits and quotas"; docs/limits.md).

Each limit test runs on both storages: memory, and Redis under a key prefix of its own.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from typing import Any, Protocol

import httpx
import pytest
import redis
from fastapi import FastAPI
from structlog.testing import capture_logs

from jobgate.auth import api_keys
from jobgate.ids import now
from tests.api.conftest import AppFactory
from tests.api.helpers import snapshot, state_of
from tests.conftest import TCP_SERVICES

REDIS_URL = f"redis://{TCP_SERVICES['redis']}/0"
STEPS = {"pipeline": "steps", "params": {"steps": 1}}
Expect = Callable[[httpx.Response, int, str], dict[str, Any]]


class Limited(Protocol):
    def __call__(self, **settings: Any) -> Awaitable[FastAPI]: ...


class Connect(Protocol):
    def __call__(
        self,
        app: FastAPI,
        owner: str = ...,
        roles: Sequence[str] = ...,
        *,
        key: str | None = None,
        address: str = ...,
    ) -> Awaitable[httpx.AsyncClient]: ...


@pytest.fixture(
    params=[
        pytest.param("memory", id="memory"),
        pytest.param("redis", id="redis", marks=pytest.mark.service("redis")),
    ]
)
def storage(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Settings of one limits storage; on Redis, a key prefix of this test's own."""
    if request.param == "memory":
        yield {"limits_url": "memory://"}
        return
    namespace = f"jobgate-test-{uuid.uuid4().hex}"
    yield {"limits_url": REDIS_URL, "limits_namespace": namespace}
    with redis.Redis.from_url(REDIS_URL) as client:
        keys = list(client.scan_iter(f"{namespace}:*"))
        if keys:
            client.delete(*keys)


@pytest.fixture
async def limited(app_factory: AppFactory, storage: dict[str, Any]) -> Limited:
    """Build a started app on this test's storage with these settings."""

    async def build(**settings: Any) -> FastAPI:
        return await app_factory(**storage, **settings)

    return build


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """A client of `app`, with a new key of `owner`, connecting from `address`."""
    async with AsyncExitStack() as stack:

        async def make(
            app: FastAPI,
            owner: str = "user-1",
            roles: Sequence[str] = ("user",),
            *,
            key: str | None = None,
            address: str = "127.0.0.1",
        ) -> httpx.AsyncClient:
            if key is None:
                async with state_of(app).db.write() as conn:
                    _, key = await api_keys.create_key(
                        conn, owner=owner, roles=roles, name=None, expires_at=None, at=now()
                    )
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app, client=(address, 4321)),
                base_url="http://test",
                headers={"Authorization": f"Bearer {key}"},
            )
            return await stack.enter_async_context(client)

        yield make


def limit_headers(response: httpx.Response) -> tuple[int, int, int]:
    """(RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset)."""
    headers = response.headers
    return (
        int(headers["ratelimit-limit"]),
        int(headers["ratelimit-remaining"]),
        int(headers["ratelimit-reset"]),
    )


async def submit(client: httpx.AsyncClient, **headers: str) -> httpx.Response:
    return await client.post("/v1/jobs", json=STEPS, headers=headers)


async def batch(client: httpx.AsyncClient, size: int) -> httpx.Response:
    return await client.post("/v1/jobs/batch", json={"jobs": [STEPS] * size})


# -- the submit limit --------------------------------------------------------------------


async def test_submit_over_the_limit_is_429_with_retry_after_and_ratelimit_headers(
    limited: Limited, connect: Connect, expect_problem: Expect
) -> None:
    """The 4th submit of `3/hour` is 429 `rate-limited`; every answer says where the window is."""
    app = await limited(rate_limit_submit="3/hour")
    user = await connect(app)
    for remaining in (2, 1, 0):
        accepted = await submit(user)
        assert accepted.status_code == 202, accepted.text
        limit, left, reset = limit_headers(accepted)
        assert (limit, left) == (3, remaining)
        assert 3599 <= reset <= 3600  # the first submission leaves in an hour
    before = await snapshot(app)
    refused = await submit(user)
    body = expect_problem(refused, 429, "rate-limited")
    assert "submit limit" in body["detail"]
    retry_after = int(refused.headers["retry-after"])
    assert 3599 <= retry_after <= 3600
    assert limit_headers(refused) == (3, 0, retry_after)
    assert await snapshot(app) == before


async def test_every_submit_answer_carries_ratelimit_headers(
    limited: Limited, connect: Connect
) -> None:
    """202, 200 replays and 4xx refusals of both submit routes carry the RateLimit headers."""
    app = await limited(rate_limit_submit="10/minute")
    user = await connect(app)
    answers = [
        await submit(user, **{"Idempotency-Key": "k1"}),
        await submit(user, **{"Idempotency-Key": "k1"}),
        await batch(user, 2),
        await user.post("/v1/jobs", json={"pipeline": "nope"}),
        await user.post("/v1/jobs", content=b"{", headers={"Content-Type": "application/json"}),
        await user.post("/v1/jobs/batch", content=b"x", headers={"Content-Type": "text/plain"}),
    ]
    assert [a.status_code for a in answers] == [202, 200, 202, 422, 400, 415]
    assert [limit_headers(a)[:2] for a in answers] == [
        (10, 9),
        (10, 9),
        (10, 7),
        (10, 7),
        (10, 7),
        (10, 7),
    ]
    assert all(0 < limit_headers(a)[2] <= 60 for a in answers)


async def test_no_ratelimit_headers_and_no_storage_without_a_limit(
    app_factory: AppFactory, connect: Connect
) -> None:
    """With no limit configured, submits carry no RateLimit headers and touch no storage."""
    app = await app_factory(limits_url="redis://127.0.0.1:1/0")  # never contacted
    user = await connect(app)
    response = await submit(user)
    assert response.status_code == 202
    assert "ratelimit-limit" not in response.headers
    assert state_of(app).limits.submit is None


async def test_a_batch_counts_each_job(limited: Limited, connect: Connect) -> None:
    """A batch of 3 takes 3 slots; `/v1/me` shows the window's usage."""
    app = await limited(rate_limit_submit="5/hour")
    user = await connect(app)
    response = await batch(user, 3)
    assert response.status_code == 202, response.text
    assert limit_headers(response)[:2] == (5, 2)
    assert limit_headers(await submit(user))[:2] == (5, 1)
    usage = (await user.get("/v1/me")).json()["usage"]
    assert (usage["submits_in_window"], usage["submit_remaining"]) == (4, 1)
    limits = (await user.get("/v1/me")).json()["limits"]
    assert limits["rate_limit_submit"] == "5/hour"


async def test_a_batch_over_the_remaining_quota_is_429_and_creates_nothing(
    limited: Limited, connect: Connect, expect_problem: Expect
) -> None:
    """With 2 slots left a batch of 3 is refused whole: nothing written, nothing counted."""
    app = await limited(rate_limit_submit="5/hour")
    user = await connect(app)
    for _ in range(3):
        assert (await submit(user)).status_code == 202
    before = await snapshot(app)
    refused = await batch(user, 3)
    expect_problem(refused, 429, "rate-limited")
    assert limit_headers(refused)[:2] == (5, 2)
    assert int(refused.headers["retry-after"]) >= 1
    too_big = await batch(user, 6)  # more than the limit itself: never possible
    assert "more than the submit limit" in expect_problem(too_big, 429, "rate-limited")["detail"]
    assert await snapshot(app) == before
    fits = await batch(user, 2)
    assert fits.status_code == 202, fits.text
    assert limit_headers(fits)[:2] == (5, 0)


async def test_a_rejected_request_does_not_count(
    limited: Limited, connect: Connect, expect_problem: Expect
) -> None:
    """400, 409, 415 and 422 answers (body, content, budget) leave the window untouched."""
    app = await limited(rate_limit_submit="2/hour")
    user = await connect(app)
    rejected = [
        await user.post("/v1/jobs", content=b"{", headers={"Content-Type": "application/json"}),
        await user.post("/v1/jobs", json={"pipeline": "nope"}),
        await user.post(
            "/v1/jobs", json={**STEPS, "params": {"steps": 1, "cost_per_step": 5}, "budget_usd": 1}
        ),
        await user.post("/v1/jobs/batch", json={"jobs": [STEPS, {"pipeline": "nope"}]}),
        await user.post("/v1/jobs", content=b"x", headers={"Content-Type": "text/plain"}),
    ]
    assert [r.status_code for r in rejected] == [400, 422, 422, 422, 415]
    assert rejected[2].json()["type"].endswith("/budget-exceeded")
    assert all(limit_headers(r)[1] == 2 for r in rejected)
    first = await submit(user, **{"Idempotency-Key": "a"})
    conflict = await user.post(
        "/v1/jobs", json={"pipeline": "noop"}, headers={"Idempotency-Key": "a"}
    )
    expect_problem(conflict, 409, "idempotency-conflict")
    assert [limit_headers(r)[1] for r in (first, conflict)] == [1, 1]
    assert (await submit(user)).status_code == 202
    expect_problem(await submit(user), 429, "rate-limited")


async def test_an_idempotent_replay_does_not_count(limited: Limited, connect: Connect) -> None:
    """Replays (200) take no slot, and are answered even once the window is full."""
    app = await limited(rate_limit_submit="2/hour")
    user = await connect(app)
    first = await submit(user, **{"Idempotency-Key": "once"})
    assert first.status_code == 202
    for _ in range(3):
        replay = await submit(user, **{"Idempotency-Key": "once"})
        assert replay.status_code == 200
        assert replay.json()["id"] == first.json()["id"]
        assert limit_headers(replay)[1] == 1
    assert (await submit(user, **{"Idempotency-Key": "twice"})).status_code == 202
    # The window is full: a retry of a submit that went through still gets its job ...
    replay = await submit(user, **{"Idempotency-Key": "twice"})
    assert replay.status_code == 200
    # ... while a new key is refused, however it is sent.
    assert (await submit(user, **{"Idempotency-Key": "new"})).status_code == 429
    assert (await submit(user)).status_code == 429


async def test_the_window_slides_exactly_a_slot_frees_when_its_submission_leaves(
    limited: Limited, connect: Connect
) -> None:
    """`3 per 2 seconds`, real time: each slot comes back 2 s after its own submission.

    A at t=0, B and C at t≈1: D is refused until A leaves at t≈2; then exactly one
    submit passes (B and C are still in the window, which a fixed window would have
    emptied), and two more pass once B and C leave at t≈3. Retry-After and
    RateLimit-Reset name those moments, rounded up.
    """
    app = await limited(rate_limit_submit="3 per 2 seconds")
    user = await connect(app)

    async def timed() -> tuple[httpx.Response, float, float]:
        start = time.time()
        response = await submit(user)
        return response, start, time.time()

    def until(moment: float) -> float:
        return max(0.0, moment - time.time())

    a, a_start, a_end = await timed()
    await asyncio.sleep(1.0)
    b, b_start, _ = await timed()
    c, _, c_end = await timed()
    assert [r.status_code for r in (a, b, c)] == [202, 202, 202]
    d, d_start, d_end = await timed()
    assert d.status_code == 429
    # A leaves at its hit + 2 s, somewhere in [a_start + 2, a_end + 2].
    retry = int(d.headers["retry-after"])
    assert math.ceil(a_start + 2 - d_end) <= retry <= math.ceil(a_end + 2 - d_start)
    assert limit_headers(d)[1:] == (0, retry)

    await asyncio.sleep(until(a_end + 2 + 0.15))
    e, _, _ = await timed()
    assert e.status_code == 202, "A left the window: one slot is free"
    f, f_start, f_end = await timed()
    assert f.status_code == 429, "B and C are still in the window"
    retry = int(f.headers["retry-after"])
    assert math.ceil(b_start + 2 - f_end) <= retry <= math.ceil(c_end + 2 - f_start)

    await asyncio.sleep(until(c_end + 2 + 0.15))
    assert [(await submit(user)).status_code for _ in range(3)] == [202, 202, 429]


async def test_limits_are_per_user(
    limited: Limited, connect: Connect, expect_problem: Expect
) -> None:
    """One user's full window does not touch another's."""
    app = await limited(rate_limit_submit="2/hour")
    kim, lee = await connect(app, "kim"), await connect(app, "lee")
    for _ in range(2):
        assert (await submit(kim)).status_code == 202
    expect_problem(await submit(kim), 429, "rate-limited")
    other = await submit(lee)
    assert other.status_code == 202
    assert limit_headers(other)[:2] == (2, 1)


async def test_concurrent_submits_never_pass_the_limit(limited: Limited, connect: Connect) -> None:
    """Twelve submits at once against `4/hour`: exactly 4 jobs, 8 refusals (the take is atomic)."""
    app = await limited(rate_limit_submit="4/hour")
    user = await connect(app)
    answers = await asyncio.gather(*(submit(user) for _ in range(12)))
    assert sorted(a.status_code for a in answers) == [202] * 4 + [429] * 8
    assert (await snapshot(app))["jobs"] == 4


async def test_the_order_is_auth_then_role_then_rate_limit_then_body(
    limited: Limited, connect: Connect, expect_problem: Expect
) -> None:
    """With the window full: no credentials 401, a viewer 403, a garbage body 429."""
    app = await limited(rate_limit_submit="1/hour")
    user = await connect(app)
    assert (await submit(user)).status_code == 202
    anonymous = await connect(app, key="jg_" + "x" * 40)
    expect_problem(await submit(anonymous), 401, "unauthenticated")
    viewer = await connect(app, "user-1", ["viewer"])
    expect_problem(await submit(viewer), 403, "forbidden")
    garbage = await user.post(
        "/v1/jobs/batch", content=b"{", headers={"Content-Type": "application/json"}
    )
    expect_problem(garbage, 429, "rate-limited")


async def test_submit_routes_document_429(app_factory: AppFactory) -> None:
    """`/openapi.json` lists 429 for both submit routes."""
    app = await app_factory()
    paths = app.openapi()["paths"]
    assert "429" in paths["/v1/jobs"]["post"]["responses"]
    assert "429" in paths["/v1/jobs/batch"]["post"]["responses"]


# -- many API processes ------------------------------------------------------------------


@pytest.mark.service("redis")
async def test_two_api_processes_sharing_one_redis_share_one_limit(
    app_factory: AppFactory, connect: Connect, expect_problem: Expect
) -> None:
    """Two apps on one Redis: accepted submits across both, one after another or all at
    once, add up to the limit exactly."""
    namespace = f"jobgate-test-{uuid.uuid4().hex}"
    settings: dict[str, Any] = {"limits_url": REDIS_URL, "limits_namespace": namespace}
    first = await app_factory(rate_limit_submit="4/hour", **settings)
    second = await app_factory(rate_limit_submit="4/hour", **settings)
    try:
        one = await connect(first, "kim")
        two = await connect(second, "kim")
        codes = [(await submit(client)).status_code for client in (one, two) * 3]
        assert codes == [202, 202, 202, 202, 429, 429]

        clients = [await connect(app, "lee") for app in (first, second)]
        burst = await asyncio.gather(*(submit(clients[i % 2]) for i in range(12)))
        assert sorted(a.status_code for a in burst) == [202] * 4 + [429] * 8
    finally:
        with redis.Redis.from_url(REDIS_URL) as client:
            keys = list(client.scan_iter(f"{namespace}:*"))
            if keys:
                client.delete(*keys)


# -- the active-jobs cap -----------------------------------------------------------------


async def test_active_jobs_cap_is_429_until_a_job_ends(
    app_factory: AppFactory, connect: Connect, expect_problem: Expect
) -> None:
    """With a cap of 3 queued+running jobs (no worker: they stay queued), a 4th is 429;
    a batch that would pass the cap is refused whole; ending a job frees room."""
    app = await app_factory(max_active_jobs_per_user=3)
    user, other = await connect(app, "kim"), await connect(app, "lee")
    jobs = [(await submit(user)).json()["id"] for _ in range(2)]
    refused = await batch(user, 2)
    body = expect_problem(refused, 429, "rate-limited")
    assert "queued or running" in body["detail"]
    assert int(refused.headers["retry-after"]) >= 1
    assert (await submit(user)).status_code == 202
    expect_problem(await submit(user), 429, "rate-limited")
    assert (await submit(other)).status_code == 202
    assert (await user.post(f"/v1/jobs/{jobs[0]}/cancel")).status_code == 200
    assert (await submit(user)).status_code == 202
    me = (await user.get("/v1/me")).json()
    assert me["limits"]["max_active_jobs_per_user"] == 3
    assert me["usage"]["active_jobs"] == 3


async def test_a_retry_is_held_to_the_active_jobs_cap(
    app_factory: AppFactory, connect: Connect, expect_problem: Expect
) -> None:
    """A retry queues its job again, so it needs room under the cap as a submit does:
    429 with Retry-After when the cap is full (regression: 202, and six active jobs
    under a cap of two); 202 once a job ended; a job that cannot be retried is 409."""
    app = await app_factory(max_active_jobs_per_user=2)
    user = await connect(app, "kim")
    ended = [(await submit(user)).json()["id"] for _ in range(2)]
    for job_id in ended:
        assert (await user.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
    waiting = [(await submit(user)).json()["id"] for _ in range(2)]
    refused = expect_problem(await user.post(f"/v1/jobs/{ended[0]}/retry"), 429, "rate-limited")
    assert "queued or running" in refused["detail"]
    expect_problem(await user.post(f"/v1/jobs/{waiting[0]}/retry"), 409, "conflict")
    assert (await user.post(f"/v1/jobs/{waiting[0]}/cancel")).status_code == 200
    assert (await user.post(f"/v1/jobs/{ended[0]}/retry")).status_code == 202
    assert (await user.get("/v1/me")).json()["usage"]["active_jobs"] == 2


async def test_concurrent_submits_and_retries_cannot_pass_the_active_jobs_cap_together(
    app_factory: AppFactory, connect: Connect
) -> None:
    """The cap is counted again in the write, under the owner's lock: 40 submits at once,
    through two apps on one database (two API processes), make exactly the cap's number
    of jobs (regression: each counted before any was written; 92 of 100 went through
    under a cap of 5). Retries at once are held the same way, and another owner is not."""
    cap = 5
    apps = [await app_factory(max_active_jobs_per_user=cap) for _ in range(2)]
    users = [await connect(app, "kim") for app in apps]
    answers = await asyncio.gather(*(submit(users[i % 2]) for i in range(40)))
    assert sorted(a.status_code for a in answers).count(202) == cap
    assert {a.status_code for a in answers} == {202, 429}
    me = (await users[0].get("/v1/me")).json()
    assert me["usage"]["active_jobs"] == cap

    accepted = [a.json()["id"] for a in answers if a.status_code == 202]
    for job_id in accepted[:3]:
        assert (await users[0].post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
    retries = await asyncio.gather(
        *(users[i % 2].post(f"/v1/jobs/{job_id}/retry") for i, job_id in enumerate(accepted[:3])),
        *(submit(users[i % 2]) for i in range(4)),
    )
    assert sorted(r.status_code for r in retries).count(202) == 3  # 2 active, room for 3
    assert (await users[1].get("/v1/me")).json()["usage"]["active_jobs"] == cap
    other = await connect(apps[1], "lee")
    assert (await submit(other)).status_code == 202


# -- the IP limit ------------------------------------------------------------------------


async def test_ip_limit_counts_requests_before_authentication(
    limited: Limited, connect: Connect, expect_problem: Expect
) -> None:
    """Credential guessing from one address is cut off at the limit (429, not 401)."""
    app = await limited(rate_limit_ip="3/hour")
    guesser = await connect(app, key="jg_" + "g" * 40, address="203.0.113.9")
    for _ in range(3):
        expect_problem(await guesser.get("/v1/me"), 401, "unauthenticated")
    refused = await guesser.get("/v1/me")
    expect_problem(refused, 429, "rate-limited")
    assert 3599 <= int(refused.headers["retry-after"]) <= 3600
    assert limit_headers(refused)[:2] == (3, 0)
    neighbour = await connect(app, address="203.0.113.10")
    assert (await neighbour.get("/v1/me")).status_code == 200
    assert (await guesser.get("/healthz")).status_code == 200  # only /v1 is limited


async def test_forwarded_for_from_an_untrusted_peer_does_not_dodge_the_ip_limit(
    limited: Limited, connect: Connect
) -> None:
    """Without trusted proxies X-Forwarded-For is ignored: a new one per request changes nothing."""
    app = await limited(rate_limit_ip="2/hour")
    client = await connect(app, address="203.0.113.9")
    answers = [
        await client.get("/v1/me", headers={"X-Forwarded-For": f"198.51.100.{i}"}) for i in range(3)
    ]
    assert [a.status_code for a in answers] == [200, 200, 429]


async def test_behind_a_trusted_proxy_the_rightmost_untrusted_address_is_limited(
    limited: Limited, connect: Connect
) -> None:
    """Via a trusted proxy, spoofed left-most X-Forwarded-For entries are ignored: the
    address the proxy saw is limited, and another client behind it is not."""
    app = await limited(rate_limit_ip="2/hour", trusted_proxies="10.0.0.0/8")
    proxy = await connect(app, address="10.0.0.1")
    answers = [
        await proxy.get("/v1/me", headers={"X-Forwarded-For": f"1.2.3.{i}, 198.51.100.7"})
        for i in range(3)
    ]
    assert [a.status_code for a in answers] == [200, 200, 429]
    other = await proxy.get("/v1/me", headers={"X-Forwarded-For": "198.51.100.7, 198.51.100.8"})
    assert other.status_code == 200


# -- storage failures --------------------------------------------------------------------


async def test_redis_down_fails_open_with_a_warning(
    app_factory: AppFactory, connect: Connect
) -> None:
    """With the limits' Redis unreachable, requests go through (no 500, no RateLimit
    headers) and one warning is logged per back-off period, not one per request."""
    app = await app_factory(
        limits_url="redis://127.0.0.1:1/0", rate_limit_submit="1/hour", rate_limit_ip="1/hour"
    )
    user = await connect(app)
    with capture_logs() as logs:
        answers = [await submit(user) for _ in range(3)]
        me = await user.get("/v1/me")
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert all("ratelimit-limit" not in a.headers for a in answers)
    assert me.status_code == 200
    assert me.json()["usage"]["submit_remaining"] is None
    warnings = [e for e in logs if e["event"] == "rate_limit_storage_failed"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"


@pytest.mark.service("redis")
@pytest.mark.timeout(180)
@pytest.mark.disruptive
async def test_limits_come_back_after_a_redis_restart(
    app_factory: AppFactory, connect: Connect
) -> None:
    """Redis restarts mid-run: submits go on (fail open) while it is down, and once it
    answers again the limit holds again, on the same app and its same connection pool."""
    from tests.contract.test_transport_restart import _start, _stop

    namespace = f"jobgate-test-{uuid.uuid4().hex}"
    app = await app_factory(
        limits_url=REDIS_URL, limits_namespace=namespace, rate_limit_submit="3/hour"
    )
    user = await connect(app)
    before = [await submit(user) for _ in range(2)]
    assert [a.headers["ratelimit-remaining"] for a in before] == ["2", "1"]
    try:
        await asyncio.to_thread(_stop, "redis")
        during = await submit(user)
        assert during.status_code == 202
        assert "ratelimit-limit" not in during.headers
    finally:
        await asyncio.to_thread(_start, "redis")
    # The restarted Redis kept nothing: a fresh window of 3, enforced again.
    deadline = time.monotonic() + 30
    while "ratelimit-limit" not in (answer := await submit(user)).headers:
        assert answer.status_code == 202
        assert time.monotonic() < deadline, "the limits never came back"
        await asyncio.sleep(0.2)
    after = [answer] + [await submit(user) for _ in range(3)]
    statuses = [a.status_code for a in after]
    assert statuses == [202, 202, 202, 429], statuses
