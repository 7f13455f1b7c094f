"""`GET /v1/jobs/{id}/events`: the job's stored events as JSON pages (SSE comes later)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request

from jobgate.api import views
from jobgate.api.deps import CurrentPrincipal, StateDep
from jobgate.api.models import EventPage
from jobgate.api.schemas import problem_responses
from jobgate.store.repositories import events as event_repo
from jobgate.store.repositories import jobs as job_repo

router = APIRouter(prefix="/v1/jobs/{job_id}", tags=["events"])

EVENTS_MAX_LIMIT = 1000


@router.get(
    "/events",
    response_model=EventPage,
    summary="A job's stored events",
    responses=problem_responses(401, 404, 406, 422),
)
async def list_events(
    job_id: str,
    request: Request,
    state: StateDep,
    principal: CurrentPrincipal,
    after: Annotated[int, Query(ge=0, description="the last seq already seen")] = 0,
    limit: Annotated[int, Query(ge=1, description="capped at 1000")] = 100,
) -> dict[str, Any]:
    """Stored events with `seq > after`, oldest first."""
    async with state.db.read() as conn:
        await job_repo.get(conn, job_id, owner=principal.owner_filter())
        if "text/event-stream" in request.headers.get("accept", ""):
            raise HTTPException(406, "event streams are not available yet; ask for JSON")
        rows = await event_repo.page(conn, job_id, after=after, limit=min(limit, EVENTS_MAX_LIMIT))
    return {"events": [views.event(r) for r in rows]}
