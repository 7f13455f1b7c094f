"""What `Client` and `AsyncClient` share: settings from arguments or the environment."""

from __future__ import annotations

import os
from collections.abc import Generator, Mapping
from typing import Any

import httpx

from jobgate import __version__
from jobgate.client._stream import Reconnect

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 30.0
DEFAULT_STREAM_TIMEOUT = 90.0
"""Seconds a stream may stay silent: three of the server's default 30 s heartbeats."""
PAGE_SIZE = 50


class BearerAuth(httpx.Auth):
    """`Authorization: Bearer <token>` on every request that does not opt out (`auth=None`)."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


class BaseClient:
    """Settings shared by both clients.

    Args:
        base_url: the server, e.g. `https://jobs.example.com`; default `JOBGATE_URL`,
            else `http://127.0.0.1:8000`.
        api_key: an API key or a JWT; default `JOBGATE_API_KEY`.
        timeout: seconds (or an `httpx.Timeout`) for each ordinary request.
        stream_timeout: seconds an event stream may stay silent before it is resumed.
        reconnect: how dropped event streams are resumed.
        headers: more headers for every request.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        stream_timeout: float | None = DEFAULT_STREAM_TIMEOUT,
        reconnect: Reconnect | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("JOBGATE_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("JOBGATE_API_KEY")
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.stream_timeout = stream_timeout
        self.reconnect = reconnect or Reconnect()
        self._auth = BearerAuth(key) if key else None
        self._headers = {"User-Agent": f"jobgate-python/{__version__}", **(headers or {})}

    def _http_options(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "auth": self._auth,
            "timeout": self.timeout,
            "headers": self._headers,
        }

    def _stream_timeout(self, read: float | None) -> httpx.Timeout:
        return httpx.Timeout(
            connect=self.timeout.connect,
            read=read,
            write=self.timeout.write,
            pool=self.timeout.pool,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"
