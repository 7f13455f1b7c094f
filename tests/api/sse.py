"""Test helpers for SSE: a live uvicorn server for a started app, and a stream reader."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from tests.api.helpers import asgi_scope


@dataclass
class Sse:
    """One event as a client sees it."""

    kind: str
    data: Any
    id: int | None


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """Serve an app (lifespan already entered) on a free loopback port; its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="error")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.force_exit = True
        await asyncio.wait_for(task, timeout=10)


@asynccontextmanager
async def signed_in(
    app: FastAPI, key: str, headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `app`, served on a real socket, sending `key` (and `headers`)."""
    async with (
        serving(app) as base,
        httpx.AsyncClient(
            base_url=base,
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
            timeout=30,
        ) as client,
    ):
        yield client


async def read_events(response: httpx.Response) -> AsyncIterator[Sse]:
    """Parse the SSE body of `response` as it arrives (the subset jobgate sends)."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "event" in fields:
                raw_id = fields.get("id")
                yield Sse(
                    fields["event"],
                    json.loads(fields.get("data", "null")),
                    int(raw_id) if raw_id is not None else None,
                )
            fields = {}
            continue
        name, _, value = line.partition(":")
        fields[name] = value.removeprefix(" ")


async def collect(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    until: int | None = None,
    timeout: float = 30.0,
) -> list[Sse]:
    """Every event of a stream until the server ends it (or `until` events arrived)."""
    got: list[Sse] = []
    async with asyncio.timeout(timeout):
        async with client.stream(
            "GET", url, headers={"Accept": "text/event-stream", **(headers or {})}
        ) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            async for event in read_events(response):
                got.append(event)
                if until is not None and len(got) >= until:
                    break
    return got


async def stream_briefly(
    client: httpx.AsyncClient, path: str, *, headers: dict[str, str], seconds: float = 1.0
) -> httpx.Response:
    """What an endless stream sends within `seconds`, then the client leaves: driven
    straight through the ASGI app of `client`'s `ASGITransport` (which would otherwise
    wait for the end of the body)."""
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    request = client.build_request("GET", path, headers=headers)
    scope = asgi_scope(
        "GET",
        request.url.path,
        [(k.lower(), v) for k, v in request.headers.raw],
        query_string=request.url.query,
    )
    leave = asyncio.Event()
    started: dict[str, Any] = {}
    body = bytearray()
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.update(message)
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    app_task = asyncio.create_task(transport.app(scope, receive, send))  # type: ignore[arg-type]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(app_task), timeout=seconds)
    leave.set()
    await asyncio.wait_for(app_task, timeout=10)
    return httpx.Response(
        started["status"],
        headers=[(k.decode(), v.decode()) for k, v in started.get("headers", [])],
        content=bytes(body),
        request=request,
    )
