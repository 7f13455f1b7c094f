"""The SDK against a real `jobgate serve`: the blocking `Client` end to end, event streams
(resumed through a proxy that cuts every connection), `wait` and downloads."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobgate.client import (
    AsyncClient,
    Client,
    ConflictError,
    Event,
    InvalidRequestError,
    NotFoundError,
    UnauthorizedError,
    WaitTimeout,
)
from tests.e2e.conftest import Server, start_server
from tests.proxy import CuttableProxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `jobgate serve` (SQLite, in-process worker) for this module's tests."""
    running = start_server(tmp_path_factory.mktemp("sdk"), None)
    try:
        yield running
    finally:
        running.stop()  # how `serve` exits is test_serve.py's business


@pytest.fixture
def client(served: Server) -> Iterator[Client]:
    with Client(served.url, served.key) as sdk:
        yield sdk


def stored_events(server: Server, job_id: str) -> list[dict[str, Any]]:
    with server.client() as http:
        events: list[dict[str, Any]] = http.get(
            f"/v1/jobs/{job_id}/events", params={"limit": 1000}
        ).json()["events"]
    return events


def assert_complete(events: list[Event], stored: list[dict[str, Any]]) -> None:
    """`state`, then every stored event after its id, once each, in order."""
    assert events[0].type == "state"
    first = int(events[0].id or 0)
    assert [(int(e.id or 0), e.type, e.data) for e in events[1:]] == [
        (e["seq"], e["type"], e["data"]) for e in stored if e["seq"] > first
    ]
    assert events[-1].terminal


def test_submit_wait_records_and_download(client: Client, tmp_path: Path) -> None:
    """Files from a path and from bytes; the finished job; its records; the primary
    artifact streamed to disk, byte-equal to what its signed URL serves."""
    note = tmp_path / "note.txt"
    note.write_bytes(b"the cat\nthe dog\n")
    job = client.submit(
        "text-stats", {"top": 1}, files=[note, ("latin.txt", b"caf\xe9\n"), b"the end\n"]
    )
    done = client.wait(job.id, timeout=60)
    assert done.status == "succeeded"
    assert done.result["top_words"] == [["the", 3]]
    assert [r.key for r in client.records(job.id, status="failed")] == ["latin.txt"]
    assert sorted(r.key for r in client.records(job.id, page_size=2)) == [
        "file3",
        "latin.txt",
        "note.txt",
    ]
    target = client.download(job.id, path=tmp_path / "out.json")
    link = client.download_link(job.id)
    served = httpx.get(link.download_url, timeout=10).content
    assert target.read_bytes() == served
    assert hashlib.sha256(served).hexdigest() == link.sha256
    csv = client.download(job.id, "report.csv", tmp_path)
    assert csv.read_text().splitlines()[0] == "file,lines,words,chars"


def test_wait_on_failure_then_retry(client: Client) -> None:
    """`wait` returns the failed job; `retry` queues it and it then succeeds."""
    job = client.submit("steps", {"steps": 2, "step_ms": 0, "fail_at": 1, "fail_attempts": 3})
    failed = client.wait(job.id, timeout=60)
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.message == "planned failure at step 1"
    assert client.retry(job.id).status == "queued"
    assert client.wait(job.id, timeout=60).status == "succeeded"


def test_wait_times_out(client: Client) -> None:
    """A job that outlasts `timeout` raises WaitTimeout about when it should."""
    job = client.submit("steps", {"steps": 1000, "step_ms": 50})
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        client.wait(job.id, timeout=1.0)
    assert 1.0 <= time.monotonic() - started < 5
    assert caught.value.job is not None
    client.cancel(job.id)
    assert client.wait(job.id, timeout=30).status == "cancelled"
    with pytest.raises(ConflictError):
        client.cancel(job.id)


def test_batch_list_status_and_errors(client: Client, served: Server) -> None:
    """Batch, paging through `list`, `status`, `me`, and typed errors from a real server."""
    jobs = client.submit_batch([{"pipeline": "noop", "params": {"i": i}} for i in range(3)])
    ids = [j.id for j in jobs]
    listed = [j.id for j in client.list(pipeline="noop", page_size=2)]
    assert sorted(listed) == sorted(ids)  # one batch: created at the same instant
    assert [j.id for j in client.status(ids).jobs] == ids
    assert client.me().id == "e2e-admin"
    with pytest.raises(NotFoundError):
        client.get("missing")
    with pytest.raises(InvalidRequestError):
        client.submit("steps", {"steps": -1})
    with Client(served.url, "jg_" + "0" * 40) as stranger, pytest.raises(UnauthorizedError):
        stranger.me()


def test_a_finished_jobs_events_are_its_state(client: Client) -> None:
    """The stream of a finished job is one `state` event, then the end."""
    job = client.submit("noop", {"x": 1})
    client.wait(job.id, timeout=60)
    events = list(client.events(job.id))
    assert [e.type for e in events] == ["state"]
    assert events[0].job is not None
    assert events[0].job.result == {"x": 1}


def test_sync_stream_resumes_through_cut_connections(client: Client, served: Server) -> None:
    """Every connection is cut after each 4th event: the stream resumes each time with
    `Last-Event-ID`, and the caller sees every stored event once, in order."""
    proxy = CuttableProxy(int(served.url.rsplit(":", 1)[1]))
    try:
        with Client(proxy.url, served.key) as through:
            job = through.submit("steps", {"steps": 30, "step_ms": 20, "message_every": 1})
            events = []
            for event in through.events(job.id):
                events.append(event)
                if len(events) % 4 == 0:
                    proxy.cut()
    finally:
        proxy.close()
    assert proxy.cuts >= 5
    assert_complete(events, stored_events(served, job.id))
    assert events[-1].type == "completed"


def test_async_stream_resumes_through_cut_connections(served: Server) -> None:
    """The same with `AsyncClient`."""
    proxy = CuttableProxy(int(served.url.rsplit(":", 1)[1]))

    async def follow() -> tuple[str, list[Event]]:
        async with AsyncClient(proxy.url, served.key) as through:
            params = {"steps": 30, "step_ms": 20, "message_every": 1}
            job = await through.submit("steps", params)
            events = []
            async for event in through.events(job.id):
                events.append(event)
                if len(events) % 4 == 0:
                    proxy.cut()
            return job.id, events

    try:
        job_id, events = asyncio.run(follow())
    finally:
        proxy.close()
    assert proxy.cuts >= 5
    assert_complete(events, stored_events(served, job_id))


def test_all_events_sees_every_job(client: Client) -> None:
    """`all_events` carries each event's `job_id` and `seq`, with increasing global ids."""
    job = client.submit("steps", {"steps": 3, "step_ms": 10})
    got: list[Event] = []
    for event in client.all_events():
        if event.job_id == job.id:
            got.append(event)
            if event.terminal:
                break
    assert got[-1].type == "completed"
    ids = [int(e.id or 0) for e in got]
    assert ids == sorted(set(ids))
    seqs = [e.seq for e in got]
    assert seqs == sorted(set(seqs))
