"""What the SDK raises, one tree under jobgate's `JobgateError`.

JobgateError
├── ProblemError                the server refused: a 4xx/5xx with its RFC 9457 `problem`
│   ├── BadRequestError             400 malformed-request
│   ├── UnauthorizedError           401 unauthenticated
│   ├── ForbiddenError              403 forbidden
│   ├── NotFoundError               404 not-found
│   ├── NotAcceptableError          406 (e.g. no event streams on this server)
│   ├── ConflictError               409 conflict, idempotency-conflict
│   ├── PayloadTooLargeError        413 file-too-large
│   ├── UnsupportedMediaTypeError   415 unsupported-file-type
│   ├── InvalidRequestError         422 validation-error, unknown-pipeline, budget-exceeded, ...
│   ├── RateLimitedError            429 rate-limited, too-many-streams (with `retry_after`)
│   └── ServerError                 5xx
│       └── UnavailableError            503 unavailable (with `retry_after`)
├── TransportError              no answer: cannot connect, connection lost (a `ConnectionError`)
│   └── DownloadError               a download arrived short or corrupt
└── WaitTimeout                 `wait()` ran out of time (a `TimeoutError`)
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from pydantic import ValidationError

from jobgate.client._models import Job, Problem
from jobgate.errors import JobgateError

__all__ = [
    "BadRequestError",
    "ConflictError",
    "DownloadError",
    "ForbiddenError",
    "InvalidRequestError",
    "JobgateError",
    "NotAcceptableError",
    "NotFoundError",
    "PayloadTooLargeError",
    "ProblemError",
    "RateLimitedError",
    "ServerError",
    "TransportError",
    "UnauthorizedError",
    "UnavailableError",
    "UnsupportedMediaTypeError",
    "WaitTimeout",
]


class ProblemError(JobgateError):
    """The server refused the request."""

    def __init__(self, problem: Problem, headers: Mapping[str, str] | None = None) -> None:
        text = f"{problem.status} {problem.title}".strip()
        super().__init__(f"{text}: {problem.detail}" if problem.detail else text)
        self.problem = problem
        self.headers: Mapping[str, str] = headers or {}

    @property
    def status(self) -> int:
        """The HTTP status code."""
        return self.problem.status

    @property
    def type(self) -> str:
        """The problem type URI, e.g. `https://jobgate.dev/problems/not-found`."""
        return self.problem.type

    @property
    def slug(self) -> str:
        """The problem type's last part, e.g. `not-found`."""
        return self.problem.slug

    @property
    def title(self) -> str:
        """A short summary of the problem type."""
        return self.problem.title

    @property
    def detail(self) -> str:
        """What went wrong with this request."""
        return self.problem.detail

    @property
    def errors(self) -> list[dict[str, Any]]:
        """The located complaints of a validation error (`[{"loc", "msg"}]`), or `[]`."""
        return [item.model_dump() for item in self.problem.errors or []]

    @property
    def request_id(self) -> str | None:
        """The server's id for the request, to quote when reporting a problem."""
        return self.problem.request_id or self.headers.get("x-request-id")


class BadRequestError(ProblemError):
    """The request could not be read."""


class UnauthorizedError(ProblemError):
    """Missing or invalid credentials."""


class ForbiddenError(ProblemError):
    """The caller's roles do not allow this (or a signed URL was tampered with or expired)."""


class NotFoundError(ProblemError):
    """No such resource (or it belongs to someone else)."""


class NotAcceptableError(ProblemError):
    """The server cannot answer in the media type asked for."""


class ConflictError(ProblemError):
    """The resource is not in a state that allows this."""


class PayloadTooLargeError(ProblemError):
    """The upload is larger than allowed."""


class UnsupportedMediaTypeError(ProblemError):
    """A file's content is of a type the pipeline does not accept."""


class InvalidRequestError(ProblemError):
    """The request is well-formed but its content is refused (see `errors`)."""


def retry_after(headers: Mapping[str, str]) -> float | None:
    """`Retry-After` in seconds: delay-seconds, or an HTTP date (RFC 9110), which a
    proxy or load balancer may send in jobgate's place."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


class RateLimitedError(ProblemError):
    """Too many requests; `retry_after` says how many seconds to wait."""

    @property
    def retry_after(self) -> float | None:
        """Seconds until a retry may succeed (the `Retry-After` header), if the server said."""
        return retry_after(self.headers)


class ServerError(ProblemError):
    """The server failed to answer the request."""


class UnavailableError(ServerError):
    """A backend the server needs is not answering; retry after `retry_after` seconds."""

    @property
    def retry_after(self) -> float | None:
        """Seconds until a retry may succeed (the `Retry-After` header), if the server said."""
        return retry_after(self.headers)


class TransportError(JobgateError, ConnectionError):
    """The server could not be reached, or the connection was lost."""


class DownloadError(TransportError):
    """The downloaded file is not what the server announced."""


class WaitTimeout(JobgateError, TimeoutError):
    """The job did not finish in time."""

    def __init__(self, message: str | None = None, *, job: Job | None = None) -> None:
        super().__init__(message)
        self.job = job
        """The job as last seen, if it was seen at all."""


_BY_STATUS: dict[int, type[ProblemError]] = {
    400: BadRequestError,
    401: UnauthorizedError,
    403: ForbiddenError,
    404: NotFoundError,
    406: NotAcceptableError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: InvalidRequestError,
    429: RateLimitedError,
    503: UnavailableError,
}


def problem_of(response: httpx.Response) -> Problem:
    """The problem document of an error answer; one is made up if the body is not one."""
    try:
        body = response.json()
        if isinstance(body, dict) and "type" in body:
            problem = Problem.model_validate(body)
            return (
                problem
                if problem.status
                else problem.model_copy(update={"status": response.status_code})
            )
    except (ValueError, ValidationError):
        pass
    # Not from jobgate (a proxy's HTML page, say): keep a short, plain extract.
    return Problem(
        title=response.reason_phrase,
        status=response.status_code,
        detail=response.text[:500].strip(),
        instance=response.request.url.path,
    )


def error_for(response: httpx.Response) -> ProblemError:
    """The exception that stands for an error answer (its body must have been read)."""
    problem = problem_of(response)
    status = response.status_code
    kind = _BY_STATUS.get(status) or (ServerError if status >= 500 else ProblemError)
    return kind(problem, response.headers)


def media_type(response: httpx.Response) -> str:
    """The answer's media type, lowercased, without parameters ("" if none)."""
    return str(response.headers.get("content-type", "")).split(";")[0].strip().lower()


def unexpected_answer(response: httpx.Response, wanted: str = "the API's JSON") -> ProblemError:
    """A success that is not what the API answers (a proxy's or a captive portal's
    page, or the JSON page where a stream was asked for), as an error the caller can
    catch with the others: `NotAcceptableError`, with an extract of what came."""
    extract = response.text[:200].strip()
    problem = Problem(
        title="Not acceptable",
        status=406,
        detail=f"the server answered {response.status_code} {media_type(response) or 'nothing'}, "
        f"not {wanted}: {extract!r}",
        instance=response.request.url.path,
    )
    return NotAcceptableError(problem, response.headers)


def raise_for_problem(response: httpx.Response) -> None:
    """Raise the matching `ProblemError` if `response` is a 4xx/5xx (body already read)."""
    if response.is_error:
        raise error_for(response)


def transport_error(exc: httpx.TransportError, url: str) -> TransportError:
    """httpx's connection failure, as the SDK's. The URL is named without its query:
    a signed download URL's query is a credential, live until it expires."""
    shown = url.split("?", 1)[0].split("#", 1)[0]
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        what = f"cannot reach {shown}"
    else:  # reached, then the connection failed
        what = f"the connection to {shown} failed"
    return TransportError(f"{what}: {type(exc).__name__}: {exc}".rstrip(": "))
