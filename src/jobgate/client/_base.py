"""What `Client` and `AsyncClient` share: settings from arguments or the environment."""

from __future__ import annotations

import os
import random
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from jobgate import __version__
from jobgate.client._calls import Call
from jobgate.client._errors import retry_after
from jobgate.client._stream import Reconnect

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 30.0
DEFAULT_STREAM_TIMEOUT = 90.0
"""Seconds a stream may stay silent: three of the server's default 30 s heartbeats."""
PAGE_SIZE = 50


RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
"""Answers that say "not now" rather than "no": a timeout, a rate limit, a backend down."""
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
"""Failures before the request left: safe to send again, whatever it does."""


@dataclass(frozen=True)
class Retries:
    """How ordinary calls are retried (event streams are resumed by `Reconnect`).

    A call is sent up to `attempts` times while the server cannot be reached or answers
    408, 429, 502, 503 or 504. A call that may have reached the server is sent again
    only if that is safe: reads, uploads (content-addressed), and submits, which always
    carry an Idempotency-Key (the SDK makes one when none is given), so a retried submit
    creates its jobs once. Between tries it waits what `Retry-After` says (a call is not
    retried past `max_retry_after_s`), else an exponential backoff with jitter.
    `Retries(attempts=1)` turns retrying off.
    """

    attempts: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 30.0

    def wait(self, tries: int, asked_s: float | None) -> float | None:
        """Seconds to wait before the next try after `tries` failed ones, `asked_s` what
        the server's `Retry-After` said (None: give up)."""
        if tries >= self.attempts:
            return None
        if asked_s is not None:
            return asked_s if asked_s <= self.max_retry_after_s else None
        backoff = min(self.max_backoff_s, self.backoff_s * 2.0 ** (tries - 1))
        return backoff * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrecy


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
        retries: how ordinary calls are retried (`Retries`; default 3 tries).
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
        retries: Retries | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("JOBGATE_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("JOBGATE_API_KEY")
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.stream_timeout = stream_timeout
        self.reconnect = reconnect or Reconnect()
        self.retries = retries or Retries()
        self._auth = BearerAuth(key) if key else None
        self._headers = {"User-Agent": f"jobgate-python/{__version__}", **(headers or {})}

    def _http_options(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "auth": self._auth,
            "timeout": self.timeout,
            "headers": self._headers,
        }

    def _retry_wait(
        self,
        call: Call[Any],
        tries: int,
        *,
        error: httpx.TransportError | None = None,
        response: httpx.Response | None = None,
    ) -> float | None:
        """Seconds to wait before sending `call` again, after a failed try (None: don't)."""
        if error is not None:
            if not isinstance(error, _NOT_SENT) and not call.safe_to_repeat:
                return None
            return self.retries.wait(tries, None)
        if response is None or response.status_code not in RETRY_STATUSES:
            return None
        # A 429 is a refusal before any work: whatever the call does, it did not happen.
        if response.status_code != 429 and not call.safe_to_repeat:
            return None
        return self.retries.wait(tries, retry_after(response.headers))

    def _stream_timeout(self, read: float | None) -> httpx.Timeout:
        return httpx.Timeout(
            connect=self.timeout.connect,
            read=read,
            write=self.timeout.write,
            pool=self.timeout.pool,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"
