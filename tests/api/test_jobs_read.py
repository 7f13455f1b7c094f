"""Reading jobs: one, many, lists with filters and pages; events; records; cancel; retry."""

from __future__ import annotations

import json
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.ids import now, rfc3339
from jobgate.store import tables
from tests.api.helpers import client_for, state_of


async def _submit(client: httpx.AsyncClient, pipeline: str = "noop", **body: Any) -> str:
    response = await client.post("/v1/jobs", json={"pipeline": pipeline, **body})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def _set(app: FastAPI, job_id: str, **values: Any) -> None:
    async with state_of(app).db.write() as conn:
        await conn.execute(update(tables.jobs).where(tables.jobs.c.id == job_id).values(**values))


async def test_get_returns_the_job(make_client: Any) -> None:
    """`GET /v1/jobs/{id}` shows the caller's job."""
    user = await make_client("user-1")
    job_id = await _submit(user, params={"k": "v"})
    response = await user.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200
    assert response.json()["id"] == job_id
    assert response.json()["params"] == {"k": "v"}


async def test_another_owners_job_is_404_everywhere(make_client: Any, expect_problem: Any) -> None:
    """Another owner's job is answered 404 on every route, like an unknown one."""
    owner = await make_client("user-1")
    other = await make_client("user-2")
    job_id = await _submit(owner)
    for method, path in (
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("POST", f"/v1/jobs/{job_id}/retry"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("GET", f"/v1/jobs/{job_id}/artifacts"),
        ("GET", f"/v1/jobs/{job_id}/artifacts/report.json"),
        ("GET", f"/v1/jobs/{job_id}/download"),
        ("GET", f"/v1/jobs/{job_id}/records"),
        ("GET", "/v1/jobs/no-such-job"),
    ):
        expect_problem(await other.request(method, path), 404, "not-found")


async def test_admin_sees_every_owners_job(client: httpx.AsyncClient, make_client: Any) -> None:
    """Admins read any owner's job."""
    job_id = await _submit(await make_client("user-1"))
    response = await client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200
    assert response.json()["owner"] == "user-1"


async def test_list_is_newest_first_with_total_and_pages(make_client: Any) -> None:
    """`GET /v1/jobs` pages the caller's jobs newest first, with the total."""
    user = await make_client("user-1")
    other = await make_client("user-2")
    ids = [await _submit(user) for _ in range(5)]
    await _submit(other)
    first = (await user.get("/v1/jobs", params={"limit": 2})).json()
    assert first["total"] == 5
    assert (first["limit"], first["offset"]) == (2, 0)
    assert [j["id"] for j in first["jobs"]] == ids[::-1][:2]
    rest = (await user.get("/v1/jobs", params={"limit": 10, "offset": 2})).json()
    assert [j["id"] for j in rest["jobs"]] == ids[::-1][2:]
    default = (await user.get("/v1/jobs")).json()
    assert default["limit"] == 10


async def test_a_limit_above_the_maximum_is_capped(app: FastAPI, make_client: Any) -> None:
    """A `limit` above `JOBGATE_LIST_MAX_LIMIT` is capped, not refused."""
    user = await make_client("user-1")
    response = await user.get("/v1/jobs", params={"limit": 100000})
    assert response.status_code == 200
    assert response.json()["limit"] == state_of(app).settings.list_max_limit


async def test_list_filters_by_status_pipeline_and_time(app: FastAPI, make_client: Any) -> None:
    """`status` (repeatable), `pipeline`, `created_after` and `created_before` filter."""
    user = await make_client("user-1")
    a = await _submit(user, "noop")
    b = await _submit(user, "steps")
    c = await _submit(user, "noop")
    await _set(app, a, status="failed", created_at=1_000.0)
    await _set(app, b, status="succeeded", created_at=2_000.0)
    await _set(app, c, created_at=3_000.0)

    async def ids(**params: Any) -> list[str]:
        response = await user.get("/v1/jobs", params=params)
        assert response.status_code == 200, response.text
        return [j["id"] for j in response.json()["jobs"]]

    assert await ids(status=["failed", "succeeded"]) == [b, a]
    assert await ids(status="queued") == [c]
    assert await ids(pipeline="noop") == [c, a]
    assert await ids(created_after=rfc3339(1_500.0)) == [c, b]
    assert await ids(created_before=rfc3339(2_500.0)) == [b, a]
    assert await ids(created_after=rfc3339(1_500.0), created_before="1970-01-01T00:41:40Z") == [b]


async def test_admin_may_filter_by_owner_but_users_may_not(
    client: httpx.AsyncClient, make_client: Any, expect_problem: Any
) -> None:
    """`owner` narrows an admin's list; from a non-admin it is 403."""
    user = await make_client("user-1")
    await _submit(user)
    await _submit(await make_client("user-2"))
    listed = (await client.get("/v1/jobs", params={"owner": "user-1"})).json()
    assert listed["total"] == 1
    assert listed["jobs"][0]["owner"] == "user-1"
    assert (await client.get("/v1/jobs")).json()["total"] == 2
    expect_problem(await user.get("/v1/jobs", params={"owner": "user-1"}), 403, "forbidden")


async def test_status_batch_reports_missing_and_foreign_ids(make_client: Any) -> None:
    """`POST /v1/jobs/status` returns found jobs in order; others' ids are not_found."""
    user = await make_client("user-1")
    mine = [await _submit(user), await _submit(user)]
    theirs = await _submit(await make_client("user-2"))
    response = await user.post("/v1/jobs/status", json={"ids": [mine[1], theirs, "nope", mine[0]]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [j["id"] for j in body["jobs"]] == [mine[1], mine[0]]
    assert body["not_found"] == [theirs, "nope"]


async def test_viewer_reads_but_cannot_cancel(make_client: Any, expect_problem: Any) -> None:
    """A viewer reads its own jobs; cancel and retry are 403."""
    user_key_client = await make_client("shared", ["user"])
    job_id = await _submit(user_key_client)
    viewer = await make_client("shared", ["viewer"])
    assert (await viewer.get(f"/v1/jobs/{job_id}")).status_code == 200
    assert (await viewer.get("/v1/jobs")).json()["total"] == 1
    expect_problem(await viewer.post(f"/v1/jobs/{job_id}/cancel"), 403, "forbidden")
    expect_problem(await viewer.post(f"/v1/jobs/{job_id}/retry"), 403, "forbidden")


async def test_cancel_then_retry(
    client: httpx.AsyncClient, expect_problem: Any, app: FastAPI
) -> None:
    """Cancel queued: 200 cancelled; again: 409; retry: 202 queued; retry again: 409."""
    calls: list[int] = []
    state_of(app).wake = lambda: calls.append(1)
    job_id = await _submit(client, "steps")
    cancelled = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    expect_problem(await client.post(f"/v1/jobs/{job_id}/cancel"), 409, "conflict")
    retried = await client.post(f"/v1/jobs/{job_id}/retry")
    assert retried.status_code == 202, retried.text
    assert retried.json()["status"] == "queued"
    assert retried.json()["stages"][0]["status"] == "queued"
    assert calls == [1, 1]
    expect_problem(await client.post(f"/v1/jobs/{job_id}/retry"), 409, "conflict")


async def test_a_retried_job_keeps_its_place_by_the_configured_priority_aging(
    app_factory: Any,
) -> None:
    """With `JOBGATE_PRIORITY_AGING_S=1000`, a retried priority-5 job is queued 5,000 s
    early, as it was when submitted, not by the default aging."""
    app = await app_factory(priority_aging_s=1000.0)
    async with await client_for(app, roles=("admin",)) as client:
        job_id = await _submit(client, "steps", priority=5)

        async def claim_order() -> float:
            async with state_of(app).db.read() as conn:
                fair_key = await conn.scalar(
                    select(tables.jobs.c.fair_key).where(tables.jobs.c.id == job_id)
                )
                sort_key = await conn.scalar(
                    select(tables.tasks.c.sort_key).where(tables.tasks.c.job_id == job_id)
                )
            return float(fair_key - sort_key)

        assert await claim_order() == 5000.0
        assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
        retried = await client.post(f"/v1/jobs/{job_id}/retry")
        assert retried.status_code == 202, retried.text
        assert await claim_order() == 5000.0


async def test_cancel_of_a_running_job_is_202_and_flags_it(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """A job with a running task gets `cancel_requested` (202), and 202 again after."""
    job_id = await _submit(client, "steps")
    async with state_of(app).db.write() as conn:
        await conn.execute(
            update(tables.tasks)
            .where(tables.tasks.c.job_id == job_id)
            .values(lease_token="t", leased_by="w", lease_expires_at=now() + 60)
        )
    await _set(app, job_id, status="running")
    first = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert first.status_code == 202, first.text
    assert first.json()["cancel_requested"] is True
    assert first.json()["status"] == "running"
    second = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert second.status_code == 202


async def test_events_page_after_and_limit(client: httpx.AsyncClient, expect_problem: Any) -> None:
    """`GET .../events` pages stored events by `seq`; with SSE asked for, it streams."""
    job_id = await _submit(client, "steps")
    await client.post(f"/v1/jobs/{job_id}/cancel")
    events = (await client.get(f"/v1/jobs/{job_id}/events")).json()["events"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "stage_update"
    assert events[0]["data"] == {"stage": "prepare", "status": "queued", "attempt": 0}
    assert events[-1]["type"] == "cancelled"
    assert events[0]["created_at"].endswith("Z")
    page = (await client.get(f"/v1/jobs/{job_id}/events", params={"after": 1, "limit": 1})).json()
    assert [e["seq"] for e in page["events"]] == [2]
    capped = await client.get(f"/v1/jobs/{job_id}/events", params={"limit": 5000})
    assert capped.status_code == 200
    sse = await client.get(f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"})
    assert sse.headers["content-type"].startswith("text/event-stream")
    # A finished job's fresh stream: its state, then the end.
    assert sse.text.startswith(f"id: {events[-1]['seq']}\nevent: state\ndata: {{")
    assert sse.text.count("event: ") == 1


async def _add_records(app: FastAPI, job_id: str) -> None:
    rows = [
        {
            "job_id": job_id,
            "stage": "count",
            "item_index": i,
            "key": f"f{i}.txt",
            "status": "succeeded" if i % 2 == 0 else "failed",
            "data": {"lines": i} if i % 2 == 0 else None,
            "error": None if i % 2 == 0 else {"type": "stage_failed", "message": "bad utf-8"},
            "attempt": 1,
            "created_at": now(),
        }
        for i in range(5)
    ]
    async with state_of(app).db.write() as conn:
        await conn.execute(insert(tables.records), rows)


async def test_records_page_and_filter(app: FastAPI, client: httpx.AsyncClient) -> None:
    """`GET .../records` pages records; `status=` filters them."""
    job_id = await _submit(client)
    await _add_records(app, job_id)
    page = (await client.get(f"/v1/jobs/{job_id}/records", params={"limit": 2})).json()
    assert page["total"] == 5
    assert [r["key"] for r in page["records"]] == ["f0.txt", "f1.txt"]
    assert page["records"][0] == {
        "key": "f0.txt",
        "stage": "count",
        "status": "succeeded",
        "data": {"lines": 0},
        "error": None,
    }
    failed = (await client.get(f"/v1/jobs/{job_id}/records", params={"status": "failed"})).json()
    assert [r["key"] for r in failed["records"]] == ["f1.txt", "f3.txt"]
    assert failed["total"] == 2


async def test_records_stream_as_csv_and_jsonl(app: FastAPI, client: httpx.AsyncClient) -> None:
    """`format=csv` and `format=jsonl` stream every record."""
    job_id = await _submit(client)
    await _add_records(app, job_id)
    as_csv = await client.get(f"/v1/jobs/{job_id}/records", params={"format": "csv"})
    assert as_csv.headers["content-type"].startswith("text/csv")
    lines = as_csv.text.strip().split("\n")
    assert lines[0] == "key,stage,status,data,error"
    assert len(lines) == 6
    assert lines[1].startswith("f0.txt,count,succeeded,")
    as_jsonl = await client.get(f"/v1/jobs/{job_id}/records", params={"format": "jsonl"})
    assert as_jsonl.headers["content-type"].startswith("application/x-ndjson")
    records = [json.loads(line) for line in as_jsonl.text.splitlines()]
    assert [r["key"] for r in records] == [f"f{i}.txt" for i in range(5)]


async def test_a_list_total_agrees_with_its_page_while_jobs_are_created(
    make_client: Any, monkeypatch: Any
) -> None:
    """A job committed while a list is being read is in both the page and `total`, or in
    neither (regression on PostgreSQL: `total` and the page were two statements, two
    snapshots, and a client paging until `offset >= total` could stop short)."""
    user, other = await make_client("pager"), await make_client("pager")
    for _ in range(3):
        await _submit(user)
    real_execute = AsyncConnection.execute
    armed: list[bool] = []

    async def execute_then_submit(
        self: AsyncConnection, statement: Any, *args: Any, **kw: Any
    ) -> Any:
        result = await real_execute(self, statement, *args, **kw)
        if armed and "FROM jobs" in str(statement) and "count(" in str(statement):
            armed.clear()  # once: right after the list's first statement
            await _submit(other)
        return result

    monkeypatch.setattr(AsyncConnection, "execute", execute_then_submit)
    armed.append(True)
    page = (await user.get("/v1/jobs", params={"limit": 10})).json()
    assert not armed  # the submit did happen mid-list
    assert page["total"] == len(page["jobs"])
    monkeypatch.undo()
    assert (await user.get("/v1/jobs")).json()["total"] == 4
