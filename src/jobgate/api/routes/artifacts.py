"""`/v1/jobs/{id}/artifacts` and `/download`: what a job produced, as signed URLs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter

from jobgate.api import views
from jobgate.api.deps import CurrentPrincipal, StateDep
from jobgate.api.models import ArtifactList, Download
from jobgate.api.schemas import problem_responses
from jobgate.api.state import AppState
from jobgate.blobs.signing import sign_blob_url
from jobgate.errors import NotFound
from jobgate.ids import now
from jobgate.pipelines.files import sanitize_filename
from jobgate.store.repositories import artifacts as artifact_repo
from jobgate.store.repositories import jobs as job_repo

router = APIRouter(prefix="/v1/jobs/{job_id}", tags=["artifacts"])


def download(state: AppState, row: Mapping[Any, Any]) -> dict[str, Any]:
    """A signed, absolute URL for an artifact, based on `JOBGATE_PUBLIC_URL` (never Host)."""
    settings = state.settings
    ttl = settings.signed_url_ttl_s
    filename = sanitize_filename(str(row["name"]))
    url = sign_blob_url(
        key=settings.signing_key,
        public_url=settings.public_url,
        sha256=row["sha256"],
        filename=filename,
        content_type=row["content_type"],
        expires_at=math.ceil(now()) + ttl,
    )
    return {
        "download_url": url,
        "expires_in": ttl,
        "filename": filename,
        "sha256": row["sha256"],
        "size": int(row["size"]),
        "content_type": row["content_type"],
    }


@router.get(
    "/artifacts",
    response_model=ArtifactList,
    summary="A job's artifacts",
    responses=problem_responses(401, 404),
)
async def list_artifacts(
    job_id: str, state: StateDep, principal: CurrentPrincipal
) -> dict[str, Any]:
    """Every artifact of the job."""
    async with state.db.read() as conn:
        snapshot = await job_repo.get(conn, job_id, owner=principal.owner_filter())
    return {"artifacts": [views.artifact(a) for a in snapshot.artifacts]}


@router.get(
    "/artifacts/{name:path}",
    response_model=Download,
    summary="A signed download URL for one artifact",
    responses=problem_responses(401, 404),
)
async def get_artifact(
    job_id: str, name: str, state: StateDep, principal: CurrentPrincipal
) -> dict[str, Any]:
    """The artifact named `name`, as a URL that works without credentials until it expires."""
    async with state.db.read() as conn:
        await job_repo.get(conn, job_id, owner=principal.owner_filter())
        row = await artifact_repo.artifact(conn, job_id, name)
    if row is None:
        raise NotFound(f"job {job_id} has no artifact {name[:255]!r}")
    return download(state, row)


@router.get(
    "/download",
    response_model=Download,
    summary="A signed download URL for the primary artifact",
    responses=problem_responses(401, 404),
)
async def download_primary(
    job_id: str, state: StateDep, principal: CurrentPrincipal
) -> dict[str, Any]:
    """The job's primary artifact; 404 when it has none."""
    async with state.db.read() as conn:
        await job_repo.get(conn, job_id, owner=principal.owner_filter())
        row = await artifact_repo.primary_artifact(conn, job_id)
    if row is None:
        raise NotFound(f"job {job_id} has no primary artifact")
    return download(state, row)
