"""Submitting jobs: JSON, multipart, uploaded files, batches, idempotency, priority."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from typing import Any
from unittest.mock import patch

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update

from jobgate.store import tables
from jobgate.store.repositories import jobs as job_repo
from tests.api.conftest import AppFactory
from tests.api.helpers import TEXT, blob_root, multipart, snapshot, state_of
from tests.api.sse import signed_in
from tests.waiting import idle


async def _job_row(app: FastAPI, job_id: str) -> Any:
    async with state_of(app).db.read() as conn:
        return (
            (await conn.execute(select(tables.jobs).where(tables.jobs.c.id == job_id)))
            .mappings()
            .one()
        )


async def test_json_submit_answers_202_with_the_job_and_location(
    app: FastAPI, make_client: Any
) -> None:
    """A JSON submit creates a queued job owned by the caller, with `Location`."""
    user = await make_client("user-1")
    response = await user.post("/v1/jobs", json={"pipeline": "steps", "params": {"steps": 3}})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["owner"] == "user-1"
    assert job["status"] == "queued"
    assert job["pipeline"] == "steps"
    assert job["pipeline_version"] == "1"
    assert job["params"]["steps"] == 3
    assert job["params"]["step_ms"] == 200
    assert [s["name"] for s in job["stages"]] == ["prepare", "work", "finish"]
    assert [s["status"] for s in job["stages"]] == ["queued", "pending", "pending"]
    assert job["priority"] == 0
    assert job["cost"] == {"estimated_usd": 0.0, "actual_usd": 0.0, "budget_usd": 2000.0}
    assert job["links"] == {
        "self": f"/v1/jobs/{job['id']}",
        "events": f"/v1/jobs/{job['id']}/events",
        "artifacts": f"/v1/jobs/{job['id']}/artifacts",
        "cancel": f"/v1/jobs/{job['id']}/cancel",
    }
    assert job["created_at"].endswith("Z")
    assert job["started_at"] is None


async def test_submit_wakes_in_process_workers(app: FastAPI, client: httpx.AsyncClient) -> None:
    """After the commit, `state.wake()` is called so a local worker starts at once."""
    calls: list[int] = []
    state_of(app).wake = lambda: calls.append(1)
    response = await client.post("/v1/jobs", json={"pipeline": "noop"})
    assert response.status_code == 202
    assert calls == [1]


async def test_priority_budget_and_estimate_are_stored(client: httpx.AsyncClient) -> None:
    """`priority`, `budget_usd` and the pipeline's estimate show up on the job."""
    response = await client.post(
        "/v1/jobs",
        json={
            "pipeline": "steps",
            "params": {"steps": 4, "cost_per_step": 0.5},
            "priority": 100,
            "budget_usd": 10,
        },
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["priority"] == 100
    assert job["cost"] == {"estimated_usd": 2.0, "actual_usd": 0.0, "budget_usd": 10.0}


async def test_correlation_id_comes_from_the_header_or_the_body(
    client: httpx.AsyncClient,
) -> None:
    """`X-Correlation-ID` is stored on the job; a body `correlation_id` wins over it."""
    from_header = await client.post(
        "/v1/jobs", json={"pipeline": "noop"}, headers={"X-Correlation-ID": "trace-123"}
    )
    assert from_header.json()["correlation_id"] == "trace-123"
    from_body = await client.post(
        "/v1/jobs",
        json={"pipeline": "noop", "correlation_id": "body-9"},
        headers={"X-Correlation-ID": "trace-123"},
    )
    assert from_body.json()["correlation_id"] == "body-9"


async def test_webhook_is_accepted_and_stored(app: FastAPI, client: httpx.AsyncClient) -> None:
    """A webhook `{url, events}` is validated and kept on the job row."""
    response = await client.post(
        "/v1/jobs",
        json={
            "pipeline": "noop",
            "webhook": {"url": "https://hooks.example.com/jobgate", "events": ["completed"]},
        },
    )
    assert response.status_code == 202, response.text
    row = await _job_row(app, response.json()["id"])
    assert row["webhook"] == {"url": "https://hooks.example.com/jobgate", "events": ["completed"]}


async def test_multipart_submit_streams_files_and_sniffs_types(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """Multipart parts become the job's files: hashed, sized, typed from their bytes."""
    csv_bytes = b"a,b\n1,2\n"
    response = await client.post(
        "/v1/jobs",
        data={"pipeline": "text-stats", "params": '{"top": 3}', "priority": "7"},
        files=[
            ("files", ("notes.txt", TEXT, "image/png")),
            ("files", ("table.csv", csv_bytes, "application/octet-stream")),
        ],
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["params"] == {"top": 3}
    assert job["priority"] == 7
    assert job["files"] == [
        {
            "name": "notes.txt",
            "sha256": hashlib.sha256(TEXT).hexdigest(),
            "size": len(TEXT),
            "content_type": "text/plain",
        },
        {
            "name": "table.csv",
            "sha256": hashlib.sha256(csv_bytes).hexdigest(),
            "size": len(csv_bytes),
            "content_type": "text/csv",
        },
    ]
    assert job["records"] == {"succeeded": 0, "failed": 0, "expected": 2}
    stored = state_of(app).blobs.local_path(hashlib.sha256(TEXT).hexdigest())
    assert stored is not None
    assert stored.read_bytes() == TEXT


async def test_multipart_fields_may_follow_the_files(client: httpx.AsyncClient) -> None:
    """`pipeline` may come after the files; the rule is then checked afterwards."""
    body = (
        b'--B\r\nContent-Disposition: form-data; name="files"; filename="a.md"\r\n\r\n'
        b'# title\r\n--B\r\nContent-Disposition: form-data; name="pipeline"\r\n\r\n'
        b"text-stats\r\n--B--\r\n"
    )
    response = await client.post(
        "/v1/jobs", content=body, headers={"Content-Type": "multipart/form-data; boundary=B"}
    )
    assert response.status_code == 202, response.text
    assert response.json()["files"][0]["content_type"] == "text/markdown"


async def test_uploaded_files_can_be_named_by_sha256(make_client: Any) -> None:
    """`POST /v1/files` stores files (201); a JSON submit then names them by hash."""
    user = await make_client("user-1")
    upload = await user.post(
        "/v1/files",
        files=[("files", ("one.txt", TEXT, "text/plain")), ("files", ("two.txt", b"x y\n"))],
    )
    assert upload.status_code == 201, upload.text
    uploaded = upload.json()["files"]
    assert uploaded[0] == {
        "sha256": hashlib.sha256(TEXT).hexdigest(),
        "size": len(TEXT),
        "content_type": "text/plain",
        "name": "one.txt",
    }
    response = await user.post(
        "/v1/jobs",
        json={
            "pipeline": "text-stats",
            "files": [uploaded[0]["sha256"], {"sha256": uploaded[1]["sha256"], "name": "b.txt"}],
        },
    )
    assert response.status_code == 202, response.text
    files = response.json()["files"]
    assert [f["sha256"] for f in files] == [u["sha256"] for u in uploaded]
    assert files[1]["name"] == "b.txt"
    assert files[1]["size"] == 4


async def test_the_type_of_shared_bytes_follows_each_owners_name_not_the_first_upload(
    make_client: Any,
) -> None:
    """Alice uploads plain text as `page.html`; Bob uploads the same bytes as `notes.txt`
    (201, text/plain) and submits them by hash under that name: text/plain, accepted
    (regression: the first upload's `.html` type stuck to the bytes for every owner, and
    Bob's job was 415). A name given in the submit narrows the type as an upload's does."""
    content = b"plain words, " + os.urandom(4).hex().encode() + b"\n"
    alice, bob = await make_client("alice"), await make_client("bob")
    first = await alice.post("/v1/files", files=[("files", ("page.html", content))])
    assert first.json()["files"][0]["content_type"] == "text/html"
    upload = await bob.post("/v1/files", files=[("files", ("notes.txt", content))])
    assert upload.json()["files"][0]["content_type"] == "text/plain"
    sha256 = upload.json()["files"][0]["sha256"]
    job = await bob.post(
        "/v1/jobs",
        json={"pipeline": "text-stats", "files": [{"sha256": sha256, "name": "notes.txt"}]},
    )
    assert job.status_code == 202, job.text
    assert job.json()["files"][0]["content_type"] == "text/plain"
    as_csv = await bob.post(
        "/v1/jobs",
        json={"pipeline": "text-stats", "files": [{"sha256": sha256, "name": "t.csv"}]},
    )
    assert as_csv.json()["files"][0]["content_type"] == "text/csv"
    as_html = await alice.post(
        "/v1/jobs",
        json={"pipeline": "text-stats", "files": [{"sha256": sha256, "name": "page.html"}]},
    )
    assert as_html.status_code == 415


async def test_same_bytes_are_stored_once(app: FastAPI, make_client: Any) -> None:
    """Uploading identical bytes twice (even by two owners) keeps one blob and one file."""
    before = await snapshot(app)
    for owner in ("user-1", "user-2"):
        user = await make_client(owner)
        response = await user.post("/v1/files", files=[("files", ("same.txt", TEXT))])
        assert response.status_code == 201
    after = await snapshot(app)
    assert after["blobs"] == before["blobs"] + 1
    assert after["blob_grants"] == before["blob_grants"] + 2
    new_files = [f for f in after["files"] if f not in before["files"]]
    assert len(new_files) == 1
    assert not any(f.startswith("tmp/") for f in after["files"])


async def test_a_job_grants_its_owner_its_input_files(make_client: Any) -> None:
    """Files of one of your jobs can be reused by hash in another job."""
    user = await make_client("user-1")
    first = await user.post(
        "/v1/jobs", data={"pipeline": "text-stats"}, files=[("files", ("a.txt", TEXT))]
    )
    sha = first.json()["files"][0]["sha256"]
    again = await user.post("/v1/jobs", json={"pipeline": "text-stats", "files": [sha]})
    assert again.status_code == 202, again.text


async def test_batch_creates_every_job_in_order(client: httpx.AsyncClient) -> None:
    """`POST /v1/jobs/batch` answers 202 with the jobs in the order given."""
    response = await client.post(
        "/v1/jobs/batch",
        json={
            "jobs": [
                {"pipeline": "noop", "params": {"n": 1}},
                {"pipeline": "steps", "priority": -5},
                {"pipeline": "noop", "params": {"n": 3}},
            ]
        },
    )
    assert response.status_code == 202, response.text
    jobs = response.json()["jobs"]
    assert [j["pipeline"] for j in jobs] == ["noop", "steps", "noop"]
    assert jobs[0]["params"] == {"n": 1}
    assert jobs[1]["priority"] == -5
    assert len({j["id"] for j in jobs}) == 3


async def test_idempotency_key_replays_the_first_job(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """The same key and body from the same owner returns the first job with 200."""
    body = {"pipeline": "noop", "params": {"x": 1}}
    headers = {"Idempotency-Key": "order-42"}
    first = await client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 202
    before = await snapshot(app)
    second = await client.post("/v1/jobs", json=body, headers=headers)
    assert second.status_code == 200, second.text
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["location"] == first.headers["location"]
    assert await snapshot(app) == before


async def test_idempotency_keys_are_per_owner(make_client: Any) -> None:
    """Another owner's identical key is independent."""
    body = {"pipeline": "noop"}
    headers = {"Idempotency-Key": "shared-key"}
    one = await (await make_client("user-1")).post("/v1/jobs", json=body, headers=headers)
    two = await (await make_client("user-2")).post("/v1/jobs", json=body, headers=headers)
    assert one.status_code == two.status_code == 202
    assert one.json()["id"] != two.json()["id"]


async def test_idempotency_key_expires_after_its_ttl(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """After `idempotency_ttl_s` the key creates a new job."""
    headers = {"Idempotency-Key": "old-key"}
    first = await client.post("/v1/jobs", json={"pipeline": "noop"}, headers=headers)
    ttl = state_of(app).settings.idempotency_ttl_s
    async with state_of(app).db.write() as conn:
        await conn.execute(
            update(tables.idempotency_keys).values(
                created_at=tables.idempotency_keys.c.created_at - ttl - 1
            )
        )
    second = await client.post("/v1/jobs", json={"pipeline": "noop"}, headers=headers)
    assert second.status_code == 202
    assert second.json()["id"] != first.json()["id"]


async def test_idempotent_multipart_replay(app: FastAPI, client: httpx.AsyncClient) -> None:
    """A multipart submit replayed with its key returns the first job; nothing new is kept."""
    body, headers = multipart({"pipeline": "text-stats"}, [("a.txt", TEXT)])
    headers["Idempotency-Key"] = "upload-1"
    first = await client.post("/v1/jobs", content=body, headers=headers)
    assert first.status_code == 202, first.text
    before = await snapshot(app)
    second = await client.post("/v1/jobs", content=body, headers=headers)
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert await snapshot(app) == before


async def test_idempotent_batch_replay(client: httpx.AsyncClient) -> None:
    """A batch replayed with its key returns the same jobs with 200."""
    body = {"jobs": [{"pipeline": "noop"}, {"pipeline": "noop"}]}
    headers = {"Idempotency-Key": "batch-1"}
    first = await client.post("/v1/jobs/batch", json=body, headers=headers)
    second = await client.post("/v1/jobs/batch", json=body, headers=headers)
    assert (first.status_code, second.status_code) == (202, 200)
    assert [j["id"] for j in second.json()["jobs"]] == [j["id"] for j in first.json()["jobs"]]


async def test_viewer_may_not_submit(make_client: Any, expect_problem: Any) -> None:
    """A viewer's submit is 403, before the body is even read."""
    viewer = await make_client("viewer-1", ["viewer"])
    response = await viewer.post("/v1/jobs", content=b"{not json")
    expect_problem(response, 403, "forbidden")


async def test_unauthenticated_comes_before_a_malformed_body(
    anon: httpx.AsyncClient, expect_problem: Any
) -> None:
    """Authentication (401) is checked before the body's form (400)."""
    response = await anon.post("/v1/jobs", content=b"{not json")
    expect_problem(response, 401, "unauthenticated")


async def test_openapi_documents_the_job_routes(client: httpx.AsyncClient) -> None:
    """`/openapi.json` shows both submit bodies, the Job answer and problem answers."""
    spec = (await client.get("/openapi.json")).json()
    submit = spec["paths"]["/v1/jobs"]["post"]
    content = submit["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= content.keys()
    assert "webhook" in content["application/json"]["schema"]["properties"]
    assert "202" in submit["responses"]
    assert "application/problem+json" in submit["responses"]["422"]["content"]
    for route in (submit, spec["paths"]["/v1/jobs/batch"]["post"]):
        (header,) = route["parameters"]
        assert (header["name"], header["in"], header["required"]) == (
            "Idempotency-Key",
            "header",
            False,
        )
    for path in (
        "/v1/jobs/batch",
        "/v1/jobs/status",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/retry",
        "/v1/jobs/{job_id}/records",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/artifacts",
        "/v1/jobs/{job_id}/download",
        "/v1/files",
        "/v1/blobs/{sha256}",
    ):
        assert path in spec["paths"], path
    assert "Job" in spec["components"]["schemas"]


async def test_blob_directory_has_no_temp_files_after_uploads(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """Accepted uploads leave no `*.part` file behind."""
    await client.post("/v1/jobs", data={"pipeline": "text-stats"}, files=[("files", ("a", TEXT))])
    assert not list(blob_root(app).rglob("*.part"))


async def test_concurrent_requests_with_one_key_create_one_job(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """Racing requests with the same key: one job; every answer names it."""
    headers = {"Idempotency-Key": "race"}
    responses = await asyncio.gather(
        *(client.post("/v1/jobs", json={"pipeline": "noop"}, headers=headers) for _ in range(5))
    )
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 200, 202]
    assert len({r.json()["id"] for r in responses}) == 1
    assert (await snapshot(app))["jobs"] == 1


async def test_version_may_be_given_as_a_number(client: httpx.AsyncClient) -> None:
    """`"version": 1` names version "1"."""
    response = await client.post("/v1/jobs", json={"pipeline": "noop", "version": 1})
    assert response.status_code == 202, response.text
    assert response.json()["pipeline_version"] == "1"


@pytest.mark.service("postgres")
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_an_idle_server_starts_idempotent_submits_in_their_transaction(
    app_factory: AppFactory, make_key: Any
) -> None:
    """A submit with an Idempotency-Key is written in a transaction of several
    statements; on an idle `serve` its job still starts in it (202 running). Two
    concurrent submits of one key make one job, and its stage runs once: the loser's
    rolled-back rows are never run, though they were written leased to the worker."""
    # No fair-share clock: its row would serialise the two transactions (the first to
    # write would win), where here the one on a loan must lose.
    app = await app_factory(worker_concurrency=4, fair_share_stride_s=0)
    worker = state_of(app).submits.lender
    assert worker is not None
    launched: list[str] = []
    launch = worker._launch  # type: ignore[attr-defined]

    def counted(task: Any) -> None:
        launched.append(task.job_id)
        launch(task)

    worker._launch = counted  # type: ignore[attr-defined]
    lent: dict[str, bool] = {}  # job id -> written on a loan
    create = job_repo.create
    both_written = asyncio.Event()

    async def slowed_create(*args: Any, **kwargs: Any) -> Any:
        snapshots = await create(*args, **kwargs)
        loan = kwargs.get("loan")
        lent.update((s.job["id"], loan is not None) for s in snapshots)
        if len(lent) == 2:
            # The first of the racing pair waits, uncommitted, for the other to write
            # its rows too: otherwise a loaded machine may serve the two one after the
            # other, and the second would only replay the first.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(both_written.wait(), 5)
        elif len(lent) == 3:
            both_written.set()
        if loan is not None and len(lent) > 1:
            # Hold the loan's transaction open: the other submit (the worker has no
            # slot left to lend it) commits the key first, and this one rolls back.
            await asyncio.sleep(1.0)
        return snapshots

    _, key = await make_key("user-1", ["user"])
    body = {"pipeline": "noop", "params": {}}
    with patch.object(job_repo, "create", slowed_create):
        async with signed_in(app, key) as user:
            await idle(worker)  # type: ignore[arg-type]
            first = await user.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
            assert first.status_code == 202, first.text
            assert first.json()["status"] == "running"
            again = await user.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
            assert again.status_code == 200
            assert again.json()["id"] == first.json()["id"]

            await idle(worker)  # type: ignore[arg-type]
            both = await asyncio.gather(
                *(
                    user.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-2"})
                    for _ in range(2)
                )
            )
            await asyncio.sleep(0.5)  # time for a wrongly launched stage to run
    (winner,) = {answer.json()["id"] for answer in both}
    assert sorted(answer.status_code for answer in both) == [200, 202]
    losers = [job_id for job_id in lent if job_id not in (first.json()["id"], winner)]
    assert len(losers) == 1, "the two submits did not race"
    assert lent[losers[0]], "the loser had no loan: its rows were never leased"
    assert sorted(launched) == sorted([first.json()["id"], winner])
    async with state_of(app).db.read() as conn:
        statuses = (await conn.execute(select(tables.jobs.c.id, tables.jobs.c.status))).all()
    assert {status for _, status in statuses} == {"succeeded"}
    assert len(statuses) == 2


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [
        (b"filename*=UTF-8''caf%C3%A9.txt", "café.txt"),
        (b"filename*=ISO-8859-1'fr'caf%E9.txt", "café.txt"),
        (b"filename=\"fallback.txt\"; filename*=UTF-8''r%C3%A9el.txt", "réel.txt"),
        (b'filename="plain.txt"', "plain.txt"),
    ],
)
async def test_rfc_5987_file_names_are_decoded_in_their_charset(
    make_client: Any, disposition: bytes, expected: str
) -> None:
    """`filename*` is decoded in the charset it names (regression: ISO-8859-1 was read
    as UTF-8, giving U+FFFD), and wins over a plain `filename` (RFC 6266)."""
    user = await make_client("names")
    body = (
        b'--B\r\nContent-Disposition: form-data; name="files"; '
        + disposition
        + b"\r\n\r\nsome text\r\n--B--\r\n"
    )
    upload = await user.post(
        "/v1/files", content=body, headers={"Content-Type": "multipart/form-data; boundary=B"}
    )
    assert upload.status_code == 201, upload.text
    assert upload.json()["files"][0]["name"] == expected


async def test_an_empty_file_input_is_no_file(make_client: Any) -> None:
    """A part with an empty file name and no bytes is what a browser sends for a file
    input left empty: it is no file (regression: a 0-byte file named `file`, which a
    text pipeline accepted). An empty file that has a name is still a file."""
    user = await make_client("forms")
    empty_input = b'--B\r\nContent-Disposition: form-data; name="files"; filename=""\r\n\r\n\r\n'
    real = b'--B\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n\r\nwords\r\n'
    pipeline = b'--B\r\nContent-Disposition: form-data; name="pipeline"\r\n\r\ntext-stats\r\n'
    headers = {"Content-Type": "multipart/form-data; boundary=B"}
    both = await user.post("/v1/files", content=real + empty_input + b"--B--\r\n", headers=headers)
    assert both.status_code == 201, both.text
    assert [f["name"] for f in both.json()["files"]] == ["a.txt"]
    only_empty = await user.post(
        "/v1/jobs", content=pipeline + empty_input + b"--B--\r\n", headers=headers
    )
    assert only_empty.status_code == 422, only_empty.text
    named = b'--B\r\nContent-Disposition: form-data; name="files"; filename="e.txt"\r\n\r\n\r\n'
    kept = await user.post("/v1/files", content=named + b"--B--\r\n", headers=headers)
    assert kept.status_code == 201, kept.text
    assert kept.json()["files"][0]["size"] == 0
