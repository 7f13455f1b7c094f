"""Request ids, access logs and request metrics, as pure ASGI middleware.

Pure ASGI (not `BaseHTTPMiddleware`): it wraps `send` and never buffers a body, so
streamed downloads and SSE pass through untouched.

Key contracts:

- Every HTTP response carries `X-Request-ID`: the client's when it is sane
  (`[A-Za-z0-9._-]{1,128}`), else a new UUIDv7. It is in `request.state.request_id`
  and bound in structlog's context vars for everything logged during the request.
- One `http_request` access line per request with method, path, status and
  duration — never the query string: signed URLs carry their tokens there.
- Metrics are labelled by route template (`/v1/jobs/{job_id}`), never the raw path.
- An answer given before the request's body was read to its end says
  `Connection: close`, so the server stops reading a refused upload at once.
- A body that stops arriving for `body_idle_timeout_s` fails its read with
  `RequestTimeout` (408): a stalled client holds no temporary file, socket or task for
  longer than that. A body past `max_body_bytes` (the upload limit, the most any route
  takes) fails its read with `FileTooLarge` (413): routes whose body FastAPI reads whole
  get no more bytes than the upload routes, which stop sooner by their own limits.
- The middleware wraps the whole stack, outside Starlette's `ServerErrorMiddleware`,
  so even a 500 gets the header, the log line and the metrics.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import structlog
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobgate.config import Settings
from jobgate.errors import FileTooLarge, RequestTimeout
from jobgate.ids import uuid7
from jobgate.observability import metrics

REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
UNMATCHED_ROUTE = "<unmatched>"
access_log = structlog.get_logger("jobgate.access")


def request_id_from(scope: Scope) -> str:
    """The client's `X-Request-ID` when it is sane, else a new UUIDv7."""
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for name, value in headers:
        if name == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1")
            if _SANE_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid7()


def has_body(scope: Scope) -> bool:
    """Whether the request announces a body (a non-zero length, or chunks)."""
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for name, value in headers:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


def route_template(scope: Scope) -> str:
    """The path template of the route that answered, or `<unmatched>`."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) else UNMATCHED_ROUTE


class RequestContextMiddleware:
    """Request id, access log and request metrics for every HTTP request."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        body_idle_timeout_s: float = 60.0,
        max_body_bytes: int = 100_000_000,
    ) -> None:
        self.app = app
        self.body_idle_timeout_s = body_idle_timeout_s
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection; non-HTTP scopes pass straight through."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        header = (REQUEST_ID_HEADER.encode(), request_id.encode())
        body_read = not has_body(scope)

        received = 0

        async def receive_tracking() -> Message:
            nonlocal body_read, received
            if body_read:  # now a wait for the disconnect (SSE), which may be long
                return await receive()
            try:
                async with asyncio.timeout(self.body_idle_timeout_s):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"no byte of the request body arrived for {self.body_idle_timeout_s:g} s"
                ) from None
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise FileTooLarge(
                    f"the request is larger than the limit of {self.max_body_bytes} bytes"
                )
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read = True
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [
                    (name, value)
                    for name, value in message.get("headers", ())
                    if name.lower() != header[0]
                ]
                headers.append(header)
                if not body_read:
                    # Refused before its body was read (too large, unauthenticated,
                    # ...): closing is the only way to stop the server reading and
                    # discarding the rest, which could be gigabytes.
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        started = time.perf_counter()
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive_tracking, send_with_id)
            finally:
                _record(scope, status, time.perf_counter() - started)


# The labelled metrics of each (method, route template, status), found once: looking a
# child up by labels takes a lock and builds a key each time. Route templates and the
# methods the HTTP parser accepts are finite, so this stays small.
_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def _record(scope: Scope, status: int, elapsed_s: float) -> None:
    method: str = scope.get("method", "")
    route = route_template(scope)
    children = _children.get((method, route, status))
    if children is None:
        labels = {"method": method, "route": route, "status": str(status)}
        children = (
            metrics.HTTP_REQUESTS.labels(**labels),
            metrics.HTTP_REQUEST_DURATION.labels(**labels),
        )
        _children[method, route, status] = children
    children[0].inc()
    children[1].observe(elapsed_s)
    access_log.info(
        "http_request",
        method=method,
        path=scope.get("path", ""),
        route=route,
        status=status,
        duration_ms=round(elapsed_s * 1000, 2),
    )


def install(app: FastAPI, settings: Settings) -> None:
    """Wrap `app`'s whole middleware stack in `RequestContextMiddleware`.

    Starlette always puts `ServerErrorMiddleware` outermost, and it answers 500s
    itself; wrapping the built stack is the only way for those answers to get a
    request id too.

    Args:
        app: The FastAPI app.
        settings: Where `body_idle_timeout_s` and the upload limit come from.
    """
    build_stack = app.build_middleware_stack

    def build_wrapped_stack() -> ASGIApp:
        return RequestContextMiddleware(
            build_stack(),
            body_idle_timeout_s=settings.body_idle_timeout_s,
            max_body_bytes=settings.max_upload_bytes,
        )

    app.build_middleware_stack = build_wrapped_stack  # type: ignore[method-assign]
