"""Fixtures for the HTTP API: an app per test (once per dialect) and signed-in clients.

- `app_factory(**settings)`: a started app (lifespan entered) on the test's database,
  with no in-process worker unless `worker_concurrency=` says otherwise.
- `app`: the default app; `client`: an admin's client of it.
- `make_client(owner=..., roles=[...])`: a client of `app` signed in as someone else.
- `make_key(...)`: a key in `app`'s database; `expect_problem(response, status, slug)`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from fastapi import FastAPI

from jobgate.api.app import create_app
from jobgate.api.state import AppState
from jobgate.auth import api_keys
from jobgate.config import Settings
from jobgate.ids import now
from jobgate.pipelines import Registry

ADMIN = "admin-1"
PROBLEM_BASE = "https://jobgate.dev/problems/"


class AppFactory(Protocol):
    def __call__(
        self,
        *,
        worker_concurrency: int = 0,
        registry: Registry | None = None,
        **settings: Any,
    ) -> Awaitable[FastAPI]: ...


class MakeKey(Protocol):
    def __call__(
        self,
        owner: str = ...,
        roles: Sequence[str] = ...,
        *,
        expires_at: float | None = None,
        name: str | None = None,
    ) -> Awaitable[tuple[dict[str, Any], str]]: ...


class MakeClient(Protocol):
    def __call__(
        self, owner: str = ..., roles: Sequence[str] = ..., *, key: str | None = None
    ) -> Awaitable[httpx.AsyncClient]: ...


def state_of(app: FastAPI) -> AppState:
    """The started app's shared state (settings, db, blobs, registry)."""
    state: AppState = app.state.jobgate
    return state


@pytest.fixture
async def app_factory(tmp_path: Path, database_url: str) -> AsyncIterator[AppFactory]:
    """Build started apps on the test's database; their lifespans end with the test."""
    async with AsyncExitStack() as stack:

        async def build(
            *, worker_concurrency: int = 0, registry: Registry | None = None, **settings: Any
        ) -> FastAPI:
            options: dict[str, Any] = {
                "data_dir": tmp_path / "data",
                "database_url": database_url,
                **settings,
            }
            app = create_app(
                Settings(**options), registry=registry, worker_concurrency=worker_concurrency
            )
            await stack.enter_async_context(app.router.lifespan_context(app))
            return app

        yield build
    api_keys.clear_cache()


@pytest.fixture
async def app(app_factory: AppFactory) -> FastAPI:
    """A started app with default settings and no worker."""
    return await app_factory()


@pytest.fixture
def make_key(app: FastAPI) -> MakeKey:
    """Create an API key straight in `app`'s database: `(row, key)`."""

    async def create(
        owner: str = "user-1",
        roles: Sequence[str] = ("user",),
        *,
        expires_at: float | None = None,
        name: str | None = None,
    ) -> tuple[dict[str, Any], str]:
        async with state_of(app).db.write() as conn:
            return await api_keys.create_key(
                conn, owner=owner, roles=roles, name=name, expires_at=expires_at, at=now()
            )

    return create


@pytest.fixture
async def make_client(app: FastAPI, make_key: MakeKey) -> AsyncIterator[MakeClient]:
    """Clients of `app` signed in with a new key of `owner` (or with `key`, as given)."""
    async with AsyncExitStack() as stack:

        async def make(
            owner: str = "user-1", roles: Sequence[str] = ("user",), *, key: str | None = None
        ) -> httpx.AsyncClient:
            if key is None:
                _, key = await make_key(owner, roles)
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://test",
                headers={"Authorization": f"Bearer {key}"},
            )
            return await stack.enter_async_context(client)

        yield make


@pytest.fixture
async def client(make_client: MakeClient) -> httpx.AsyncClient:
    """A client of `app` signed in as an admin (`admin-1`)."""
    return await make_client(ADMIN, ["admin"])


@pytest.fixture
async def anon(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `app` without credentials."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as anonymous:
        yield anonymous


@pytest.fixture
def expect_problem() -> Callable[[httpx.Response, int, str], dict[str, Any]]:
    """Assert a response is an RFC 9457 problem with this status and slug; its body."""

    def check(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        body: dict[str, Any] = response.json()
        assert body["type"] == PROBLEM_BASE + slug
        assert body["status"] == status
        assert body["request_id"] == response.headers["x-request-id"]
        assert body["instance"] == response.request.url.path
        assert {"title", "detail"} <= body.keys()
        return body

    return check
