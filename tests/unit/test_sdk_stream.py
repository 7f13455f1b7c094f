"""The SDK against a scripted server (`httpx.MockTransport`): resuming event streams,
`wait`'s fallback, error mapping and atomic downloads, for `Client` and `AsyncClient`."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import itertools
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobgate.client import (
    AsyncClient,
    BadRequestError,
    Client,
    ConflictError,
    DownloadError,
    ForbiddenError,
    InvalidRequestError,
    NotAcceptableError,
    NotFoundError,
    ProblemError,
    RateLimitedError,
    Reconnect,
    Retries,
    ServerError,
    TransportError,
    UnauthorizedError,
    UnavailableError,
    WaitTimeout,
)
from jobgate.client._sse import ServerSentEvent
from jobgate.client._stream import Poller, Resumer

FAST = Reconnect(first_delay=0.0, max_delay=0.01, give_up_after=5.0)
Handler = Callable[[httpx.Request], httpx.Response]


def job(status: str = "running", **extra: Any) -> dict[str, Any]:
    return {"id": "j1", "pipeline": "steps", "status": status, **extra}


def frame(seq: int | None, kind: str, data: dict[str, Any]) -> bytes:
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


class Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body sent in chunks, then cut (a `ReadError`) or closed."""

    def __init__(self, chunks: list[bytes], *, cut: bool) -> None:
        self.chunks = chunks
        self.cut = cut

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.cut:
            raise httpx.ReadError("connection reset")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.cut:
            raise httpx.ReadError("connection reset")


@dataclass
class Server:
    """A job's stored log, served as SSE; connection n serves at most `plan[n]` events,
    then is reset (or closed cleanly, with `close_early`)."""

    log: list[tuple[int, str, dict[str, Any]]]
    plan: list[int | None]
    cut_inside_frame: bool = False
    close_early: bool = False
    replay: int = 0
    seen_ids: list[str | None] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        last = request.headers.get("last-event-id")
        self.seen_ids.append(last)
        after = int(last) - self.replay if last else None
        quota = self.plan[len(self.seen_ids) - 1] if len(self.seen_ids) <= len(self.plan) else None
        if after is None:
            latest = self.log[0][0] - 1
            frames = [frame(latest, "state", job())]
            pending = self.log
        else:
            frames = []
            pending = [item for item in self.log if item[0] > after]
        frames += [frame(*item) for item in pending]
        cut = quota is not None and quota < len(frames)
        frames = frames[: quota if cut else None]
        if cut and self.cut_inside_frame:
            frames.append(b"id: 999\nevent: progress\ndata: {")  # half a frame
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream; charset=utf-8"},
            stream=Body(frames, cut=cut and not self.close_early),
        )


def steps_log(n: int = 6) -> list[tuple[int, str, dict[str, Any]]]:
    log: list[tuple[int, str, dict[str, Any]]] = [
        (seq, "progress", {"stage": "work", "stage_progress": seq / n}) for seq in range(3, 3 + n)
    ]
    log.append((3 + n, "completed", {"result": {"steps": n}}))
    return log


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


ONCE = Retries(attempts=1)


def run(
    mode: str,
    handler: Handler,
    method: str,
    *args: Any,
    retries: Retries = ONCE,
    **kwargs: Any,
) -> Any:
    """`client.<method>(...)` on the sync or the async client; iterators are drained.
    Calls are not retried unless `retries` says so."""
    transport = httpx.MockTransport(handler)
    options: dict[str, Any] = {"transport": transport, "reconnect": FAST, "retries": retries}
    if mode == "sync":
        with Client("http://test", "jg_key", **options) as client:
            result = getattr(client, method)(*args, **kwargs)
            return list(result) if isinstance(result, Iterator) else result

    async def go() -> Any:
        async with AsyncClient("http://test", "jg_key", **options) as client:
            result = getattr(client, method)(*args, **kwargs)
            if isinstance(result, AsyncIterator):
                return [item async for item in result]
            return await result

    return asyncio.run(go())


# -- resuming ------------------------------------------------------------------------------


@pytest.mark.parametrize("inside_frame", [False, True], ids=["between-frames", "inside-a-frame"])
def test_a_cut_stream_resumes_with_no_gap_and_no_duplicate(mode: str, inside_frame: bool) -> None:
    """Cut after 2, then 3, then 1 events: reconnections send the last id seen, and the
    caller gets state + every stored event once, in order, ending at `completed`."""
    server = Server(steps_log(), plan=[2, 3, 1], cut_inside_frame=inside_frame)
    events = run(mode, server, "events", "j1")
    assert [e.type for e in events][:2] == ["state", "progress"]
    assert [e.seq for e in events] == list(range(2, 10))
    assert events[-1].type == "completed"
    assert server.seen_ids == [None, "3", "6", "7"]


def test_events_replayed_by_the_server_are_dropped(mode: str) -> None:
    """A resumed stream that starts too early (two events again) still yields each once."""
    server = Server(steps_log(), plan=[3, None], replay=2)
    events = run(mode, server, "events", "j1")
    assert [e.seq for e in events] == list(range(2, 10))


def test_a_stream_closed_early_is_resumed(mode: str) -> None:
    """A server that closes cleanly before the terminal event (a restart) is reconnected to."""
    server = Server(steps_log(), plan=[4, None], close_early=True)
    events = run(mode, server, "events", "j1")
    assert [e.seq for e in events] == list(range(2, 10))
    assert server.seen_ids == [None, "5"]


def test_resume_from_a_given_last_event_id(mode: str) -> None:
    """`last_event_id` starts after that event, with no `state`."""
    server = Server(steps_log(), plan=[None])
    events = run(mode, server, "events", "j1", last_event_id=6)
    assert [e.seq for e in events] == [7, 8, 9]
    assert server.seen_ids == ["6"]


def test_heartbeats_are_skipped_unless_asked_for(mode: str) -> None:
    """Heartbeats (no id) are hidden by default and surfaced with `heartbeats=True`."""
    body = frame(1, "state", job()) + frame(None, "heartbeat", {}) + frame(2, "cancelled", {})

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    assert [e.type for e in run(mode, handler, "events", "j1")] == ["state", "cancelled"]
    shown = run(mode, handler, "events", "j1", heartbeats=True)
    assert [(e.type, e.id) for e in shown] == [
        ("state", "1"),
        ("heartbeat", None),
        ("cancelled", "2"),
    ]


def test_the_state_of_a_finished_job_ends_the_stream(mode: str) -> None:
    """A finished job's stream is `state` alone, and the client does not reconnect."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        body = frame(5, "state", job("succeeded", result={"ok": True}))
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    events = run(mode, handler, "events", "j1")
    assert [e.type for e in events] == ["state"]
    assert events[0].job is not None
    assert events[0].job.result == {"ok": True}
    assert len(calls) == 1


def test_a_stream_that_cannot_be_resumed_gives_up(mode: str) -> None:
    """Refused connections are retried with backoff until `give_up_after`, then raise."""
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    policy = Reconnect(first_delay=0.01, max_delay=0.02, give_up_after=0.2)
    with pytest.raises(TransportError, match="could not be resumed"):
        run(mode, handler, "events", "j1", reconnect=policy)
    assert len(attempts) > 3


def test_too_many_streams_waits_and_retries(mode: str) -> None:
    """429 `too-many-streams` (and 503) on a stream are waited out, not raised."""
    answers = [
        httpx.Response(429, headers={"retry-after": "0"}, json={"type": "x/too-many-streams"}),
        httpx.Response(503, json={"type": "x/unavailable", "status": 503}),
        httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=frame(1, "state", job()) + frame(2, "completed", {}),
        ),
    ]
    events = run(mode, lambda request: answers.pop(0), "events", "j1")
    assert [e.type for e in events] == ["state", "completed"]


def test_a_refused_stream_raises_at_once(mode: str) -> None:
    """A 401 on the stream is not retried."""
    problem = {"type": "https://jobgate.dev/problems/unauthenticated", "status": 401}
    with pytest.raises(UnauthorizedError):
        run(mode, lambda request: httpx.Response(401, json=problem), "events", "j1")


def test_all_events_do_not_end_on_a_terminal_event(mode: str) -> None:
    """`GET /v1/events` goes on after one job's `completed` (here: until the test stops)."""
    body = frame(10, "completed", {"job_id": "a", "seq": 4}) + frame(
        11, "progress", {"job_id": "b", "seq": 2}
    )
    connections = []

    def handler(request: httpx.Request) -> httpx.Response:
        connections.append(request.headers.get("last-event-id"))
        if len(connections) > 1:
            raise httpx.ConnectError("gone", request=request)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    policy = Reconnect(first_delay=0.0, max_delay=0.0, give_up_after=0.05)
    seen: list[Any] = []

    async def drain(events: AsyncIterator[Any]) -> None:
        async for event in events:
            seen.append(event)

    async def follow_async() -> None:
        transport = httpx.MockTransport(handler)
        async with AsyncClient("http://test", transport=transport, reconnect=policy) as client:
            await drain(client.all_events())

    def follow() -> None:
        if mode == "async":
            asyncio.run(follow_async())
            return
        transport = httpx.MockTransport(handler)
        with Client("http://test", transport=transport, reconnect=policy) as client:
            seen.extend(client.all_events())

    with pytest.raises(TransportError):
        follow()
    assert [(e.job_id, e.seq) for e in seen] == [("a", 4), ("b", 2)]
    assert connections[1] == "11"


def test_resumer_backoff_doubles_up_to_the_cap_and_honours_retry() -> None:
    """Delays: the server's `retry:` first, then doubling, capped; events reset them."""
    now = [0.0]
    resumer = Resumer(Reconnect(0.5, 2.0, 10.0), clock=lambda: now[0])
    assert [resumer.backoff(None) for _ in range(4)] == [0.5, 1.0, 2.0, 2.0]
    resumer.accept(ServerSentEvent("progress", "{}", "4", "4", retry=100))
    assert resumer.backoff(None) == 0.1
    now[0] = 9.95
    assert resumer.backoff(None) == pytest.approx(0.05)  # never past the give-up time
    now[0] = 10.0
    with pytest.raises(TransportError):
        resumer.backoff(None)


def test_poller_grows_its_interval_and_stops_at_the_deadline() -> None:
    """Polling waits longer each time, never past the deadline, then raises WaitTimeout."""
    from jobgate.client import Job

    now = [0.0]
    poller = Poller(3.0, interval=1.0, max_interval=2.0, clock=lambda: now[0])
    running = Job.model_validate(job())
    assert poller.delay(Job.model_validate(job("failed"))) is None
    assert [poller.delay(running), poller.delay(running), poller.delay(running)] == [1.0, 1.5, 2.0]
    now[0] = 2.5
    assert poller.delay(running) == pytest.approx(0.5)
    now[0] = 3.0
    with pytest.raises(WaitTimeout) as caught:
        poller.delay(running)
    assert caught.value.job == running


# -- wait ------------------------------------------------------------------------------------


def test_wait_falls_back_to_polling_without_streams(mode: str) -> None:
    """A server that answers 406 to `text/event-stream` is polled until the job ends."""
    reads = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(406, json={"type": "x/not-acceptable", "status": 406})
        reads.append(request)
        return httpx.Response(200, json=job("succeeded" if len(reads) == 3 else "running"))

    final = run(mode, handler, "wait", "j1", poll_interval=0.001)
    assert final.status == "succeeded"
    assert len(reads) == 3


def test_wait_times_out(mode: str) -> None:
    """A job that does not finish in time raises WaitTimeout, a TimeoutError."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(200, json={"events": []})  # an old server: no stream
        return httpx.Response(200, json=job("running"))

    with pytest.raises(TimeoutError):
        run(mode, handler, "wait", "j1", timeout=0.05, poll_interval=0.01)


def test_wait_times_out_on_a_silent_stream(mode: str) -> None:
    """A stream that sends nothing more is bounded by the deadline too."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            raise httpx.ReadTimeout("silence", request=request)
        return httpx.Response(200, json=job("running"))

    with pytest.raises(WaitTimeout):
        run(mode, handler, "wait", "j1", timeout=0.1)


def test_wait_times_out_on_a_busy_stream(mode: str) -> None:
    """A stream that never goes quiet (a heartbeat every few ms) still ends at the deadline."""

    class Endless(httpx.SyncByteStream, httpx.AsyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            while True:
                yield frame(None, "heartbeat", {})

        async def __aiter__(self) -> AsyncIterator[bytes]:
            while True:
                yield frame(None, "heartbeat", {})
                await asyncio.sleep(0.001)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, stream=Endless()
            )
        return httpx.Response(200, json=job("running"))

    with pytest.raises(WaitTimeout):
        run(mode, handler, "wait", "j1", timeout=0.1)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, BadRequestError),
        (401, UnauthorizedError),
        (403, ForbiddenError),
        (404, NotFoundError),
        (409, ConflictError),
        (418, ProblemError),
        (422, InvalidRequestError),
        (429, RateLimitedError),
        (500, ServerError),
        (503, UnavailableError),
    ],
)
def test_problems_map_to_typed_errors(mode: str, status: int, kind: type[ProblemError]) -> None:
    """Each status is its own exception class, carrying the problem document."""
    body = {
        "type": "https://jobgate.dev/problems/some-slug",
        "title": "Some title",
        "status": status,
        "detail": "what went wrong",
        "request_id": "r1",
        "errors": [{"loc": ["params", "steps"], "msg": "too big"}],
        "future_field": 1,
    }
    headers = {"retry-after": "7"}

    with pytest.raises(kind) as caught:
        run(mode, lambda r: httpx.Response(status, json=body, headers=headers), "get", "j1")
    error = caught.value
    assert type(error) is kind
    assert (error.status, error.slug, error.title, error.detail) == (
        status,
        "some-slug",
        "Some title",
        "what went wrong",
    )
    assert error.errors == [{"loc": ["params", "steps"], "msg": "too big", "type": None}]
    assert error.request_id == "r1"
    assert error.problem.model_extra == {"future_field": 1}
    if isinstance(error, RateLimitedError | UnavailableError):
        assert error.retry_after == 7


def test_an_error_that_is_not_a_problem_document(mode: str) -> None:
    """A proxy's HTML 502 still becomes a ServerError with a short detail."""
    with pytest.raises(ServerError) as caught:
        run(mode, lambda r: httpx.Response(502, text="<h1>Bad gateway</h1>"), "me")
    assert caught.value.status == 502
    assert caught.value.detail == "<h1>Bad gateway</h1>"


def test_an_unreachable_server_is_a_transport_error(mode: str) -> None:
    """No answer at all: TransportError, which is also a ConnectionError."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(ConnectionError, match="cannot reach http://test"):
        run(mode, handler, "get", "j1")


# -- downloads ----------------------------------------------------------------------------------


def artifact_server(content: bytes, announced: bytes) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs/j1/download":
            assert request.headers["authorization"] == "Bearer jg_key"
            return httpx.Response(
                200,
                json={
                    "download_url": "https://blobs.example/b?sig=1",
                    "expires_in": 60,
                    "filename": "report.json",
                    "sha256": hashlib.sha256(announced).hexdigest(),
                    "size": len(announced),
                    "content_type": "application/json",
                },
            )
        assert request.url.host == "blobs.example"
        assert "authorization" not in request.headers  # never leak the key to the blob store
        return httpx.Response(200, content=content)

    return handler


def test_download_into_a_directory(mode: str, tmp_path: Path) -> None:
    """The artifact lands under its own name, byte-equal, with no temporary file left."""
    path = run(mode, artifact_server(b'{"a": 1}', b'{"a": 1}'), "download", "j1", path=tmp_path)
    assert path == tmp_path / "report.json"
    assert path.read_bytes() == b'{"a": 1}'
    assert list(tmp_path.iterdir()) == [path]


def test_download_into_a_directory_named_with_a_trailing_slash(mode: str, tmp_path: Path) -> None:
    """`out/` that does not exist yet is made and the artifact lands in it under its
    own name (regression: a file named `out`), with the mode the umask gives new files."""
    old_umask = os.umask(0o027)
    try:
        path = run(mode, artifact_server(b"{}", b"{}"), "download", "j1", path=f"{tmp_path}/out/")
    finally:
        os.umask(old_umask)
    assert path == tmp_path / "out" / "report.json"
    assert path.read_bytes() == b"{}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_corrupt_download_leaves_nothing_behind(mode: str, tmp_path: Path) -> None:
    """Bytes that do not match the announced SHA-256 raise, and the target is untouched."""
    target = tmp_path / "out.json"
    target.write_bytes(b"old")
    with pytest.raises(DownloadError):
        run(mode, artifact_server(b"evil", b"good"), "download", "j1", path=target)
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize(
    ("name", "raw_path"),
    [
        ("report%2Ejson", "/v1/jobs/j1/artifacts/report%252Ejson"),
        ("notes#1.txt", "/v1/jobs/j1/artifacts/notes%231.txt"),
        ("q?x=1", "/v1/jobs/j1/artifacts/q%3Fx%3D1"),
        ("a/b", "/v1/jobs/j1/artifacts/a%2Fb"),
    ],
)
def test_an_artifact_name_is_sent_as_it_is(mode: str, name: str, raw_path: str) -> None:
    """Every character of an artifact's name is escaped in the URL path (regression: `?`
    and `#` cut the name, and `%2E` was read as `.`, so another artifact came back)."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        return httpx.Response(404, json={"status": 404, "title": "Not found", "detail": "x"})

    with pytest.raises(NotFoundError):
        run(mode, handler, "download", "j1", name, path="/nonexistent-dir-never-made/x")
    assert seen == [raw_path]


def test_a_broken_download_names_the_url_without_its_signature(mode: str, tmp_path: Path) -> None:
    """The signed URL's query is a credential: an error names the URL without it, and
    says the connection failed rather than that the server could not be reached."""
    serve = artifact_server(b"{}", b"{}")

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "blobs.example":
            raise httpx.RemoteProtocolError("peer closed connection", request=request)
        return serve(request)

    with pytest.raises(TransportError) as caught:
        run(mode, handler, "download", "j1", path=tmp_path / "out.json")
    message = str(caught.value)
    assert "sig=" not in message
    assert "https://blobs.example/b" in message
    assert "cannot reach" not in message
    assert list(tmp_path.iterdir()) == []


def test_an_artifact_with_the_longest_name_downloads(mode: str, tmp_path: Path) -> None:
    """A name of 250 characters is legal: the temporary file is not named after it
    (regression: `File name too long`, every time)."""
    name = "r" * 245 + ".json"
    path = run(mode, artifact_server(b"{}", b"{}"), "download", "j1", path=tmp_path / name)
    assert path == tmp_path / name
    assert list(tmp_path.iterdir()) == [path]


def test_all_events_cut_before_any_event_resumes_from_where_the_stream_began(
    mode: str,
) -> None:
    """A fresh `/v1/events` stream starts with `id:` alone, its place. Cut before any
    event, the client resumes from that place, not from "now", so the events between
    are not lost (regression: the reconnection sent no Last-Event-ID). An id whose block
    the cut left unfinished is not taken."""
    seen_ids: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen_ids.append(request.headers.get("last-event-id"))
        if len(seen_ids) == 1:
            chunks = [b"id: 41\n\n", frame(None, "heartbeat", {}), b"id: 50\nevent: progress"]
            stream = Body(chunks, cut=True)
        else:
            chunks = [
                frame(42, "progress", {"job_id": "j1", "seq": 3}),
                frame(43, "completed", {"job_id": "j1", "seq": 4}),
            ]
            stream = Body(chunks, cut=False)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)

    options: dict[str, Any] = {"transport": httpx.MockTransport(handler), "reconnect": FAST}
    if mode == "sync":
        with Client("http://test", "jg_key", **options) as client:
            events = list(itertools.islice(client.all_events(), 2))
    else:

        async def take_two() -> list[Any]:
            async with AsyncClient("http://test", "jg_key", **options) as client:
                got = []
                async for event in client.all_events():
                    got.append(event)
                    if len(got) == 2:
                        return got
            return got

        events = asyncio.run(take_two())
    assert seen_ids[:2] == [None, "41"]
    assert [e.id for e in events] == ["42", "43"]


def test_a_success_that_is_not_the_apis_json_is_an_sdk_error(mode: str) -> None:
    """A 200 page from a proxy or a captive portal raises the SDK's NotAcceptableError,
    with an extract of what came (regression: a bare JSONDecodeError)."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>Please log in to the Wi-Fi</html>")

    with pytest.raises(NotAcceptableError) as caught:
        run(mode, handler, "me")
    assert "Wi-Fi" in caught.value.detail
    assert caught.value.status == 406


def test_retry_after_as_an_http_date_is_read_as_seconds(mode: str) -> None:
    """RFC 9110 allows `Retry-After` as a date; a proxy may send one (regression: None)."""
    when = email.utils.formatdate(time.time() + 30, usegmt=True)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429,
            headers={"Retry-After": when},
            json={"type": "x/rate-limited", "title": "Too many", "status": 429, "detail": "slow"},
        )

    with pytest.raises(RateLimitedError) as caught:
        run(mode, handler, "me")
    assert caught.value.retry_after is not None
    assert 25 <= caught.value.retry_after <= 31


# -- retries ------------------------------------------------------------------------------------

QUICK = Retries(attempts=3, backoff_s=0.001, max_backoff_s=0.01)
JOB = {"id": "j1", "pipeline": "noop", "status": "queued"}


def unavailable(retry_after: str = "0") -> httpx.Response:
    return httpx.Response(
        503,
        headers={"retry-after": retry_after},
        json={"type": "x/unavailable", "title": "Down", "status": 503, "detail": "store down"},
    )


def test_a_read_is_retried_through_an_outage_and_a_refused_connection(mode: str) -> None:
    """503 (with Retry-After), then no connection, then the answer: the caller sees only
    the answer."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if len(seen) == 1:
            return unavailable()
        if len(seen) == 2:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json=JOB)

    job = run(mode, handler, "get", "j1", retries=QUICK)
    assert job.id == "j1"
    assert seen == ["/v1/jobs/j1"] * 3


def test_a_submit_is_retried_with_one_idempotency_key(mode: str) -> None:
    """A submit whose connection broke after sending may have created its job: it is sent
    again with the same Idempotency-Key (made by the SDK when none is given), which the
    server answers with the job created the first time."""
    keys: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers.get("idempotency-key"))
        if len(keys) % 2 == 1:
            raise httpx.ReadError("connection reset", request=request)
        return httpx.Response(202, json=JOB)

    assert run(mode, handler, "submit", "noop", retries=QUICK).id == "j1"
    assert run(mode, handler, "submit", "noop", idempotency_key="mine", retries=QUICK).id == "j1"
    first, again, mine, mine_again = keys
    assert first is not None
    assert first.startswith("sdk-")
    assert again == first
    assert (mine, mine_again) == ("mine", "mine")
    assert run(mode, handler, "submit", "noop", retries=QUICK).id == "j1"
    assert keys[4] == keys[5] != first  # a new submit, a new key


def test_a_cancel_is_sent_again_only_if_it_never_left(mode: str) -> None:
    """A cancel is not safe to repeat (the second answers 409 once the first cancelled a
    queued job): after a broken connection or a 503 it fails at once; after a refused
    connection or a 429 (refused before any work) it is sent again."""
    tries: list[int] = []

    def reset(request: httpx.Request) -> httpx.Response:
        tries.append(1)
        raise httpx.ReadError("connection reset", request=request)

    with pytest.raises(TransportError, match="connection to http://test failed"):
        run(mode, reset, "cancel", "j1", retries=QUICK)
    assert len(tries) == 1

    def refused_once(request: httpx.Request) -> httpx.Response:
        tries.append(1)
        if len(tries) == 2:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={**JOB, "status": "cancelled"})

    assert run(mode, refused_once, "cancel", "j1", retries=QUICK).status == "cancelled"
    assert len(tries) == 3

    def limited_once(request: httpx.Request) -> httpx.Response:
        tries.append(1)
        if len(tries) == 4:  # refused before any work: safe to send again
            return httpx.Response(429, headers={"retry-after": "0"}, json={"status": 429})
        if len(tries) == 5:  # may have cancelled: not sent again
            return unavailable()
        return httpx.Response(200, json={**JOB, "status": "cancelled"})

    with pytest.raises(UnavailableError):
        run(mode, limited_once, "cancel", "j1", retries=QUICK)
    assert len(tries) == 5


def test_retries_give_up_after_their_attempts_or_a_long_retry_after(mode: str) -> None:
    """Still unavailable after every try: the last answer's error. A Retry-After longer
    than the policy waits is not waited for: the error says it, at once."""
    tries: list[int] = []

    def down(request: httpx.Request) -> httpx.Response:
        tries.append(1)
        return unavailable()

    with pytest.raises(UnavailableError):
        run(mode, down, "me", retries=QUICK)
    assert len(tries) == 3

    def limited(request: httpx.Request) -> httpx.Response:
        tries.append(1)
        return httpx.Response(
            429,
            headers={"retry-after": "3600"},
            json={"type": "x/rate-limited", "title": "Too many", "status": 429, "detail": "slow"},
        )

    started = time.monotonic()
    with pytest.raises(RateLimitedError) as caught:
        run(mode, limited, "me", retries=QUICK)
    assert len(tries) == 4
    assert caught.value.retry_after == 3600
    assert time.monotonic() - started < 1
