"""Every refusal of API.md's error list: its status, its slug, and that nothing was left.

After each refused request, no row was added to jobs, stages, tasks, events, blobs,
blob_grants or idempotency_keys, and no file (not even a temporary one) is in the
blob directory.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from structlog.testing import capture_logs

from tests.api.conftest import AppFactory
from tests.api.helpers import (
    PNG,
    TEXT,
    CountingBody,
    Guard,
    asgi_scope,
    blob_root,
    client_for,
    multipart,
)

Problem = Any


@pytest.fixture
async def guard(app: FastAPI, client: httpx.AsyncClient) -> Guard:
    """A snapshot of the store, taken once the admin client exists."""
    return await Guard(app).start()


@pytest.fixture
async def small_app(app_factory: AppFactory) -> FastAPI:
    """An app with tiny limits: 100 kB per request, 3 jobs per request, 5 parts."""
    return await app_factory(max_upload_bytes=100_000, max_jobs_per_request=3, max_upload_parts=5)


@pytest.fixture
async def small_client(small_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with await client_for(small_app, "user-1") as user:
        yield user


# -- the body's form: 400 --------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        pytest.param(b'{"pipeline": "noop",', "application/json", id="truncated-json"),
        pytest.param(b"not json at all", "application/json", id="not-json"),
        pytest.param(b"", "application/json", id="empty-body"),
        pytest.param(b"   \n", "application/json", id="blank-body"),
        pytest.param(b"\xff\xfe{}", "application/json", id="not-utf8"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "application/json", id="deep-nesting"),
        # Python's json module reads these; they are not JSON (RFC 8259), and no store
        # could keep them.
        pytest.param(b'{"pipeline": "noop", "params": {"x": NaN}}', "application/json", id="nan"),
        pytest.param(
            b'{"pipeline": "noop", "params": {"x": -Infinity}}', "application/json", id="infinity"
        ),
        pytest.param(b'{"pipeline": "noop"} {}', "application/json", id="trailing-data"),
        pytest.param(
            b'{"pipeline": "noop", "params": {"x": 1e400}}', "application/json", id="overflow"
        ),
        pytest.param(b"--B--\r\n", "multipart/form-data; boundary=B", id="empty-multipart"),
        pytest.param(b"", "multipart/form-data; boundary=B", id="empty-multipart-body"),
        pytest.param(b"--B\r\nxx", "multipart/form-data; boundary=B", id="broken-multipart"),
        pytest.param(b"--B--\r\n", "multipart/form-data", id="no-boundary"),
    ],
)
async def test_malformed_bodies_are_400(
    client: httpx.AsyncClient,
    guard: Guard,
    expect_problem: Problem,
    content: bytes,
    content_type: str,
) -> None:
    """Unparseable JSON, an empty body and an empty multipart body are 400."""
    response = await client.post(
        "/v1/jobs", content=content, headers={"Content-Type": content_type}
    )
    expect_problem(response, 400, "malformed-request")
    await guard.check()


async def test_malformed_batch_and_status_bodies_are_400(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem
) -> None:
    """The batch and status routes refuse unparseable JSON the same way."""
    for path in ("/v1/jobs/batch", "/v1/jobs/status"):
        response = await client.post(
            path, content=b"{", headers={"Content-Type": "application/json"}
        )
        expect_problem(response, 400, "malformed-request")
        response = await client.post(path, content=b"")
        expect_problem(response, 400, "malformed-request")
    await guard.check()


async def test_too_many_parts_is_400(
    small_app: FastAPI, small_client: httpx.AsyncClient, expect_problem: Problem
) -> None:
    """More multipart parts than `JOBGATE_MAX_UPLOAD_PARTS` is refused while parsing."""
    guard = await Guard(small_app).start()
    files = [(f"f{i}.txt", f"file {i}\n".encode()) for i in range(8)]
    body, headers = multipart({"pipeline": "text-stats"}, files)
    response = await small_client.post("/v1/jobs", content=body, headers=headers)
    expect_problem(response, 400, "malformed-request")
    await guard.check()


async def test_unsupported_media_type_is_415(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem
) -> None:
    """A body that is neither JSON nor multipart is 415."""
    response = await client.post(
        "/v1/jobs", content=b"pipeline=noop", headers={"Content-Type": "text/plain"}
    )
    expect_problem(response, 415, "unsupported-media-type")
    await guard.check()


# -- the content: 422 ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        pytest.param({}, ["pipeline"], id="missing-pipeline"),
        pytest.param({"pipeline": 5}, ["pipeline"], id="pipeline-not-a-string"),
        pytest.param(
            {"pipeline": "steps", "params": {"steps": 0}}, ["params", "steps"], id="param"
        ),
        pytest.param({"pipeline": "steps", "params": {"nope": 1}}, ["params", "nope"], id="extra"),
        pytest.param({"pipeline": "noop", "params": [1]}, ["params"], id="params-not-object"),
        pytest.param({"pipeline": "noop", "priority": 101}, ["priority"], id="priority-high"),
        pytest.param({"pipeline": "noop", "priority": -101}, ["priority"], id="priority-low"),
        pytest.param({"pipeline": "noop", "priority": "high"}, ["priority"], id="priority-text"),
        pytest.param({"pipeline": "noop", "budget_usd": -1}, ["budget_usd"], id="budget-negative"),
        pytest.param({"pipeline": "noop", "files": ["../etc"]}, ["files", 0], id="bad-sha"),
        pytest.param(
            {"pipeline": "noop", "webhook": {"url": "not a url"}}, ["webhook", "url"], id="webhook"
        ),
        pytest.param(
            {"pipeline": "noop", "webhook": {"url": "http://127.0.0.1:9/x"}},
            ["webhook", "url"],
            id="webhook-loopback",
        ),
        pytest.param(
            {"pipeline": "noop", "webhook": {"url": "http://169.254.169.254/"}},
            ["webhook", "url"],
            id="webhook-link-local",
        ),
        pytest.param(
            {"pipeline": "noop", "webhook": {"url": "https://x.io", "events": ["boom"]}},
            ["webhook", "events", 0],
            id="webhook-event",
        ),
        pytest.param([1, 2], [], id="not-an-object"),
    ],
)
async def test_schema_violations_are_422_with_loc(
    client: httpx.AsyncClient,
    guard: Guard,
    expect_problem: Problem,
    body: Any,
    loc: list[Any],
) -> None:
    """A body that does not match the schema is 422 `validation-error` with `errors[].loc`."""
    problem = expect_problem(await client.post("/v1/jobs", json=body), 422, "validation-error")
    assert problem["errors"][0]["loc"][: len(loc)] == loc
    assert all("input" not in e for e in problem["errors"])
    await guard.check()


@pytest.mark.parametrize("field", ["owner", "status", "cost", "id", "actual_usd", "worker_id"])
async def test_mass_assignment_is_422(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem, field: str
) -> None:
    """Fields a client may not set (`owner`, `status`, `cost`, ...) are refused."""
    body = {"pipeline": "noop", field: "SECRET-VALUE-123"}
    response = await client.post("/v1/jobs", json=body)
    problem = expect_problem(response, 422, "validation-error")
    assert [field] in [e["loc"] for e in problem["errors"]]
    assert "SECRET-VALUE-123" not in response.text
    await guard.check()


async def test_mass_assignment_in_multipart_is_422(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem
) -> None:
    """An unknown multipart field (`owner`) is refused, and the files already read go."""
    body, headers = multipart({"pipeline": "text-stats"}, [("a.txt", TEXT)])
    body = body.replace(
        b"--jobgate-test-boundary--",
        b'--jobgate-test-boundary\r\nContent-Disposition: form-data; name="owner"\r\n\r\n'
        b"someone-else\r\n--jobgate-test-boundary--",
    )
    response = await client.post("/v1/jobs", content=body, headers=headers)
    problem = expect_problem(response, 422, "validation-error")
    assert problem["errors"][0]["loc"] == ["owner"]
    await guard.check()


async def test_bad_multipart_field_values_are_422(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem
) -> None:
    """`params` that is not JSON, or a missing `pipeline`, in a form is 422."""
    cases = [
        ({"pipeline": "text-stats", "params": "{nope"}, ["params"]),
        ({"pipeline": "text-stats", "params": '{"x": NaN}'}, ["params"]),
        ({"pipeline": "text-stats", "params": '{"x": [1e999]}'}, ["params"]),
        ({"params": "{}"}, ["pipeline"]),
        ({"pipeline": "text-stats", "priority": "999"}, ["priority"]),
    ]
    for fields, loc in cases:
        body, headers = multipart(fields, [("a.txt", TEXT)])
        response = await client.post("/v1/jobs", content=body, headers=headers)
        problem = expect_problem(response, 422, "validation-error")
        assert problem["errors"][0]["loc"] == loc
    await guard.check()


async def test_unknown_pipeline_and_version_are_422(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem
) -> None:
    """An unknown pipeline, or an unknown version of a known one, is `unknown-pipeline`."""
    problem = expect_problem(
        await client.post("/v1/jobs", json={"pipeline": "nope"}), 422, "unknown-pipeline"
    )
    assert problem["errors"][0]["loc"] == ["pipeline"]
    problem = expect_problem(
        await client.post("/v1/jobs", json={"pipeline": "noop", "version": "9"}),
        422,
        "unknown-pipeline",
    )
    assert problem["errors"][0]["loc"] == ["version"]
    body, headers = multipart({"pipeline": "nope"}, [("a.txt", TEXT)])
    expect_problem(
        await client.post("/v1/jobs", content=body, headers=headers), 422, "unknown-pipeline"
    )
    await guard.check()


async def test_too_many_or_too_few_files_are_422(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem
) -> None:
    """The pipeline's file count (text-stats: 1 to 20; noop: none) is enforced."""
    expect_problem(
        await client.post("/v1/jobs", json={"pipeline": "text-stats"}), 422, "validation-error"
    )
    files = [(f"f{i}.txt", f"file number {i}\n".encode()) for i in range(21)]
    body, headers = multipart({"pipeline": "text-stats"}, files)
    problem = expect_problem(
        await client.post("/v1/jobs", content=body, headers=headers), 422, "validation-error"
    )
    assert problem["errors"][0]["loc"] == ["files"]
    body, headers = multipart({"pipeline": "noop"}, [("a.txt", TEXT)])
    expect_problem(
        await client.post("/v1/jobs", content=body, headers=headers), 422, "validation-error"
    )
    await guard.check()


async def test_idempotency_key_too_long_is_422(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem
) -> None:
    """An `Idempotency-Key` over 255 characters is 422 `validation-error`."""
    response = await client.post(
        "/v1/jobs", json={"pipeline": "noop"}, headers={"Idempotency-Key": "k" * 256}
    )
    problem = expect_problem(response, 422, "validation-error")
    assert problem["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    await guard.check()


async def test_idempotency_conflict_is_409(
    app: FastAPI, client: httpx.AsyncClient, expect_problem: Problem
) -> None:
    """The same key with a different body is 409 `idempotency-conflict`."""
    headers = {"Idempotency-Key": "k-1"}
    assert (await client.post("/v1/jobs", json={"pipeline": "noop"}, headers=headers)).is_success
    guard = await Guard(app).start()
    response = await client.post(
        "/v1/jobs", json={"pipeline": "noop", "params": {"x": 1}}, headers=headers
    )
    expect_problem(response, 409, "idempotency-conflict")
    body, form_headers = multipart({"pipeline": "text-stats"}, [("new.txt", b"brand new\n")])
    response = await client.post("/v1/jobs", content=body, headers={**form_headers, **headers})
    expect_problem(response, 409, "idempotency-conflict")
    await guard.check()


# -- files: 413, 415 -------------------------------------------------------------------


async def test_file_type_comes_from_the_bytes(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem
) -> None:
    """PNG bytes named `.txt` (declared text/plain) are 415 for a text pipeline."""
    body, headers = multipart({"pipeline": "text-stats"}, [("a.txt", TEXT), ("pic.txt", PNG)])
    response = await client.post("/v1/jobs", content=body, headers=headers)
    problem = expect_problem(response, 415, "unsupported-file-type")
    assert problem["errors"][0]["loc"] == ["files", 1]
    await guard.check()


async def test_uploaded_blob_of_the_wrong_type_is_415(
    client: httpx.AsyncClient, app: FastAPI, expect_problem: Problem
) -> None:
    """A blob uploaded earlier is checked against the rule when a job names it."""
    upload = await client.post("/v1/files", files=[("files", ("pic.txt", PNG, "text/plain"))])
    assert upload.json()["files"][0]["content_type"] == "image/png"
    guard = await Guard(app).start()
    sha = upload.json()["files"][0]["sha256"]
    response = await client.post("/v1/jobs", json={"pipeline": "text-stats", "files": [sha]})
    expect_problem(response, 415, "unsupported-file-type")
    await guard.check()


async def test_oversize_file_is_413(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem
) -> None:
    """A file over the pipeline's `max_bytes` (text-stats: 1 MB) is 413, cut off early."""
    big = b"word " * 220_000
    body, headers = multipart({"pipeline": "text-stats"}, [("a.txt", TEXT), ("big.txt", big)])
    response = await client.post("/v1/jobs", content=body, headers=headers)
    expect_problem(response, 413, "file-too-large")
    await guard.check()


async def test_oversize_file_before_pipeline_field_is_413(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem
) -> None:
    """When `pipeline` comes after the files, the size is checked once it is known."""
    big = b"word " * 220_000
    body = (
        b'--B\r\nContent-Disposition: form-data; name="files"; filename="big.txt"\r\n\r\n'
        + big
        + b'\r\n--B\r\nContent-Disposition: form-data; name="pipeline"\r\n\r\ntext-stats\r\n'
        b"--B--\r\n"
    )
    response = await client.post(
        "/v1/jobs", content=body, headers={"Content-Type": "multipart/form-data; boundary=B"}
    )
    expect_problem(response, 413, "file-too-large")
    await guard.check()


async def test_oversize_request_is_413(
    small_app: FastAPI, small_client: httpx.AsyncClient, expect_problem: Problem
) -> None:
    """A body over `JOBGATE_MAX_UPLOAD_BYTES` is 413, for jobs, files and JSON alike."""
    guard = await Guard(small_app).start()
    files = [("a.txt", TEXT), ("b.txt", b"b" * 60_000), ("c.txt", b"c" * 60_000)]
    body, headers = multipart({"pipeline": "text-stats"}, files)
    response = await small_client.post("/v1/jobs", content=body, headers=headers)
    expect_problem(response, 413, "file-too-large")
    response = await small_client.post("/v1/files", content=body, headers=headers)
    expect_problem(response, 413, "file-too-large")
    response = await small_client.post(
        "/v1/jobs", json={"pipeline": "noop", "params": {"pad": "x" * 120_000}}
    )
    expect_problem(response, 413, "file-too-large")
    await guard.check()


async def test_oversize_text_field_is_413(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem
) -> None:
    """A non-file multipart field over 64 kB is refused while streaming."""
    body, headers = multipart({"pipeline": "text-stats", "params": "x" * 70_000})
    response = await client.post("/v1/jobs", content=body, headers=headers)
    expect_problem(response, 413, "file-too-large")
    await guard.check()


async def test_huge_upload_is_cut_off_without_reading_it(
    app_factory: AppFactory, expect_problem: Problem
) -> None:
    """A 200 MB stream with a 1 MB limit is refused after about 1 MB has been read."""
    app = await app_factory(max_upload_bytes=1_000_000)
    guard = await Guard(app).start()
    body = CountingBody(200_000_000, chunk=64 * 1024)
    async with await client_for(app) as user:
        response = await user.post("/v1/jobs", content=body, headers=body.headers)
        expect_problem(response, 413, "file-too-large")
        assert body.sent < 2_000_000
        files_body = CountingBody(200_000_000, chunk=64 * 1024, pipeline=False)
        response = await user.post("/v1/files", content=files_body, headers=files_body.headers)
        expect_problem(response, 413, "file-too-large")
        assert files_body.sent < 2_000_000
    await guard.check()


async def test_a_json_body_has_its_own_smaller_limit(
    app_factory: AppFactory, expect_problem: Problem
) -> None:
    """A JSON body is parsed whole in memory, so it is held to `JOBGATE_MAX_JSON_BYTES`
    (413), not to the upload limit; a multipart upload of more is still read."""
    app = await app_factory(max_json_bytes=10_000, max_upload_bytes=1_000_000)
    big = {"pipeline": "steps", "params": {"steps": 1}, "metadata": {"x": "y" * 20_000}}
    async with await client_for(app) as user:
        body = expect_problem(await user.post("/v1/jobs", json=big), 413, "file-too-large")
        assert "10000 bytes" in body["detail"]
        expect_problem(
            await user.post("/v1/jobs/batch", json={"jobs": [big]}), 413, "file-too-large"
        )
        small = await user.post("/v1/jobs", json={"pipeline": "steps", "params": {"steps": 1}})
        assert small.status_code == 202, small.text
        upload = await user.post("/v1/files", files=[("files", ("big.txt", b"word " * 40_000))])
        assert upload.status_code == 201, upload.text


async def test_a_route_whose_body_fastapi_reads_stops_at_the_upload_limit(
    app_factory: AppFactory,
) -> None:
    """`POST /v1/api-keys` (a body FastAPI reads whole) is cut off at the upload limit
    (regression: it read a 200 MB stream to its end, into memory)."""
    app = await app_factory(max_upload_bytes=1_000_000)
    body = CountingBody(200_000_000, chunk=64 * 1024)
    async with await client_for(app, "root", ("admin",)) as admin:
        response = await admin.post(
            "/v1/api-keys", content=body, headers={"Content-Type": "application/json"}
        )
    assert response.status_code in (400, 413), response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert body.sent < 2_000_000


async def test_declared_length_over_the_limit_is_refused_before_reading(
    app_factory: AppFactory, expect_problem: Problem
) -> None:
    """A `Content-Length` above the limit is 413 before any byte is read."""
    app = await app_factory(max_upload_bytes=1_000_000)
    body = CountingBody(200_000_000, chunk=64 * 1024)
    headers = {**body.headers, "Content-Length": "200000000"}
    async with await client_for(app) as user:
        response = await user.post("/v1/jobs", content=body, headers=headers)
    expect_problem(response, 413, "file-too-large")
    assert body.sent < 100_000


async def test_filenames_are_sanitised(app: FastAPI, client: httpx.AsyncClient) -> None:
    """Path traversal and control characters never reach a stored name or a path."""
    root = blob_root(app)
    names = ["../../etc/passwd", "..\\..\\win.ini", "a\x00b.txt", "evil\u202etxt.exe", ".."]
    body, headers = multipart({"pipeline": "text-stats"}, [(n, TEXT) for n in names])
    response = await client.post("/v1/jobs", content=body, headers=headers)
    assert response.status_code == 202, response.text
    stored = [f["name"] for f in response.json()["files"]]
    assert stored[0] == "passwd"
    assert stored[1] == "win.ini"
    assert "\x00" not in stored[2]
    assert "\u202e" not in stored[3]
    assert all("/" not in n and "\\" not in n and not n.startswith(".") for n in stored)
    for path in root.parent.rglob("*"):
        assert path.is_relative_to(root) or not path.is_relative_to(root.parent / "etc")
    assert not (root.parent.parent / "etc").exists()


# -- access ----------------------------------------------------------------------------


async def test_other_owners_and_unknown_blobs_are_404(
    app: FastAPI, make_client: Any, expect_problem: Problem
) -> None:
    """A blob the caller may not use is 404, exactly like an unknown one."""
    owner = await make_client("user-1")
    other = await make_client("user-2")
    upload = await owner.post("/v1/files", files=[("files", ("a.txt", TEXT))])
    sha = upload.json()["files"][0]["sha256"]
    guard = await Guard(app).start()
    foreign = await other.post("/v1/jobs", json={"pipeline": "text-stats", "files": [sha]})
    unknown = await other.post(
        "/v1/jobs",
        json={"pipeline": "text-stats", "files": [hashlib.sha256(b"never").hexdigest()]},
    )
    a = expect_problem(foreign, 404, "not-found")
    b = expect_problem(unknown, 404, "not-found")
    assert a["errors"][0]["loc"] == b["errors"][0]["loc"] == ["files", 0]
    assert a["title"] == b["title"]
    await guard.check()


# -- many jobs, budget -----------------------------------------------------------------


async def test_too_many_jobs_in_a_batch_or_status_is_422(
    small_app: FastAPI, small_client: httpx.AsyncClient, expect_problem: Problem
) -> None:
    """More than `JOBGATE_MAX_JOBS_PER_REQUEST` items is 422 `too-many-jobs`."""
    guard = await Guard(small_app).start()
    batch = {"jobs": [{"pipeline": "noop"}] * 4}
    expect_problem(await small_client.post("/v1/jobs/batch", json=batch), 422, "too-many-jobs")
    status = {"ids": ["a", "b", "c", "d"]}
    expect_problem(await small_client.post("/v1/jobs/status", json=status), 422, "too-many-jobs")
    await guard.check()


async def test_batch_is_all_or_nothing_with_located_errors(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem
) -> None:
    """One invalid item refuses the batch; `errors[].loc` starts `["jobs", i, ...]`."""
    batch = {
        "jobs": [
            {"pipeline": "noop"},
            {"pipeline": "steps", "params": {"steps": 0}},
            {"pipeline": "noop", "owner": "x"},
        ]
    }
    problem = expect_problem(
        await client.post("/v1/jobs/batch", json=batch), 422, "validation-error"
    )
    locs = [e["loc"] for e in problem["errors"]]
    assert ["jobs", 2, "owner"] in locs
    batch["jobs"].pop()
    problem = expect_problem(
        await client.post("/v1/jobs/batch", json=batch), 422, "validation-error"
    )
    assert [e["loc"] for e in problem["errors"]] == [["jobs", 1, "params", "steps"]]
    unknown = {"jobs": [{"pipeline": "noop"}, {"pipeline": "nope"}]}
    problem = expect_problem(
        await client.post("/v1/jobs/batch", json=unknown), 422, "unknown-pipeline"
    )
    assert problem["errors"][0]["loc"] == ["jobs", 1, "pipeline"]
    expect_problem(await client.post("/v1/jobs/batch", json={"jobs": []}), 422, "validation-error")
    await guard.check()


async def test_estimate_over_budget_is_422_budget_exceeded(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem
) -> None:
    """A pre-flight estimate over the job's budget is `budget-exceeded` (single and batch)."""
    body = {"pipeline": "steps", "params": {"steps": 10, "cost_per_step": 1.0}, "budget_usd": 5}
    expect_problem(await client.post("/v1/jobs", json=body), 422, "budget-exceeded")
    over_default = {"pipeline": "steps", "params": {"steps": 10000, "cost_per_step": 1.0}}
    expect_problem(await client.post("/v1/jobs", json=over_default), 422, "budget-exceeded")
    batch = {"jobs": [{"pipeline": "noop"}, body]}
    problem = expect_problem(
        await client.post("/v1/jobs/batch", json=batch), 422, "budget-exceeded"
    )
    assert problem["errors"][0]["loc"][:2] == ["jobs", 1]
    await guard.check()


async def test_budget_above_the_maximum_is_a_validation_error(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem
) -> None:
    """`budget_usd` above `JOBGATE_JOB_BUDGET_USD` is 422 `validation-error`."""
    response = await client.post("/v1/jobs", json={"pipeline": "noop", "budget_usd": 2000.01})
    problem = expect_problem(response, 422, "validation-error")
    assert problem["errors"][0]["loc"] == ["budget_usd"]
    await guard.check()


async def test_content_errors_come_before_the_budget(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem
) -> None:
    """An over-budget job with an invalid field is 422 `validation-error` first."""
    body = {
        "pipeline": "steps",
        "params": {"steps": 10, "cost_per_step": 1.0},
        "budget_usd": 5,
        "priority": 500,
    }
    expect_problem(await client.post("/v1/jobs", json=body), 422, "validation-error")
    await guard.check()


# -- list and query parameters ---------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"status": "done"},
        {"created_after": "yesterday"},
        {"created_before": "2026-13-45T00:00:00Z"},
        {"limit": 0},
        {"offset": -1},
    ],
)
async def test_bad_list_parameters_are_422(
    client: httpx.AsyncClient, expect_problem: Problem, params: dict[str, Any]
) -> None:
    """Unknown statuses, unparseable times and negative pages are 422."""
    expect_problem(await client.get("/v1/jobs", params=params), 422, "validation-error")


# -- clients that leave ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/files", "/v1/jobs"])
async def test_a_client_leaving_mid_upload_is_not_a_server_error(
    app: FastAPI, client: httpx.AsyncClient, guard: Guard, path: str
) -> None:
    """A client that disconnects halfway through a file part: no 500, no error log, no
    exception out of the app (the server would log its traceback), nothing left."""
    head = (
        b'--B\r\nContent-Disposition: form-data; name="pipeline"\r\n\r\ntext-stats\r\n'
        if path == "/v1/jobs"
        else b""
    ) + b'--B\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n\r\n'
    scope = asgi_scope(
        "POST",
        path,
        [
            (b"authorization", client.headers["authorization"].encode()),
            (b"content-type", b"multipart/form-data; boundary=B"),
            (b"content-length", b"100000"),
        ],
    )
    messages = [
        {"type": "http.request", "body": head + b"x" * 1000, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if len(messages) > 1 else messages[0]

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with capture_logs() as logs:
        await app(scope, receive, send)
    statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
    assert all(status < 500 for status in statuses)
    assert [e for e in logs if e["log_level"] in ("error", "critical", "exception")] == []
    assert [e for e in logs if e.get("exc_info")] == []
    await guard.check()


@pytest.mark.parametrize("path", ["/v1/files", "/v1/jobs"])
async def test_a_boundary_longer_than_the_parser_takes_is_400(
    client: httpx.AsyncClient, guard: Guard, expect_problem: Problem, path: str
) -> None:
    """A multipart boundary of 257 characters (the parser takes 256) is 400."""
    body, headers = multipart({"pipeline": "text-stats"}, [("a.txt", TEXT)], boundary="a" * 257)
    response = await client.post(path, content=body, headers=headers)
    expect_problem(response, 400, "malformed-request")
    await guard.check()


async def test_integer_query_values_the_store_cannot_bind_are_422(
    client: httpx.AsyncClient, expect_problem: Problem
) -> None:
    """`offset` past 2**63 - 1 and a job's events `after` past 2**31 - 1 (its `seq` is a
    32-bit column) are 422, not 500; the largest allowed values answer 200."""
    job = await client.post("/v1/jobs", json={"pipeline": "noop"})
    job_id = job.json()["id"]
    for path, name, largest in (
        ("/v1/jobs", "offset", 2**63 - 1),
        (f"/v1/jobs/{job_id}/records", "offset", 2**63 - 1),
        (f"/v1/jobs/{job_id}/events", "after", 2**31 - 1),
    ):
        for too_big in (largest + 1, 2**63):
            response = await client.get(path, params={name: str(too_big)})
            problem = expect_problem(response, 422, "validation-error")
            assert problem["errors"][0]["loc"] == ["query", name]
        response = await client.get(path, params={name: str(largest)})
        assert response.status_code == 200, response.text


NUL_REQUESTS = [
    ("GET", "/v1/jobs/%00", None),
    ("GET", "/v1/jobs/%00/events", None),
    ("GET", "/v1/jobs/%00/records?format=csv", None),
    ("GET", "/v1/jobs/%00/artifacts", None),
    ("POST", "/v1/jobs/%00/cancel", None),
    ("POST", "/v1/jobs/%00/retry", None),
    ("GET", "/v1/jobs?pipeline=%00", None),
    ("POST", "/v1/jobs/status", {"ids": ["\u0000"]}),
    (
        "POST",
        "/v1/jobs",
        {"pipeline": "steps", "params": {"steps": 1}, "correlation_id": "a\u0000"},
    ),
    ("POST", "/v1/jobs", {"pipeline": "noop", "params": {"text": "a\u0000b"}}),
]


@pytest.mark.parametrize(("method", "path", "body"), NUL_REQUESTS)
async def test_a_nul_character_anywhere_is_never_a_server_error(
    app: FastAPI, database_url: str, expect_problem: Problem, method: str, path: str, body: Any
) -> None:
    """A NUL (U+0000) in a path, a query or a body is the client's input: on PostgreSQL,
    which cannot store one, 422 `validation-error` (regression: 500 and an error log with
    the SQL); SQLite stores or looks it up as any character (404, 200 or 202)."""
    async with await client_for(app, "nul-sender", ("user", "admin")) as user:
        with capture_logs() as logs:
            response = await user.request(method, path, json=body)
    assert response.status_code < 500, response.text
    assert not [e for e in logs if e["log_level"] == "error"]
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/problem+json")
    if database_url.startswith("postgresql") and response.status_code == 422:
        assert "NUL" in response.json()["detail"] or response.json()["errors"]


async def test_an_api_key_owner_holding_a_nul_is_422(app: FastAPI, expect_problem: Problem) -> None:
    async with await client_for(app, "root", ("admin",)) as admin:
        response = await admin.post("/v1/api-keys", json={"owner": "a\u0000b"})
    expect_problem(response, 422, "validation-error")
