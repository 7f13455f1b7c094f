"""`/v1/me`, `/v1/workers`, `/v1/pipelines` and the OpenAPI document."""

from __future__ import annotations

import re
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import insert

from jobgate.ids import now, uuid7
from jobgate.store.tables import jobs, workers

MakeClient = Any
ExpectProblem = Any
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def state_of(app: FastAPI) -> Any:
    return app.state.jobgate


def job_row(owner: str, status: str, actual_usd: float) -> dict[str, Any]:
    at = now()
    return {
        "id": uuid7(),
        "pipeline": "steps",
        "pipeline_version": "1",
        "owner": owner,
        "status": status,
        "cancel_requested": False,
        "priority": 0,
        "params": {},
        "files": [],
        "estimated_usd": 0.0,
        "actual_usd": actual_usd,
        "budget_usd": 10.0,
        "progress": 0.0,
        "fair_key": at,
        "created_at": at,
    }


async def test_me_shows_identity_limits_and_usage(app: FastAPI, make_client: MakeClient) -> None:
    """`/v1/me` counts the caller's own jobs only: active, total, money spent (in all and
    this month)."""
    async with state_of(app).db.write() as conn:
        await conn.execute(
            insert(jobs),
            [
                job_row("kim", "queued", 0.0),
                job_row("kim", "running", 1.25),
                job_row("kim", "succeeded", 2.5),
                job_row("kim", "failed", 0.25),
                job_row("lee", "running", 100.0),
                {**job_row("kim", "succeeded", 7.0), "created_at": now() - 32 * 86400},
            ],
        )
    kim = await make_client("kim", ["user"])
    response = await kim.get("/v1/me")
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == "kim"
    assert body["roles"] == ["user"]
    assert body["usage"] == {
        "active_jobs": 2,
        "jobs_total": 5,
        "spent_usd": 11.0,
        "month_spent_usd": 4.0,  # the 7.0 job is from an earlier month
        "submits_in_window": None,  # no submit limit configured
        "submit_remaining": None,
    }
    settings = state_of(app).settings
    assert body["limits"]["max_jobs_per_request"] == settings.max_jobs_per_request
    assert body["limits"]["max_upload_bytes"] == settings.max_upload_bytes
    assert body["limits"]["job_budget_usd"] == settings.job_budget_usd


async def test_me_without_jobs(make_client: MakeClient) -> None:
    """A caller without jobs has zero usage."""
    viewer = await make_client("new", ["viewer"])
    usage = (await viewer.get("/v1/me")).json()["usage"]
    assert usage == {
        "active_jobs": 0,
        "jobs_total": 0,
        "spent_usd": 0.0,
        "month_spent_usd": 0.0,
        "submits_in_window": None,
        "submit_remaining": None,
    }


async def test_workers_is_admin_only(
    make_client: MakeClient, anon: httpx.AsyncClient, expect_problem: ExpectProblem
) -> None:
    """`/v1/workers` is 401 without a key and 403 for non-admins."""
    expect_problem(await anon.get("/v1/workers"), 401, "unauthenticated")
    user = await make_client("u", ["user"])
    expect_problem(await user.get("/v1/workers"), 403, "forbidden")


async def test_workers_lists_live_workers(app: FastAPI, client: httpx.AsyncClient) -> None:
    """Only workers seen within `worker_lost_after_s` are listed, with RFC 3339 times."""
    lost_after = state_of(app).settings.worker_lost_after_s
    base = {
        "host": "gpu-1",
        "pid": 7,
        "queues": ["gpu"],
        "pipelines": ["steps", "noop"],
        "concurrency": 2,
        "running": 1,
        "version": "0.1.0",
    }
    async with state_of(app).db.write() as conn:
        await conn.execute(
            insert(workers),
            [
                {**base, "id": "live", "started_at": now() - 30, "last_seen_at": now()},
                {
                    **base,
                    "id": "gone",
                    "started_at": now() - 90,
                    "last_seen_at": now() - lost_after - 1,
                },
            ],
        )
    response = await client.get("/v1/workers")
    assert response.status_code == 200
    listed = response.json()["workers"]
    assert [w["id"] for w in listed] == ["live"]
    worker = listed[0]
    assert {
        k: worker[k] for k in ("host", "pid", "queues", "pipelines", "concurrency", "running")
    } == {k: base[k] for k in ("host", "pid", "queues", "pipelines", "concurrency", "running")}
    assert RFC3339.fullmatch(worker["started_at"])
    assert RFC3339.fullmatch(worker["last_seen_at"])


async def test_pipelines_lists_the_builtins(make_client: MakeClient) -> None:
    """`/v1/pipelines` lists the built-in pipelines, each fully described."""
    viewer = await make_client("v", ["viewer"])
    response = await viewer.get("/v1/pipelines")
    assert response.status_code == 200
    pipelines = {p["name"]: p for p in response.json()["pipelines"]}
    assert {"noop", "steps", "text-stats"} <= pipelines.keys()
    steps = pipelines["steps"]
    assert [s["name"] for s in steps["stages"]] == ["prepare", "work", "finish"]
    assert steps["files"] is None
    assert steps["params_schema"]["type"] == "object"
    assert pipelines["text-stats"]["files"]["max_count"] == 20


async def test_one_pipeline(client: httpx.AsyncClient, expect_problem: ExpectProblem) -> None:
    """`/v1/pipelines/{name}` describes one pipeline; an unknown name is 404."""
    response = await client.get("/v1/pipelines/steps")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"name", "version", "description", "params_schema", "files", "stages"}
    work = next(s for s in body["stages"] if s["name"] == "work")
    assert (work["after"], work["retries"], work["map"]) == (["prepare"], 2, False)
    expect_problem(await client.get("/v1/pipelines/nope"), 404, "not-found")


async def test_pipelines_need_credentials(
    anon: httpx.AsyncClient, expect_problem: ExpectProblem
) -> None:
    """Pipelines are listed to authenticated callers only."""
    expect_problem(await anon.get("/v1/pipelines"), 401, "unauthenticated")


async def test_openapi_documents_problems_and_bodies(anon: httpx.AsyncClient) -> None:
    """`/openapi.json` shows the key routes' bodies and their problem answers."""
    spec = (await anon.get("/openapi.json")).json()
    post = spec["paths"]["/v1/api-keys"]["post"]
    assert {"401", "403", "422"} <= post["responses"].keys()
    assert "application/problem+json" in post["responses"]["403"]["content"]
    schemas = spec["components"]["schemas"]
    assert schemas["ApiKeyCreate"]["additionalProperties"] is False
    assert {"Problem", "ApiKeyCreated", "Me", "WorkerList", "PipelineList"} <= schemas.keys()
    assert "/v1/me" in spec["paths"]
    assert "/v1/workers" in spec["paths"]
