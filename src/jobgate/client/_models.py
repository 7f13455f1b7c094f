"""What the API answers, as typed models (API.md).

Every model accepts fields it does not know (`extra="allow"`, kept in `model_extra`) and
statuses are plain strings, so a newer server never breaks an older client.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
"""Job statuses that do not change any more (unless the job is retried)."""

TERMINAL_EVENTS = frozenset({"completed", "error", "cancelled"})
"""Event types after which a job's stream ends."""


class Model(BaseModel):
    """The base of every answer: unknown fields are kept, not refused."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class ProblemItem(Model):
    """One located complaint of a `validation-error`."""

    loc: list[str | int] = Field(default_factory=list)
    msg: str = ""
    type: str | None = None


class Problem(Model):
    """An RFC 9457 problem document: every 4xx/5xx answer."""

    type: str = "about:blank"
    title: str = ""
    status: int = 0
    detail: str = ""
    instance: str | None = None
    request_id: str | None = None
    errors: list[ProblemItem] | None = None

    @property
    def slug(self) -> str:
        """The last part of `type`: `not-found`, `rate-limited`, ..."""
        return self.type.rstrip("/").rsplit("/", 1)[-1]


class FileInfo(Model):
    """An input file of a job, or an uploaded file (`POST /v1/files`)."""

    name: str
    sha256: str
    size: int
    content_type: str


class Stage(Model):
    """One stage of a job."""

    name: str
    status: str
    attempt: int = 0
    progress: float = 0.0
    started_at: str | None = None
    finished_at: str | None = None
    error: dict[str, Any] | None = None


class Cost(Model):
    """A job's money: the pre-flight estimate, what it spent, and its limit."""

    estimated_usd: float = 0.0
    actual_usd: float = 0.0
    budget_usd: float = 0.0


class Artifact(Model):
    """A file a job produced."""

    name: str
    sha256: str
    size: int
    content_type: str
    primary: bool = False


class RecordCounts(Model):
    """How many map-stage items succeeded and failed, of how many expected."""

    succeeded: int = 0
    failed: int = 0
    expected: int = 0


class JobError(Model):
    """Why a job failed: `stage_failed`, `timeout`, `budget_exceeded` or `lost`."""

    type: str = ""
    message: str = ""
    stage: str | None = None


class Job(Model):
    """A job, as `GET /v1/jobs/{id}` shows it."""

    id: str
    pipeline: str
    pipeline_version: str = ""
    owner: str = ""
    status: str
    cancel_requested: bool = False
    progress: float = 0.0
    stage: str | None = None
    stages: list[Stage] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)
    files: list[FileInfo] = Field(default_factory=list)
    priority: int = 0
    correlation_id: str | None = None
    cost: Cost = Field(default_factory=Cost)
    result: Any = None
    error: JobError | None = None
    artifacts: list[Artifact] = Field(default_factory=list)
    records: RecordCounts = Field(default_factory=RecordCounts)
    created_at: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    links: dict[str, str] = Field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """True once the job succeeded, failed or was cancelled."""
        return self.status in TERMINAL_STATUSES


class JobPage(Model):
    """One page of `GET /v1/jobs`, newest first."""

    jobs: list[Job]
    total: int
    limit: int
    offset: int


class JobStatuses(Model):
    """`POST /v1/jobs/status`: the jobs found, and the ids that were not (or not yours)."""

    jobs: list[Job]
    not_found: list[str] = Field(default_factory=list)


class Record(Model):
    """The result of one item of a map stage."""

    key: str
    stage: str = ""
    status: str
    data: Any = None
    error: dict[str, Any] | None = None


class RecordPage(Model):
    """One page of `GET /v1/jobs/{id}/records`."""

    records: list[Record]
    total: int
    limit: int
    offset: int


class Download(Model):
    """A signed, absolute download URL and what it serves."""

    download_url: str
    expires_in: int
    filename: str
    sha256: str
    size: int
    content_type: str


class Me(Model):
    """`GET /v1/me`: the caller's id and roles, its limits and its usage."""

    id: str
    roles: list[str]
    limits: dict[str, Any] = Field(default_factory=dict)
    usage: dict[str, Any] = Field(default_factory=dict)


class Webhook(Model):
    """Where the server announces a job's end."""

    url: str
    events: list[str] = Field(default_factory=lambda: ["completed", "error", "cancelled"])


class JobSpec(Model):
    """One job to create, as an item of `submit_batch` (files by `sha256`, uploaded before)."""

    pipeline: str
    params: dict[str, Any] | None = None
    version: str | None = None
    files: list[str] = Field(default_factory=list)
    priority: int = 0
    budget_usd: float | None = None
    webhook: Webhook | None = None
    correlation_id: str | None = None


class Event(Model):
    """One server-sent event of a job (or of all the caller's jobs).

    `id` is the SSE id: the job's `seq` on a job's stream, a global number on
    `GET /v1/events`; heartbeats have none. `data` is the event's JSON payload.
    """

    type: str
    id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def seq(self) -> int | None:
        """The event's per-job sequence number (None for heartbeats)."""
        seq = self.data.get("seq")
        if isinstance(seq, int):
            return seq
        return int(self.id) if self.id is not None and self.id.isdigit() else None

    @property
    def job_id(self) -> str | None:
        """The job this event is about, when the payload says (`GET /v1/events`, `state`)."""
        value = self.data.get("job_id") or (self.data.get("id") if self.type == "state" else None)
        return str(value) if value is not None else None

    @property
    def job(self) -> Job | None:
        """The full job carried by a `state` event."""
        return Job.model_validate(self.data) if self.type == "state" else None

    @property
    def terminal(self) -> bool:
        """True for the event that ends a job: `completed`, `error` or `cancelled`."""
        return self.type in TERMINAL_EVENTS
