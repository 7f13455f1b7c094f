"""The per-user monthly spend cap: refused up front, each job's budget capped to it."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import func, insert, select, update

from jobgate.ids import now, uuid7
from jobgate.store import tables
from tests.api.conftest import AppFactory
from tests.api.helpers import client_for, state_of

OWNER = "spender"


async def _spent(app: FastAPI, usd: float, *, days_ago: float = 0.0, owner: str = OWNER) -> None:
    at = now() - days_ago * 86400
    async with state_of(app).db.write() as conn:
        await conn.execute(
            insert(tables.jobs).values(
                id=uuid7(),
                pipeline="steps",
                pipeline_version="1",
                owner=owner,
                status="succeeded",
                cancel_requested=False,
                priority=0,
                params={},
                files=[],
                estimated_usd=0.0,
                actual_usd=usd,
                budget_usd=usd,
                progress=1.0,
                fair_key=at,
                created_at=at,
            )
        )


def _steps(cost: float) -> dict[str, Any]:
    return {"pipeline": "steps", "params": {"steps": 2, "step_ms": 0, "cost_per_step": cost / 2}}


async def _jobs_of(app: FastAPI) -> int:
    async with state_of(app).db.read() as conn:
        return int(
            await conn.scalar(
                select(func.count()).select_from(tables.jobs).where(tables.jobs.c.owner == OWNER)
            )
            or 0
        )


async def test_the_monthly_cap_refuses_an_estimate_that_does_not_fit(
    app_factory: AppFactory, expect_problem: Any
) -> None:
    """7 of 10 USD spent this month: an estimate of 5 is 422 budget-exceeded, one of 2 is
    accepted with its budget lowered to the 3 USD left."""
    app = await app_factory(user_monthly_budget_usd=10.0)
    await _spent(app, 7.0)
    async with await client_for(app, OWNER) as client:
        body = expect_problem(
            await client.post("/v1/jobs", json=_steps(5.0)), 422, "budget-exceeded"
        )
        assert "monthly" in body["detail"]
        accepted = await client.post("/v1/jobs", json=_steps(2.0))
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["cost"]["budget_usd"] == 3.0
        me = (await client.get("/v1/me")).json()
    assert me["limits"]["monthly_budget_usd"] == 10.0
    assert me["usage"]["month_spent_usd"] == 7.0
    assert await _jobs_of(app) == 2  # the spent one and the accepted one


async def test_spending_of_earlier_months_and_other_owners_does_not_count(
    app_factory: AppFactory,
) -> None:
    app = await app_factory(user_monthly_budget_usd=10.0)
    await _spent(app, 500.0, days_ago=40)
    await _spent(app, 500.0, owner="someone-else")
    async with await client_for(app, OWNER) as client:
        accepted = await client.post("/v1/jobs", json=_steps(4.0))
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["cost"]["budget_usd"] == 10.0


async def test_a_batch_must_fit_the_cap_as_a_whole(
    app_factory: AppFactory, expect_problem: Any
) -> None:
    """Two jobs estimated 2 USD each with 3 USD left: 422, and neither is created."""
    app = await app_factory(user_monthly_budget_usd=10.0)
    await _spent(app, 7.0)
    async with await client_for(app, OWNER) as client:
        batch = {"jobs": [_steps(2.0), _steps(2.0)]}
        expect_problem(await client.post("/v1/jobs/batch", json=batch), 422, "budget-exceeded")
        assert await _jobs_of(app) == 1
        one = await client.post("/v1/jobs/batch", json={"jobs": [_steps(2.0)]})
    assert one.status_code == 202, one.text
    assert one.json()["jobs"][0]["cost"]["budget_usd"] == 3.0


async def test_a_replayed_submit_is_answered_after_the_month_is_spent(
    app_factory: AppFactory, expect_problem: Any
) -> None:
    """A submit retried with its Idempotency-Key after its own job spent what the month
    had left: 200 with the first job, for one job and for a batch (regression: 422);
    a new key is still refused, and the key with another body is 409."""
    app = await app_factory(user_monthly_budget_usd=10.0)
    await _spent(app, 7.0)
    async with await client_for(app, OWNER) as client:
        first = await client.post("/v1/jobs", json=_steps(2.0), headers={"Idempotency-Key": "a"})
        assert first.status_code == 202, first.text
        batch = await client.post(
            "/v1/jobs/batch", json={"jobs": [_steps(1.0)]}, headers={"Idempotency-Key": "b"}
        )
        assert batch.status_code == 202, batch.text
        async with state_of(app).db.write() as conn:  # both jobs spent their estimates
            await conn.execute(
                update(tables.jobs)
                .where(tables.jobs.c.owner == OWNER, tables.jobs.c.status == "queued")
                .values(status="succeeded", actual_usd=tables.jobs.c.estimated_usd)
            )
        assert (await client.get("/v1/me")).json()["usage"]["month_spent_usd"] == 10.0
        again = await client.post("/v1/jobs", json=_steps(2.0), headers={"Idempotency-Key": "a"})
        assert again.status_code == 200, again.text
        assert again.json()["id"] == first.json()["id"]
        batch_again = await client.post(
            "/v1/jobs/batch", json={"jobs": [_steps(1.0)]}, headers={"Idempotency-Key": "b"}
        )
        assert batch_again.status_code == 200, batch_again.text
        assert batch_again.json()["jobs"][0]["id"] == batch.json()["jobs"][0]["id"]
        other = await client.post("/v1/jobs", json=_steps(1.0), headers={"Idempotency-Key": "a"})
        expect_problem(other, 409, "idempotency-conflict")
        fresh = await client.post("/v1/jobs", json=_steps(2.0), headers={"Idempotency-Key": "c"})
        expect_problem(fresh, 422, "budget-exceeded")
    assert await _jobs_of(app) == 3


async def test_a_spent_month_refuses_even_free_jobs(
    app_factory: AppFactory, expect_problem: Any
) -> None:
    app = await app_factory(user_monthly_budget_usd=10.0)
    await _spent(app, 10.0)
    async with await client_for(app, OWNER) as client:
        response = await client.post("/v1/jobs", json={"pipeline": "noop"})
    expect_problem(response, 422, "budget-exceeded")


async def test_without_a_cap_nothing_is_capped(app: FastAPI, client: httpx.AsyncClient) -> None:
    await _spent(app, 10_000.0, owner="admin-1")
    response = await client.post("/v1/jobs", json=_steps(4.0))
    assert response.status_code == 202
    assert response.json()["cost"]["budget_usd"] == state_of(app).settings.job_budget_usd
    assert (await client.get("/v1/me")).json()["limits"]["monthly_budget_usd"] is None
