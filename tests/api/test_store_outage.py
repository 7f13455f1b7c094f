"""The store unreachable: answers are 503 `unavailable` with Retry-After, never a 500
and never an internal message; and they are 2xx again once the store is back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from jobgate.auth.api_keys import KEY_PREFIX
from tests.api.conftest import AppFactory
from tests.api.helpers import client_for
from tests.engine.test_postgres_restart import _restart_postgres

UNREACHABLE = "postgresql+asyncpg://postgres@127.0.0.1:1/test"


async def test_an_unreachable_store_is_503_with_retry_after(
    app_factory: AppFactory, expect_problem: Any
) -> None:
    import httpx

    app = await app_factory(database_url=UNREACHABLE)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        response = await client.get(
            "/v1/me", headers={"Authorization": f"Bearer {KEY_PREFIX}{'a' * 40}"}
        )
    expect_problem(response, 503, "unavailable")
    assert int(response.headers["retry-after"]) >= 1
    for internal in ("127.0.0.1", "refused", "Errno", "asyncpg", "Traceback"):
        assert internal not in response.text


@pytest.fixture
def database_url(postgres_db_url: str) -> str:
    """PostgreSQL only: it is restarted."""
    return postgres_db_url


@pytest.mark.service("postgres")
@pytest.mark.timeout(180)
@pytest.mark.disruptive
async def test_a_postgres_restart_mid_traffic_is_503s_then_success(
    app_factory: AppFactory,
) -> None:
    """Requests keep coming while PostgreSQL restarts: each answer is 2xx or 503, some
    are 503, and once it is back every request succeeds on the same app."""
    app = await app_factory()
    statuses: list[int] = []
    async with await client_for(app, "outage-user") as client:
        restart = asyncio.create_task(asyncio.to_thread(_restart_postgres))
        while not restart.done():
            response = await client.get("/v1/me")
            statuses.append(response.status_code)
            submitted = await client.post("/v1/jobs", json={"pipeline": "noop"})
            statuses.append(submitted.status_code)
            await asyncio.sleep(0.01)
        await restart
        deadline = time.monotonic() + 30
        while (await client.get("/v1/me")).status_code != 200:
            assert time.monotonic() < deadline, "the app never recovered"
            await asyncio.sleep(0.2)
        after = [
            (await client.post("/v1/jobs", json={"pipeline": "noop"})).status_code for _ in range(5)
        ]
    assert set(statuses) <= {200, 202, 503}, sorted(set(statuses))
    assert 503 in statuses
    assert after == [202] * 5


@pytest.mark.service("postgres")
@pytest.mark.timeout(180)
@pytest.mark.disruptive
async def test_concurrent_submits_through_a_postgres_restart_lose_no_accepted_job(
    app_factory: AppFactory,
) -> None:
    """Eight clients submit at once while PostgreSQL restarts, so their jobs share
    statements (`api/submit_group.py`): every answer is 202 or 503 (a shared statement
    is never written again after an outage, which could store its jobs twice and answer
    500), and afterwards every accepted job is stored."""
    from sqlalchemy import select

    from jobgate.store.tables import jobs
    from tests.api.conftest import state_of

    app = await app_factory()
    accepted: list[str] = []
    statuses: list[int] = []
    async with await client_for(app, "outage-user") as client:
        restart = asyncio.create_task(asyncio.to_thread(_restart_postgres))

        async def lane() -> None:
            while not restart.done():
                response = await client.post("/v1/jobs", json={"pipeline": "noop"})
                statuses.append(response.status_code)
                if response.status_code == 202:
                    accepted.append(response.json()["id"])
                await asyncio.sleep(0.005)

        await asyncio.gather(*(lane() for _ in range(8)))
        await restart
        deadline = time.monotonic() + 30
        while (await client.post("/v1/jobs", json={"pipeline": "noop"})).status_code != 202:
            assert time.monotonic() < deadline, "the app never recovered"
            await asyncio.sleep(0.2)
    assert set(statuses) <= {202, 503}, sorted(set(statuses))
    assert 503 in statuses
    assert len(set(accepted)) == len(accepted) > 0
    async with state_of(app).db.read() as conn:
        stored = set(
            (await conn.execute(select(jobs.c.id).where(jobs.c.id.in_(accepted)))).scalars()
        )
    assert stored == set(accepted)
