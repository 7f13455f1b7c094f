"""Helpers for the job API tests: store snapshots, sample files, multipart bodies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import func, select

from jobgate.api.state import AppState
from jobgate.auth import api_keys
from jobgate.ids import now
from jobgate.store import tables

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
TEXT = b"the quick brown fox\njumps over the lazy dog\n"
WATCHED = (
    tables.jobs,
    tables.stages,
    tables.tasks,
    tables.events,
    tables.blobs,
    tables.blob_grants,
    tables.idempotency_keys,
)


def state_of(app: FastAPI) -> AppState:
    state: AppState = app.state.jobgate
    return state


def blob_root(app: FastAPI) -> Path:
    root: Path = state_of(app).blobs.root  # type: ignore[attr-defined]
    return root


async def snapshot(app: FastAPI) -> dict[str, Any]:
    """Row counts of every table a submission writes, and every file under the blob root."""
    counts: dict[str, Any] = {}
    async with state_of(app).db.read() as conn:
        for table in WATCHED:
            counts[table.name] = (
                await conn.execute(select(func.count()).select_from(table))
            ).scalar_one()
    root = blob_root(app)
    counts["files"] = (
        sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        if root.exists()
        else []
    )
    return counts


def multipart(
    fields: dict[str, str] | None = None,
    files: list[tuple[str, bytes]] | None = None,
    *,
    boundary: str = "jobgate-test-boundary",
    field_name: str = "files",
) -> tuple[bytes, dict[str, str]]:
    """A hand-built multipart body (names are sent raw, unlike httpx's encoding)."""
    parts: list[bytes] = []
    for name, value in (fields or {}).items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for filename, data in files or []:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; '
            f'filename="{filename}"\r\nContent-Type: text/plain\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class CountingBody:
    """An endless-ish multipart body that counts how many bytes the server pulled."""

    def __init__(
        self, total: int, chunk: int = 1 << 20, boundary: str = "b0und", *, pipeline: bool = True
    ) -> None:
        self.pipeline = pipeline
        self.total = total
        self.chunk = chunk
        self.boundary = boundary
        self.sent = 0

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": f"multipart/form-data; boundary={self.boundary}"}

    async def __aiter__(self) -> AsyncIterator[bytes]:
        field = (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="pipeline"\r\n\r\n'
            "text-stats\r\n"
        )
        head = (
            (field if self.pipeline else "")
            + f"--{self.boundary}\r\nContent-Disposition: form-data; "
            'name="files"; filename="big.txt"\r\n\r\n'
        ).encode()
        self.sent += len(head)
        yield head
        block = b"a" * self.chunk
        while self.sent < self.total:
            self.sent += len(block)
            yield block
        tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.sent += len(tail)
        yield tail


class Guard:
    """Asserts that a refused request left no row and no file behind."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.before: dict[str, Any] | None = None

    async def start(self) -> Guard:
        self.before = await snapshot(self.app)
        return self

    async def check(self) -> None:
        assert self.before is not None, "call start() first"
        assert await snapshot(self.app) == self.before


async def client_for(
    app: FastAPI, owner: str = "user-1", roles: tuple[str, ...] = ("user",)
) -> httpx.AsyncClient:
    """A client of `app` (any started app) with a new API key; close it when done."""
    async with state_of(app).db.write() as conn:
        _, key = await api_keys.create_key(conn, owner=owner, roles=roles, at=now())
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://test",
        headers={"Authorization": f"Bearer {key}"},
    )


def asgi_scope(
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    *,
    query_string: bytes = b"",
) -> dict[str, Any]:
    """An HTTP scope for driving an app by hand (a client that leaves mid-request)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query_string,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
