"""RFC 9457 problem documents: every 4xx/5xx answer jobgate gives."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from jobgate.errors import RequestError, Unavailable
from jobgate.store.database import (
    OUTAGE_TYPES,
    UNSTORABLE_TEXT_TYPES,
    is_outage,
    is_unstorable_text,
)

PROBLEM_BASE = "https://jobgate.dev/problems/"
MEDIA_TYPE = "application/problem+json"
_SLUG_BY_STATUS = {
    400: ("malformed-request", "Malformed request"),
    401: ("unauthenticated", "Unauthenticated"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    409: ("conflict", "Conflict"),
    413: ("file-too-large", "Request too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    416: ("range-not-satisfiable", "Range not satisfiable"),
    422: ("validation-error", "Validation error"),
    429: ("rate-limited", "Too many requests"),
    503: ("unavailable", "Service unavailable"),
}
STORE_RETRY_AFTER_S = 2
log = structlog.get_logger("jobgate.api")


def problem(
    request: Request,
    status: int,
    slug: str,
    title: str,
    detail: str,
    *,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A problem+json response for `request`.

    It also carries `request.state.response_headers`: headers a route set for every
    answer it may give (the RateLimit headers of a submit), errors included, or a function
    that gives them (built only for an error, then).
    """
    carried = getattr(request.state, "response_headers", None)
    if callable(carried):
        carried = carried()
    if carried:
        headers = {**carried, **(headers or {})}
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "request_id": getattr(request.state, "request_id", None),
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def _clean_loc(loc: tuple[Any, ...] | list[Any]) -> list[Any]:
    return [part for part in loc if part != "body"] or ["body"]


def from_error(request: Request, exc: RequestError) -> JSONResponse:
    """The problem answer of a refused request."""
    headers = dict(exc.headers or {})
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return problem(
        request,
        exc.status,
        exc.slug,
        exc.title,
        exc.message,
        errors=exc.errors,
        headers=headers or None,
    )


async def _on_request_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestError)
    return from_error(request, exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    malformed = False
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        if err.get("type") == "json_invalid" or (err.get("type") == "missing" and loc == ("body",)):
            malformed = True
        # Never echo `input` or value-derived `ctx`: they can carry secrets.
        errors.append({"loc": _clean_loc(loc), "msg": err.get("msg", ""), "type": err.get("type")})
    if malformed:
        detail = "the body is empty or not valid JSON"
        return problem(request, 400, "malformed-request", "Malformed request", detail)
    detail = "the request is invalid"
    return problem(request, 422, "validation-error", "Validation error", detail, errors=errors)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    slug, title = _SLUG_BY_STATUS.get(exc.status_code, ("error", "Error"))
    detail = exc.detail if isinstance(exc.detail, str) else title
    headers = dict(exc.headers) if exc.headers else None
    return problem(request, exc.status_code, slug, title, detail, headers=headers)


async def _on_store_error(request: Request, exc: Exception) -> JSONResponse:
    if is_unstorable_text(exc):
        # In a path, a query or a body: the client's input, which no route can store.
        detail = "a text value holds a NUL character (U+0000), which cannot be stored"
        return problem(request, 422, "validation-error", "Validation error", detail)
    if not is_outage(exc):
        raise exc  # a real bug: on to the 500 handler
    # The store is down or overloaded, not broken: say so, and when to come back.
    log.warning("store_unavailable", path=request.url.path, error=type(exc).__name__)
    refusal = Unavailable("the store cannot be reached just now; retry shortly")
    refusal.headers = {"Retry-After": str(STORE_RETRY_AFTER_S)}
    return from_error(request, refusal)


async def _on_client_disconnect(request: Request, exc: Exception) -> JSONResponse:
    # The client went away mid-body: not a server error, and no one reads the answer.
    # Whatever the request wrote was removed on the way out (`parse_form`).
    log.debug("client_disconnected", path=request.url.path)
    detail = "the client closed the connection before the request was read"
    return problem(request, 400, "malformed-request", "Malformed request", detail)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("request_failed", path=request.url.path, exc_info=exc)
    return problem(
        request,
        500,
        "internal-error",
        "Internal server error",
        "something went wrong; quote the request_id when reporting it",
    )


def install(app: FastAPI) -> None:
    """Route every error through a problem document."""
    app.add_exception_handler(RequestError, _on_request_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(ClientDisconnect, _on_client_disconnect)
    for kind in (*OUTAGE_TYPES, *UNSTORABLE_TEXT_TYPES):
        app.add_exception_handler(kind, _on_store_error)
    app.add_exception_handler(Exception, _on_unexpected)
