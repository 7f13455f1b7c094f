"""Events: a job's log as JSON pages or a live SSE stream, stream tokens for browsers,
and one SSE stream of every job the caller may see (`api/streams.py`)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response

from jobgate.api import views
from jobgate.api.deps import CurrentPrincipal, StateDep
from jobgate.api.models import EventPage, StreamToken
from jobgate.api.schemas import MAX_INT64, MAX_SEQ, problem_responses
from jobgate.api.state import AppState
from jobgate.api.streams import EventStreamResponse, all_stream, job_stream
from jobgate.auth import Principal
from jobgate.auth.api_keys import authenticate_request
from jobgate.blobs.signing import sign_token, verify_token
from jobgate.errors import Forbidden, ValidationFailed
from jobgate.ids import now
from jobgate.store.repositories import events as event_repo
from jobgate.store.repositories import jobs as job_repo

router = APIRouter(tags=["events"])

EVENTS_MAX_LIMIT = 1000
STREAM_PURPOSE = "job-events"
# One SSE event, as a client's parser sees it (what tools that read streams check).
SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string", "description": "JSON"},
        "id": {"type": "string", "description": "seq, or the global id on /v1/events"},
    },
    "required": ["event", "data"],
}
SSE_CONTENT = {"text/event-stream": {"schema": SSE_EVENT}}

# ASCII digits only: `str.isdigit` also takes "²", which `int` refuses.
_EVENT_ID = re.compile(r"[0-9]{1,19}")

LastEventIdHeader = Annotated[
    str | None, Header(alias="Last-Event-ID", description="resume after this event id")
]
LastEventIdQuery = Annotated[
    str | None, Query(description="resume after this event id (for clients without headers)")
]


def _wants_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


def _resume_after(header: str | None, query: str | None, maximum: int) -> int | None:
    """The event id to resume after (the header wins), or None for a fresh stream.

    Raises:
        ValidationFailed: not ASCII digits, or more than `maximum` (what the store holds).
    """
    given = header if header is not None else query
    if given is None or not given.strip():
        return None
    value = given.strip()
    if _EVENT_ID.fullmatch(value) is None or int(value) > maximum:
        raise ValidationFailed(
            "Last-Event-ID must be a non-negative event id",
            errors=[{"loc": ["header", "Last-Event-ID"], "msg": "Not an event id"}],
        )
    return int(value)


async def _owner_filter(
    request: Request, state: AppState, job_id: str, token: str | None
) -> str | None:
    """Whose job `job_id` must be: from a stream token (which names the job), or the
    caller's credentials."""
    if token is not None:
        claims = verify_token(state.settings.signing_key, STREAM_PURPOSE, token, now())
        if claims is None or claims.get("job") != job_id:
            raise Forbidden("the stream token is invalid or expired")
        return None  # it was issued to someone allowed to see this job
    principal: Principal = await authenticate_request(request, state)
    request.state.principal = principal
    return principal.owner_filter()


@router.get(
    "/v1/jobs/{job_id}/events",
    response_model=EventPage,
    summary="A job's events: stored pages (JSON) or a live stream (SSE)",
    responses={
        200: {"content": SSE_CONTENT, "description": "JSON page, or SSE with Accept"},
        **problem_responses(401, 403, 404, 422, 429),
    },
)
async def job_events(
    job_id: str,
    request: Request,
    state: StateDep,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ, description="the last seq already seen")] = 0,
    limit: Annotated[int, Query(ge=1, description="capped at 1000")] = 100,
    token: Annotated[str | None, Query(description="a stream token instead of credentials")] = (
        None
    ),
    last_event_id: LastEventIdQuery = None,
    last_event_id_header: LastEventIdHeader = None,
) -> Any:
    """With `Accept: text/event-stream`: SSE, starting with `state` (or resuming after
    `Last-Event-ID`), ending after the terminal event. Otherwise stored events with
    `seq > after`, oldest first."""
    owner = await _owner_filter(request, state, job_id, token)
    if not _wants_stream(request):
        async with state.db.read() as conn:
            await job_repo.get(conn, job_id, owner=owner)
            rows = await event_repo.page(
                conn, job_id, after=after, limit=min(limit, EVENTS_MAX_LIMIT)
            )
        return views.respond({"events": [views.event(r) for r in rows]})
    resume = _resume_after(last_event_id_header, last_event_id, MAX_SEQ)
    async with state.db.read() as conn:
        await job_repo.get(conn, job_id, owner=owner)
    hub = state.streams
    watch = hub.open(job_id)  # registered before the stream's first read
    chunks = job_stream(
        hub, watch, job_id, resume_after=resume, heartbeat_s=state.settings.sse_heartbeat_s
    )
    return EventStreamResponse(chunks, hub, watch)


@router.post(
    "/v1/jobs/{job_id}/events/token",
    response_model=StreamToken,
    summary="A short-lived signed URL of the job's event stream, for EventSource",
    responses=problem_responses(401, 404),
)
async def stream_token(job_id: str, state: StateDep, principal: CurrentPrincipal) -> Response:
    """`{"url", "expires_in"}`: the URL streams this job's events without credentials
    until it expires (`JOBGATE_STREAM_TOKEN_TTL_S`)."""
    async with state.db.read() as conn:
        await job_repo.get(conn, job_id, owner=principal.owner_filter())
    ttl = state.settings.stream_token_ttl_s
    token = sign_token(
        state.settings.signing_key,
        STREAM_PURPOSE,
        {"job": job_id, "sub": principal.id},
        int(now()) + ttl,
    )
    url = f"{state.settings.public_url}/v1/jobs/{job_id}/events?token={token}"
    return views.respond({"url": url, "expires_in": ttl})


@router.get(
    "/v1/events",
    summary="Every event of every job the caller may see (SSE)",
    response_class=Response,
    responses={
        200: {"content": SSE_CONTENT, "description": "an endless SSE stream"},
        **problem_responses(401, 422, 429),
    },
)
async def all_events(
    request: Request,
    state: StateDep,
    principal: CurrentPrincipal,
    last_event_id: LastEventIdQuery = None,
    last_event_id_header: LastEventIdHeader = None,
) -> Response:
    """Events of all the caller's jobs (an admin's: all jobs) with global, increasing
    ids; each `data` also carries `job_id` and `seq`. Resumes after `Last-Event-ID`."""
    resume = _resume_after(last_event_id_header, last_event_id, MAX_INT64)
    hub = state.streams
    watch = hub.open(None, holder=principal.id)
    try:
        chunks = await all_stream(
            hub,
            watch,
            owner=principal.owner_filter(),
            resume_after=resume,
            heartbeat_s=state.settings.sse_heartbeat_s,
        )
    except BaseException:
        hub.release(watch)
        raise
    return EventStreamResponse(chunks, hub, watch)
