"""A client that stops sending its request body is answered 408, and leaves nothing.

Without a timeout, a client that sends part of an upload and then nothing held a
socket, a task and a temporary file for as long as it kept the connection open: a
few thousand such clients exhaust the server's file descriptors.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from fastapi import FastAPI

from tests.api.conftest import AppFactory
from tests.api.helpers import asgi_scope, blob_root

IDLE_S = 0.3
MakeClient = Any


@pytest.fixture
async def app(app_factory: AppFactory) -> FastAPI:
    return await app_factory(body_idle_timeout_s=IDLE_S)


FILE_PART = (
    b'--B\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n\r\n'
    b"the first half of a file that never ends "
)
PIPELINE_FIELD = b'--B\r\nContent-Disposition: form-data; name="pipeline"\r\n\r\ntext-stats\r\n'


async def _stalled_request(
    app: FastAPI, path: str, key: str, content_type: bytes, first: bytes
) -> tuple[dict[str, Any], bytes, float]:
    """Send `first` (of a body announced as 10 MB), then nothing: the answer's start
    message, body, and how long it took."""
    asked_again = asyncio.Event()
    sent_first = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_first
        if not sent_first:
            sent_first = True
            return {"type": "http.request", "body": first, "more_body": True}
        asked_again.set()
        await asyncio.Event().wait()  # the client is still there, and sends nothing
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = asgi_scope(
        "POST",
        path,
        [
            (b"authorization", key.encode()),
            (b"content-type", content_type),
            (b"content-length", b"10000000"),
        ],
    )
    started = time.monotonic()
    await asyncio.wait_for(app(scope, receive, send), timeout=10)  # type: ignore[arg-type]
    elapsed = time.monotonic() - started
    assert asked_again.is_set()
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start, body, elapsed


@pytest.mark.parametrize(
    ("path", "content_type", "first"),
    [
        ("/v1/jobs", b"multipart/form-data; boundary=B", PIPELINE_FIELD + FILE_PART),
        ("/v1/files", b"multipart/form-data; boundary=B", FILE_PART),
        ("/v1/jobs", b"application/json", b'{"pipeline": "steps", "params": {"st'),
        ("/v1/jobs/batch", b"application/json", b'{"jobs": [{"pipeline": "st'),
    ],
)
async def test_a_body_that_stops_arriving_is_408_and_leaves_no_temporary_file(
    app: FastAPI, make_client: MakeClient, path: str, content_type: bytes, first: bytes
) -> None:
    client = await make_client("stalling")
    start, body, elapsed = await _stalled_request(
        app, path, client.headers["authorization"], content_type, first
    )
    assert start["status"] == 408, body
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"connection"] == b"close"
    assert b"request-timeout" in body
    assert IDLE_S <= elapsed < IDLE_S + 5
    assert list((blob_root(app) / "tmp").glob("*.part")) == []
    jobs = await client.get("/v1/jobs")
    assert jobs.json()["total"] == 0


async def test_a_slow_body_that_keeps_arriving_is_read_whole(
    app: FastAPI, make_client: MakeClient
) -> None:
    """The timeout is between chunks, not for the whole body: an upload slower than
    it in total, but never silent for as long, is accepted."""
    client = await make_client("slow")
    content = b"word " * 400

    async def chunks() -> Any:
        for start in range(0, len(content), 500):
            await asyncio.sleep(IDLE_S / 3)
            yield content[start : start + 500]

    started = time.monotonic()
    upload = await client.post(
        "/v1/files",
        content=_multipart_stream(chunks()),
        headers={"Content-Type": "multipart/form-data; boundary=B"},
    )
    assert upload.status_code == 201, upload.text
    assert time.monotonic() - started > IDLE_S
    assert upload.json()["files"][0]["size"] == len(content)


async def _multipart_stream(chunks: Any) -> Any:
    yield b'--B\r\nContent-Disposition: form-data; name="files"; filename="slow.txt"\r\n\r\n'
    async for chunk in chunks:
        yield chunk
    yield b"\r\n--B--\r\n"
