"""`POST /v1/files`: upload files once, then name them by `sha256` in submissions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request

from jobgate.api.deps import CurrentPrincipal, StateDep
from jobgate.api.models import FILES_FORM_SCHEMA, UploadedFiles, request_body
from jobgate.api.schemas import problem_responses
from jobgate.api.uploads import body_kind, parse_form
from jobgate.errors import ValidationFailed
from jobgate.ids import now
from jobgate.store.repositories import blobs as blob_repo

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post(
    "",
    status_code=201,
    response_model=UploadedFiles,
    summary="Upload files",
    responses=problem_responses(400, 401, 403, 413, 415, 422),
    openapi_extra=request_body(multipart=FILES_FORM_SCHEMA),
)
async def upload_files(
    request: Request, state: StateDep, principal: CurrentPrincipal
) -> dict[str, Any]:
    """Store each `files` part (the same bytes once) and let the caller use it.

    The parts are published under their hashes only once the whole form is read, just
    before their rows are written (`uploads.Form.publish`)."""
    principal.require_write()
    if body_kind(request) != "multipart":
        raise HTTPException(415, "send multipart/form-data with one or more files parts")
    settings = state.settings
    form = await parse_form(
        request,
        state.blobs,
        max_bytes=settings.max_upload_bytes,
        max_parts=settings.max_upload_parts,
        text_fields=(),
    )
    try:
        if not form.files:
            raise ValidationFailed(
                "no files parts",
                errors=[{"loc": ["files"], "msg": "At least one file is required"}],
            )
        await form.publish()  # the whole form is read: now, just before the rows
        at = now()
        async with state.db.write() as conn:
            await blob_repo.add(
                conn,
                (
                    blob_repo.BlobRow(sha256=f.sha256, size=f.size, content_type=f.bytes_type)
                    for f in form.files
                ),
                at=at,
            )
            await blob_repo.grant(conn, (f.sha256 for f in form.files), owner=principal.id, at=at)
    except BaseException:
        await form.discard(state.blobs, state.db)
        raise
    return {
        "files": [
            {"sha256": f.sha256, "size": f.size, "content_type": f.content_type, "name": f.name}
            for f in form.files
        ]
    }
