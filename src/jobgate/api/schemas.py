"""Shared API models: the problem document, and the bodies of the identity, admin,
health and pipeline routes.

Request bodies forbid unknown fields (`extra="forbid"`). Response models exist so
`/openapi.json` documents every answer; routes build them from store rows.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobgate.ids import MAX_EPOCH

Role = Literal["admin", "user", "viewer"]

MAX_INT64 = 2**63 - 1
"""The largest integer a query may pass to the store: SQLite and PostgreSQL bind 64-bit
integers, and a larger one fails in the driver. Offsets and event ids beyond it are 422."""

MAX_SEQ = 2**31 - 1
"""The largest per-job event `seq`: a 32-bit column on PostgreSQL, so a larger `after`
or `Last-Event-ID` on a job's events is 422 rather than an error in the driver."""

# -- problems (RFC 9457) ---------------------------------------------------------------


class ProblemItem(BaseModel):
    """One invalid part of a request."""

    loc: list[str | int]
    msg: str
    type: str | None = None


class Problem(BaseModel):
    """An RFC 9457 problem document: every 4xx/5xx answer (`application/problem+json`)."""

    type: str = Field(examples=["https://jobgate.dev/problems/not-found"])
    title: str
    status: int
    detail: str
    instance: str
    request_id: str | None
    errors: list[ProblemItem] | None = None


_PROBLEM_DESCRIPTIONS = {
    400: "Malformed request",
    401: "Missing or invalid credentials (`WWW-Authenticate: Bearer`)",
    403: "The caller's roles do not allow this",
    404: "No such resource (or another owner's)",
    409: "Conflict",
    413: "Too large",
    415: "Unsupported file type",
    416: "The range starts past the end of the file (`Content-Range: bytes */<size>`)",
    422: "Validation error",
    429: "Too many requests",
    503: "A backend is unavailable",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting problem answers with these statuses."""
    return {
        status: {
            "model": Problem,
            "description": _PROBLEM_DESCRIPTIONS.get(status, "Error"),
            "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            },
        }
        for status in statuses
    }


def document_problems_only(app: FastAPI) -> None:
    """Make `app`'s OpenAPI document say what its errors really are.

    Every 4xx/5xx answer is `application/problem+json`, but FastAPI documents the
    `model=` of a response as `application/json` too, and adds its own 422 shape
    (`HTTPValidationError`) to routes with parameters. Both are rewritten to the one
    problem document, so clients and schema checkers see the truth.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            for item in document.get("paths", {}).values():
                for operation in item.values():
                    _problems_only(operation.get("responses", {}))
            document.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
            document.get("components", {}).get("schemas", {}).pop("ValidationError", None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


_PROBLEM_CONTENT = {
    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
}


def _problems_only(responses: dict[str, Any]) -> None:
    for status, response in responses.items():
        if status[:1] not in ("4", "5"):
            continue
        content = response.get("content", {})
        if "application/problem+json" in content:
            response["content"] = {"application/problem+json": content["application/problem+json"]}
        elif status == "422":
            response["content"] = dict(_PROBLEM_CONTENT)
            response["description"] = _PROBLEM_DESCRIPTIONS.get(422, "Validation error")


# -- health ----------------------------------------------------------------------------


class Liveness(BaseModel):
    """`GET /healthz`: the process runs."""

    status: Literal["ok"] = "ok"


class Check(BaseModel):
    """The outcome of one readiness check."""

    ok: bool
    latency_ms: float
    error: str | None = Field(None, description="present when the check failed")


class Readiness(BaseModel):
    """`GET /readyz`: whether every backend answers."""

    status: Literal["ok", "unavailable"]
    checks: dict[str, Check]


class QueueInfo(BaseModel):
    """Stage tasks waiting to be claimed."""

    depth: dict[str, int]


class WorkersInfo(BaseModel):
    """Workers seen recently."""

    live: int


class Health(Readiness):
    """`GET /v1/health`: readiness with queue depth and live workers."""

    queue: QueueInfo
    workers: WorkersInfo


# -- pipelines -------------------------------------------------------------------------


class FileRuleView(BaseModel):
    """The files a pipeline takes."""

    types: list[str]
    max_bytes: int | None
    min_count: int
    max_count: int | None


class StageSpec(BaseModel):
    """One stage of a pipeline."""

    name: str
    after: list[str]
    map: bool
    queue: str
    timeout_s: float | None
    retries: int


class PipelineView(BaseModel):
    """A pipeline: its params schema, files and stages."""

    name: str
    version: str
    description: str
    params_schema: dict[str, Any]
    files: FileRuleView | None
    stages: list[StageSpec]


class PipelineList(BaseModel):
    """`GET /v1/pipelines`."""

    pipelines: list[PipelineView]


# -- identity --------------------------------------------------------------------------


class Limits(BaseModel):
    """The limits that apply to the caller."""

    max_jobs_per_request: int
    max_upload_bytes: int
    max_upload_parts: int
    job_budget_usd: float
    list_max_limit: int
    sse_max_per_job: int
    sse_max_per_user: int
    max_active_jobs_per_user: int | None = Field(None, description="null: unlimited")
    rate_limit_submit: str | None = Field(
        None, description="jobs per sliding window, e.g. 60/minute; null: no limit"
    )
    monthly_budget_usd: float | None = Field(
        None, description="what the caller's jobs of a calendar month may cost; null: no cap"
    )


class Usage(BaseModel):
    """What the caller has used."""

    active_jobs: int
    jobs_total: int
    spent_usd: float
    month_spent_usd: float = Field(
        0.0, description="what the caller's jobs created this calendar month (UTC) cost so far"
    )
    submits_in_window: int | None = Field(
        None, description="jobs submitted in the current sliding window; null: no submit limit"
    )
    submit_remaining: int | None = Field(
        None, description="jobs that may still be submitted now; null: no submit limit"
    )


class Me(BaseModel):
    """`GET /v1/me`: who the caller is, its limits and its usage."""

    id: str
    roles: list[str]
    limits: Limits
    usage: Usage


# -- workers ---------------------------------------------------------------------------


class WorkerView(BaseModel):
    """A live worker process."""

    id: str
    host: str
    pid: int
    queues: list[str]
    pipelines: list[str]
    concurrency: int
    running: int
    started_at: str
    last_seen_at: str


class WorkerList(BaseModel):
    """`GET /v1/workers`."""

    workers: list[WorkerView]


# -- API keys --------------------------------------------------------------------------


class ApiKeyCreate(BaseModel):
    """`POST /v1/api-keys`: owner and roles default to the caller's."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=255)
    owner: str | None = Field(None, min_length=1, max_length=255)
    roles: list[Role] | None = Field(None, min_length=1)
    expires_at: datetime | None = Field(
        None, description="RFC 3339; naive times are UTC; at most 9999-12-31T23:59:59Z"
    )

    @field_validator("expires_at")
    @classmethod
    def _within_year_9999(cls, value: datetime | None) -> datetime | None:
        # `9999-12-31T23:59:59-23:59` parses, but its UTC instant lies in year 10000:
        # no UTC `datetime` holds it, so it could be stored but never shown.
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        if value.timestamp() > MAX_EPOCH:
            raise ValueError("must be at most 9999-12-31T23:59:59Z")
        return value


class ApiKeyView(BaseModel):
    """An API key, without the key itself."""

    id: str
    prefix: str = Field(description="the key's first characters, to recognise it")
    name: str | None
    owner: str
    roles: list[str]
    created_at: str
    expires_at: str | None
    last_used_at: str | None


class ApiKeyCreated(BaseModel):
    """A new API key; `key` is shown this once and never again."""

    id: str
    key: str
    name: str | None
    owner: str
    roles: list[str]
    created_at: str
    expires_at: str | None


class ApiKeyList(BaseModel):
    """`GET /v1/api-keys`."""

    api_keys: list[ApiKeyView]
