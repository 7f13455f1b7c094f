"""Request and response bodies of the job, file, artifact and event routes.

Request bodies forbid unknown fields (`extra="forbid"`), so a client cannot set
`owner`, `status` or `cost` by mass assignment. Response models mirror
`api/views.py` exactly; they exist so `/openapi.json` documents every answer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, HttpUrl

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
StageStatus = Literal["pending", "queued", "running", "succeeded", "failed", "cancelled", "skipped"]
WebhookEvent = Literal["completed", "error", "cancelled"]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lowercase hex SHA-256")]

MAX_FILES_PER_JOB = 1000
"""More file references than any pipeline could take are refused while parsing."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests --------------------------------------------------------------------------


def _all_webhook_events() -> list[WebhookEvent]:
    return ["completed", "error", "cancelled"]


class Webhook(_Strict):
    """Where to announce the job's end: a signed POST per event (docs/webhooks.md)."""

    url: HttpUrl
    events: list[WebhookEvent] = Field(default_factory=_all_webhook_events, min_length=1)


def _int_as_str(value: Any) -> Any:
    """Versions are labels; `1` means `"1"` (booleans stay invalid)."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class FileRef(_Strict):
    """A file uploaded before (`POST /v1/files`), with the name the job should see."""

    sha256: Sha256
    name: str | None = Field(None, max_length=1024)


class JobSubmit(_Strict):
    """One job to create: `POST /v1/jobs` (JSON) or an item of `POST /v1/jobs/batch`."""

    pipeline: str = Field(min_length=1, max_length=64)
    version: Annotated[str | None, BeforeValidator(_int_as_str)] = Field(None, max_length=64)
    params: dict[str, Any] | None = None
    files: list[Sha256 | FileRef] = Field(default_factory=list, max_length=MAX_FILES_PER_JOB)
    priority: int = Field(0, ge=-100, le=100, description="higher runs first")
    budget_usd: float | None = Field(
        None, ge=0, description="at most JOBGATE_JOB_BUDGET_USD, which is the default"
    )
    webhook: Webhook | None = None
    correlation_id: str | None = Field(None, max_length=255)


class JobBatchSubmit(_Strict):
    """`POST /v1/jobs/batch`: all of these jobs, or none."""

    jobs: list[JobSubmit] = Field(min_length=1)


class JobStatusQuery(_Strict):
    """`POST /v1/jobs/status`: the jobs to read."""

    ids: list[Annotated[str, Field(max_length=64)]]


# -- responses -------------------------------------------------------------------------


class StageView(BaseModel):
    """One stage of a job."""

    name: str
    status: StageStatus
    attempt: int
    progress: float
    started_at: str | None
    finished_at: str | None
    error: dict[str, Any] | None


class FileView(BaseModel):
    """An input file of a job, or a stored upload."""

    name: str
    sha256: str
    size: int
    content_type: str


class Cost(BaseModel):
    """A job's money: the pre-flight estimate, what it spent, and its limit."""

    estimated_usd: float
    actual_usd: float
    budget_usd: float


class ArtifactView(BaseModel):
    """A file a job produced."""

    name: str
    sha256: str
    size: int
    content_type: str
    primary: bool


class RecordCounts(BaseModel):
    """How many map-stage items succeeded and failed, of how many expected."""

    succeeded: int
    failed: int
    expected: int


class JobLinks(BaseModel):
    """Relative paths of the job's sub-resources."""

    model_config = ConfigDict(populate_by_name=True)

    self_: str = Field(alias="self")
    events: str
    artifacts: str
    cancel: str


class Job(BaseModel):
    """A job as every route shows it."""

    id: str
    pipeline: str
    pipeline_version: str
    owner: str
    status: JobStatus
    cancel_requested: bool
    progress: float
    stage: str | None
    stages: list[StageView]
    params: dict[str, Any]
    files: list[FileView]
    priority: int
    correlation_id: str | None
    cost: Cost
    result: Any
    error: dict[str, Any] | None
    artifacts: list[ArtifactView]
    records: RecordCounts
    created_at: str
    started_at: str | None
    finished_at: str | None
    links: JobLinks


class JobList(BaseModel):
    """A page of jobs, newest first."""

    jobs: list[Job]
    total: int
    limit: int
    offset: int


class JobBatch(BaseModel):
    """Jobs in the order they were submitted."""

    jobs: list[Job]


class JobStatusResult(BaseModel):
    """The jobs found, in the order asked, and the ids that were not (or not yours)."""

    jobs: list[Job]
    not_found: list[str]


class RecordView(BaseModel):
    """The result of one item of a map stage."""

    key: str
    stage: str
    status: Literal["succeeded", "failed"]
    data: Any
    error: dict[str, Any] | None


class RecordPage(BaseModel):
    """A page of records."""

    records: list[RecordView]
    total: int
    limit: int
    offset: int


class EventView(BaseModel):
    """One stored event of a job."""

    seq: int
    type: str
    data: dict[str, Any]
    created_at: str


class EventPage(BaseModel):
    """Stored events after `after`, oldest first."""

    events: list[EventView]


class StreamToken(BaseModel):
    """`POST /v1/jobs/{id}/events/token`: a signed stream URL for `EventSource`."""

    url: str
    expires_in: int


class UploadedFiles(BaseModel):
    """`POST /v1/files`: the stored files, in upload order."""

    files: list[FileView]


class ArtifactList(BaseModel):
    """A job's artifacts."""

    artifacts: list[ArtifactView]


class Download(BaseModel):
    """A signed, absolute download URL and what it serves."""

    download_url: str
    expires_in: int
    filename: str
    sha256: str
    size: int
    content_type: str


# -- OpenAPI for bodies the routes read themselves ---------------------------------------

SUBMIT_FORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["pipeline"],
    "properties": {
        "pipeline": {"type": "string"},
        "version": {"type": "string"},
        "params": {"type": "string", "description": "a JSON object"},
        "priority": {"type": "integer", "minimum": -100, "maximum": 100},
        "budget_usd": {"type": "number", "minimum": 0},
        "correlation_id": {"type": "string"},
        "webhook": {"type": "string", "description": 'JSON: {"url", "events"}'},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
    },
}
"""The multipart form of `POST /v1/jobs`."""

FILES_FORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["files"],
    "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
    },
}
"""The multipart form of `POST /v1/files`."""


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    return schema


def request_body(
    model: type[BaseModel] | None = None, *, multipart: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`openapi_extra` documenting a body that the route reads itself.

    Routes read their bodies after authentication (FastAPI would parse a declared body
    first, answering 400 before 401), so the body is described here instead.
    """
    content: dict[str, Any] = {}
    if model is not None:
        schema = model.model_json_schema()
        content["application/json"] = {"schema": _inline(schema, schema.get("$defs", {}))}
    if multipart is not None:
        content["multipart/form-data"] = {"schema": multipart}
    return {"requestBody": {"required": True, "content": content}}


# -- webhooks --------------------------------------------------------------------------

WebhookDeliveryStatus = Literal["pending", "succeeded", "failed", "dead"]


class WebhookSecret(BaseModel):
    """The caller's webhook signing secret: `whsec_` and base64 (Standard Webhooks)."""

    key: str


class WebhookDelivery(BaseModel):
    """One webhook delivery of a job: its id is the `webhook-id` of every attempt."""

    id: str
    event: WebhookEvent
    url: str
    status: WebhookDeliveryStatus
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: str
    next_attempt_at: str | None
    delivered_at: str | None


class WebhookDeliveryList(BaseModel):
    """`GET /v1/jobs/{id}/webhooks`: the job's deliveries, oldest first."""

    deliveries: list[WebhookDelivery]
