"""The errors jobgate raises, one tree with `JobgateError` at its root.

JobgateError
├── PipelineDefinitionError     a pipeline is declared wrongly (cycle, unknown stage, ...)
├── RequestError                a caller's request is refused; `api/problems.py` maps each
│   ├── MalformedRequest            400 malformed-request
│   ├── ValidationFailed            422 validation-error (with `errors`)
│   ├── UnknownPipeline             422 unknown-pipeline
│   ├── FileTooLarge                413 file-too-large
│   ├── UnsupportedFileType         415 unsupported-file-type
│   ├── TooManyJobs                 422 too-many-jobs
│   ├── BudgetExceeded              422 budget-exceeded
│   ├── Unauthenticated             401 unauthenticated
│   ├── Forbidden                   403 forbidden
│   ├── NotFound                    404 not-found
│   ├── Conflict                    409 conflict
│   ├── IdempotencyConflict         409 idempotency-conflict
│   ├── RateLimited                 429 rate-limited (with `retry_after` and headers)
│   │   └── TooManyStreams              429 too-many-streams
│   └── Unavailable                 503 unavailable
└── StageError                  raised inside stage code, seen by the worker
    ├── JobCancelled                the job was cancelled (`ctx.check_cancelled()`)
    └── BudgetExhausted             the job's actual cost passed its budget
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class JobgateError(Exception):
    """Something went wrong in jobgate."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class PipelineDefinitionError(JobgateError):
    """The pipeline is not declared correctly."""


class RequestError(JobgateError):
    """The request was refused."""

    status = 400
    slug = "malformed-request"
    title = "Malformed request"
    headers: Mapping[str, str] | None = None
    """Headers the problem answer carries (e.g. `Retry-After`)."""

    def __init__(self, message: str | None = None, *, errors: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.errors = errors


class MalformedRequest(RequestError):
    """The request body could not be read."""


class ValidationFailed(RequestError):
    """The request is well-formed but its content is invalid."""

    status, slug, title = 422, "validation-error", "Validation error"


class UnknownPipeline(RequestError):
    """No such pipeline (or pipeline version)."""

    status, slug, title = 422, "unknown-pipeline", "Unknown pipeline"


class RequestTimeout(RequestError):
    """The client stopped sending its request body."""

    status, slug, title = 408, "request-timeout", "Request timeout"


class FileTooLarge(RequestError):
    """The upload is larger than allowed."""

    status, slug, title = 413, "file-too-large", "File too large"


class UnsupportedFileType(RequestError):
    """The file's content is of a type this pipeline does not accept."""

    status, slug, title = 415, "unsupported-file-type", "Unsupported file type"


class TooManyJobs(RequestError):
    """Too many jobs in one request."""

    status, slug, title = 422, "too-many-jobs", "Too many jobs"


class BudgetExceeded(RequestError):
    """The job's estimated cost is over its budget."""

    status, slug, title = 422, "budget-exceeded", "Budget exceeded"


class Unauthenticated(RequestError):
    """Missing or invalid credentials."""

    status, slug, title = 401, "unauthenticated", "Unauthenticated"


class Forbidden(RequestError):
    """The caller's roles do not allow this."""

    status, slug, title = 403, "forbidden", "Forbidden"


class NotFound(RequestError):
    """No such resource."""

    status, slug, title = 404, "not-found", "Not found"


class Conflict(RequestError):
    """The resource is not in a state that allows this."""

    status, slug, title = 409, "conflict", "Conflict"


class IdempotencyConflict(RequestError):
    """This Idempotency-Key was already used with a different request."""

    status, slug, title = 409, "idempotency-conflict", "Idempotency conflict"


class RateLimited(RequestError):
    """Too many requests; try again later.

    Every 429 jobgate answers is one of these, so every one carries `Retry-After`.
    """

    status, slug, title = 429, "rate-limited", "Too many requests"

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after: int = 1,
        headers: Mapping[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message, errors=errors)
        self.retry_after = max(1, retry_after)
        self.headers = {**(headers or {}), "Retry-After": str(self.retry_after)}


class TooManyStreams(RateLimited):
    """The job has as many open event streams as it may.

    A `RateLimited`, as every 429 is, so it carries `Retry-After` too.
    """

    slug, title = "too-many-streams", "Too many streams"


class Unavailable(RequestError):
    """A backend jobgate needs is not answering."""

    status, slug, title = 503, "unavailable", "Service unavailable"


class StageError(JobgateError):
    """Raised inside stage code to stop the stage."""


class JobCancelled(StageError):
    """The job was cancelled."""


class BudgetExhausted(StageError):
    """The job's actual cost passed its budget."""


class StoreUnreachable(StageError):
    """The store did not answer while a stage's context wrote to it, for as long as the
    stage's lease lasts: the stage stops, and its task goes back to the queue when the
    lease ends, as after a crash (it is not the stage's own failure)."""
