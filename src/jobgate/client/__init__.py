"""The jobgate SDK: `Client` (blocking) and `AsyncClient` (asyncio) for the v1 HTTP API.

    from jobgate.client import Client

    with Client("http://127.0.0.1:8000", api_key="jg_...") as client:
        job = client.submit("steps", {"steps": 5})
        for event in client.events(job.id):
            print(event.type, event.data)
        print(client.wait(job.id).result)

See `docs/sdk.md`.
"""

from jobgate.client._async import AsyncClient
from jobgate.client._base import DEFAULT_URL, Retries
from jobgate.client._errors import (
    BadRequestError,
    ConflictError,
    DownloadError,
    ForbiddenError,
    InvalidRequestError,
    JobgateError,
    NotAcceptableError,
    NotFoundError,
    PayloadTooLargeError,
    ProblemError,
    RateLimitedError,
    ServerError,
    TransportError,
    UnauthorizedError,
    UnavailableError,
    UnsupportedMediaTypeError,
    WaitTimeout,
)
from jobgate.client._files import FileInput
from jobgate.client._models import (
    TERMINAL_EVENTS,
    TERMINAL_STATUSES,
    Artifact,
    Cost,
    Download,
    Event,
    FileInfo,
    Job,
    JobError,
    JobPage,
    JobSpec,
    JobStatuses,
    Me,
    Problem,
    ProblemItem,
    Record,
    RecordCounts,
    RecordPage,
    Stage,
    Webhook,
)
from jobgate.client._sse import ServerSentEvent, SSEDecoder
from jobgate.client._stream import Reconnect
from jobgate.client._sync import Client

__all__ = [
    "DEFAULT_URL",
    "TERMINAL_EVENTS",
    "TERMINAL_STATUSES",
    "Artifact",
    "AsyncClient",
    "BadRequestError",
    "Client",
    "ConflictError",
    "Cost",
    "Download",
    "DownloadError",
    "Event",
    "FileInfo",
    "FileInput",
    "ForbiddenError",
    "InvalidRequestError",
    "Job",
    "JobError",
    "JobPage",
    "JobSpec",
    "JobStatuses",
    "JobgateError",
    "Me",
    "NotAcceptableError",
    "NotFoundError",
    "PayloadTooLargeError",
    "Problem",
    "ProblemError",
    "ProblemItem",
    "RateLimitedError",
    "Reconnect",
    "Record",
    "RecordCounts",
    "RecordPage",
    "Retries",
    "SSEDecoder",
    "ServerError",
    "ServerSentEvent",
    "Stage",
    "TransportError",
    "UnauthorizedError",
    "UnavailableError",
    "UnsupportedMediaTypeError",
    "WaitTimeout",
    "Webhook",
]
