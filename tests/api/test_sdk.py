"""The SDK's `AsyncClient` against an in-process app (`httpx.ASGITransport`), no mocks:
submits with files, batches, paging, cancel and retry, wait, records, downloads, errors."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from jobgate.client import (
    AsyncClient,
    ConflictError,
    FileInfo,
    ForbiddenError,
    InvalidRequestError,
    Job,
    JobSpec,
    NotFoundError,
    RateLimitedError,
    UnauthorizedError,
)
from tests.api.conftest import AppFactory, MakeKey

MakeSdk = Callable[..., Awaitable[AsyncClient]]


@pytest.fixture
async def make_sdk(make_key: MakeKey) -> AsyncIterator[Callable[..., Awaitable[AsyncClient]]]:
    """SDK clients of an app, signed in with a new key (or with `key`)."""
    async with AsyncExitStack() as stack:

        async def make(
            app: FastAPI, owner: str = "user-1", roles: tuple[str, ...] = ("user",), **kw: Any
        ) -> AsyncClient:
            key = kw.pop("key", None)
            if key is None:
                _, key = await make_key(owner, roles)
            client = AsyncClient("http://test", key, transport=httpx.ASGITransport(app=app), **kw)
            return await stack.enter_async_context(client)

        yield make


@pytest.fixture
async def sdk(app: FastAPI, make_sdk: MakeSdk) -> AsyncClient:
    """A user's SDK client of the default app (no worker)."""
    return await make_sdk(app)


async def test_submit_get_and_status(sdk: AsyncClient) -> None:
    """A JSON submit answers a typed Job, which `get` and `status` read back."""
    job = await sdk.submit(
        "steps", {"steps": 2}, priority=5, budget_usd=10, correlation_id="c-1", version="1"
    )
    assert isinstance(job, Job)
    assert (job.status, job.priority, job.correlation_id) == ("queued", 5, "c-1")
    assert job.cost.budget_usd == 10
    assert [s.name for s in job.stages] == ["prepare", "work", "finish"]
    assert (await sdk.get(job.id)).id == job.id
    found = await sdk.status([job.id, "nope"])
    assert [j.id for j in found.jobs] == [job.id]
    assert found.not_found == ["nope"]


async def test_submit_files_from_paths_bytes_and_tuples(sdk: AsyncClient, tmp_path: Path) -> None:
    """Files go up as multipart: a path (under its own name), bare bytes, a named tuple."""
    note = tmp_path / "note.md"
    note.write_bytes(b"# one two\n")
    job = await sdk.submit(
        "text-stats",
        {"top": 2},
        files=[note, b"three four\n", ("five.txt", b"five\n", "text/plain")],
    )
    assert [(f.name, f.size) for f in job.files] == [
        ("note.md", 10),
        ("file2", 11),
        ("five.txt", 5),
    ]
    assert job.files[0].content_type == "text/markdown"
    assert job.params == {"top": 2}


async def test_upload_then_submit_by_reference(sdk: AsyncClient, tmp_path: Path) -> None:
    """`upload` stores files once; a submit mixing them with a new file uploads that first."""
    uploaded = await sdk.upload([("a.txt", b"alpha\n")])
    assert isinstance(uploaded[0], FileInfo)
    path = tmp_path / "b.txt"
    path.write_bytes(b"beta\n")
    job = await sdk.submit("text-stats", files=[*uploaded, path])
    assert [(f.name, f.sha256) for f in job.files] == [
        ("a.txt", uploaded[0].sha256),
        ("b.txt", hashlib.sha256(b"beta\n").hexdigest()),
    ]


async def test_uploaded_files_keep_their_names_and_places_in_a_submit(sdk: AsyncClient) -> None:
    """A submit of `FileInfo`s names each file as uploaded, not by its hash; mixed with
    local files, every file keeps its place (a map over files numbers items by it)."""
    uploaded = await sdk.upload([("one.txt", b"one\n"), ("three.txt", b"three\n")])
    by_reference = await sdk.submit("text-stats", files=uploaded)
    assert [f.name for f in by_reference.files] == ["one.txt", "three.txt"]
    mixed = await sdk.submit("text-stats", files=[uploaded[0], ("two.txt", b"two\n"), uploaded[1]])
    assert [f.name for f in mixed.files] == ["one.txt", "two.txt", "three.txt"]


async def test_idempotency_key_replays_the_first_job(sdk: AsyncClient) -> None:
    """The same key returns the first job; another body with it is a ConflictError."""
    first = await sdk.submit("noop", {"a": 1}, idempotency_key="k-1")
    assert (await sdk.submit("noop", {"a": 1}, idempotency_key="k-1")).id == first.id
    with pytest.raises(ConflictError) as caught:
        await sdk.submit("noop", {"a": 2}, idempotency_key="k-1")
    assert caught.value.slug == "idempotency-conflict"


async def test_batch_all_or_nothing(sdk: AsyncClient) -> None:
    """`submit_batch` creates every job in order, or none, errors located by index."""
    jobs = await sdk.submit_batch(
        [JobSpec(pipeline="noop", params={"i": 0}), {"pipeline": "steps", "params": {"steps": 1}}]
    )
    assert [j.pipeline for j in jobs] == ["noop", "steps"]
    assert (jobs[0].params, jobs[1].params["steps"]) == ({"i": 0}, 1)
    with pytest.raises(InvalidRequestError) as caught:
        await sdk.submit_batch(
            [{"pipeline": "noop"}, {"pipeline": "steps", "params": {"steps": 0}}]
        )
    assert caught.value.errors[0]["loc"][:2] == ["jobs", 1]
    assert (await sdk.list_page()).total == 2


async def test_list_iterates_over_every_page(sdk: AsyncClient) -> None:
    """`list` walks all pages, newest first; `list_page` is one page with the total."""
    ids = [(await sdk.submit("noop", {"i": i})).id for i in range(5)]
    listed = [job.id async for job in sdk.list(page_size=2)]
    assert listed == ids[::-1]
    page = await sdk.list_page(limit=2, offset=4)
    assert ([j.id for j in page.jobs], page.total) == ([ids[0]], 5)
    await sdk.cancel(ids[0])
    assert [j.id async for j in sdk.list(status="cancelled")] == [ids[0]]
    assert [j.id async for j in sdk.list(status=["queued"], pipeline="steps")] == []


async def test_cancel_and_retry(sdk: AsyncClient) -> None:
    """A queued job cancels at once; cancelling again conflicts; retry queues it again."""
    job = await sdk.submit("steps", {"steps": 1})
    assert (await sdk.cancel(job.id)).status == "cancelled"
    with pytest.raises(ConflictError):
        await sdk.cancel(job.id)
    assert (await sdk.retry(job.id)).status == "queued"
    with pytest.raises(ConflictError):
        await sdk.retry(job.id)


async def test_wait_records_and_downloads(
    app_factory: AppFactory, make_sdk: MakeSdk, tmp_path: Path
) -> None:
    """With a worker: `wait` gives the finished job; its records page; both artifacts
    download byte-equal to what the signed URL serves."""
    app = await app_factory(worker_concurrency=2)
    sdk = await make_sdk(app)
    job = await sdk.submit(
        "text-stats", files=[("a.txt", b"x y\n"), ("bad.txt", b"caf\xe9\n"), ("c.txt", b"z\n")]
    )
    done = await sdk.wait(job.id, timeout=30)
    assert done.status == "succeeded"
    assert done.records.failed == 1
    failed = [r async for r in sdk.records(job.id, status="failed")]
    assert [r.key for r in failed] == ["bad.txt"]
    assert len([r async for r in sdk.records(job.id, page_size=1)]) == 3
    assert {a.name for a in await sdk.artifacts(job.id)} == {"report.json", "report.csv"}

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    path = await sdk.download(job.id, path=downloads)
    assert path == downloads / "report.json"
    assert json.loads(path.read_bytes()) == done.result
    csv_path = await sdk.download(job.id, "report.csv", downloads / "out" / "r.csv")
    link = await sdk.download_link(job.id, "report.csv")
    served = await httpx.AsyncClient(transport=httpx.ASGITransport(app=app)).get(link.download_url)
    assert csv_path.read_bytes() == served.content
    assert sorted(p.name for p in downloads.rglob("*")) == ["out", "r.csv", "report.json"]


async def test_wait_on_a_failing_job(app_factory: AppFactory, make_sdk: MakeSdk) -> None:
    """`wait` returns a failed job (it does not raise); its error is typed."""
    app = await app_factory(worker_concurrency=2)
    sdk = await make_sdk(app)
    job = await sdk.submit("steps", {"steps": 2, "step_ms": 0, "fail_at": 1})
    done = await sdk.wait(job.id, timeout=30)
    assert done.status == "failed"
    assert done.error is not None
    assert done.error.message == "planned failure at step 1"


async def test_error_mapping(app_factory: AppFactory, make_sdk: MakeSdk) -> None:
    """404, 401, 403, 422 and 429 (with `retry_after`) each raise their own error."""
    app = await app_factory(rate_limit_submit="1/hour")
    user = await make_sdk(app)
    with pytest.raises(NotFoundError) as missing:
        await user.get("no-such-job")
    assert missing.value.status == 404
    assert missing.value.request_id
    with pytest.raises(UnauthorizedError):
        await (await make_sdk(app, key="jg_" + "x" * 40)).me()
    with pytest.raises(ForbiddenError):
        await (await make_sdk(app, "viewer-1", ("viewer",))).submit("noop")
    with pytest.raises(InvalidRequestError) as invalid:
        await user.submit("steps", {"steps": 0})
    assert invalid.value.slug == "validation-error"
    assert invalid.value.errors
    with pytest.raises(InvalidRequestError) as unknown:
        await user.submit("no-such-pipeline")
    assert unknown.value.slug == "unknown-pipeline"
    await user.submit("noop")
    with pytest.raises(RateLimitedError) as limited:
        await user.submit("noop")
    assert limited.value.retry_after is not None
    assert 0 < limited.value.retry_after <= 3600


async def test_me(sdk: AsyncClient) -> None:
    """`me` says who the key acts as."""
    me = await sdk.me()
    assert (me.id, me.roles) == ("user-1", ["user"])
    assert "max_jobs_per_request" in me.limits
