"""`/v1/jobs`: submit (one or many), read, list, cancel, retry, and records.

Every route authenticates first, then checks the role, then (submits) the rate limits,
then reads the body: FastAPI body parameters are not used because FastAPI parses them
before dependencies run.
Another owner's job is answered 404, exactly like an unknown one.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from jobgate.api import limits, submit, views
from jobgate.api.deps import CurrentPrincipal, StateDep, current_principal, get_state_of
from jobgate.api.models import (
    SUBMIT_FORM_SCHEMA,
    Job,
    JobBatch,
    JobBatchSubmit,
    JobList,
    JobStatus,
    JobStatusQuery,
    JobStatusResult,
    JobSubmit,
    RecordPage,
    request_body,
)
from jobgate.api.schemas import MAX_INT64, problem_responses
from jobgate.api.state import AppState
from jobgate.auth import Principal
from jobgate.errors import Forbidden, NotFound, TooManyJobs, ValidationFailed
from jobgate.ids import now, parse_rfc3339
from jobgate.store.repositories import idempotency
from jobgate.store.repositories import jobs as job_repo
from jobgate.store.repositories import records as record_repo

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

IDEMPOTENCY_KEY_HELP = "replays the first job for 24 h (≤ 255 chars)"
# The submit routes read their caller and this header themselves (`_submitter`), so
# the header is documented here as FastAPI documents an optional `Header` parameter.
_IDEMPOTENCY_KEY_PARAMETER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": IDEMPOTENCY_KEY_HELP,
    "schema": {
        "anyOf": [{"type": "string"}, {"type": "null"}],
        "description": IDEMPOTENCY_KEY_HELP,
        "title": "Idempotency-Key",
    },
}


async def _submitter(request: Request) -> tuple[AppState, Principal, str | None]:
    """The app state, the authenticated caller and the Idempotency-Key of a submit.

    What `StateDep`, `CurrentPrincipal` and a `Header` parameter give other routes,
    without FastAPI's dependency solving: on the hottest route that cost about 70 µs a
    request, an eighth of a whole submit's CPU.
    """
    state = get_state_of(request)
    principal = await current_principal(request, state)
    return state, principal, request.headers.get("idempotency-key")


RECORDS_MAX_LIMIT = 1000


def _request_hash(key: str | None, kind: str, fingerprint: Callable[[], Any]) -> str:
    """What an Idempotency-Key is bound to; nothing to compute without a key."""
    return "" if key is None else idempotency.request_hash(kind, fingerprint())


def _too_many(raw: Any, key: str, limit: int) -> None:
    """Refuse more than `limit` items before validating any of them."""
    if isinstance(raw, dict) and isinstance(raw.get(key), list) and len(raw[key]) > limit:
        raise TooManyJobs(
            f"at most {limit} jobs per request, not {len(raw[key])}",
            errors=[{"loc": [key], "msg": f"At most {limit} items"}],
        )


def _batch_size(raw: Any) -> int:
    """The jobs a batch body asks for, counted before it is validated (rate limits come first)."""
    jobs = raw.get("jobs") if isinstance(raw, dict) else None
    return len(jobs) if isinstance(jobs, list) else 1


@router.post(
    "",
    status_code=202,
    response_model=Job,
    summary="Submit a job",
    responses={
        200: {"model": Job, "description": "An Idempotency-Key replay: the first job"},
        **problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 429),
    },
    openapi_extra={
        **request_body(JobSubmit, multipart=SUBMIT_FORM_SCHEMA),
        "parameters": [_IDEMPOTENCY_KEY_PARAMETER],
    },
)
async def submit_job(request: Request) -> Response:
    """Create a job from JSON (files by `sha256`) or multipart (files streamed in)."""
    state, principal, idempotency_key = await _submitter(request)
    principal.require_write()
    quota = await limits.check_submit(request, state, principal)
    submission = await submit.read_submission(request, state)
    try:
        key = submit.check_idempotency_key(idempotency_key)
        new_job = await submit.prepare(
            state,
            principal,
            submission.body,
            uploads=submission.uploads,
            correlation_id=submit.correlation_header(request),
        )
        submit.check_budget(new_job)
        await submit.check_monthly_budget(state, principal.id, [new_job], idempotency_key=key)
        await submission.publish()  # validated: publish the files just before the rows
        snapshots, replayed = await submit.commit(
            state,
            principal,
            [new_job],
            uploads=submission.uploads,
            key=key,
            request_hash=_request_hash(key, "job", lambda: submission.fingerprint),
            reserve=quota.reservation,
            hold=quota.active_hold,
        )
    except BaseException:
        await submission.discard(state)
        raise
    if not snapshots:
        raise NotFound("the job this Idempotency-Key created no longer exists")
    return views.respond(
        views.job(snapshots[0]),
        200 if replayed else 202,
        {"Location": f"/v1/jobs/{snapshots[0].job['id']}", **quota.headers()},
    )


@router.post(
    "/batch",
    status_code=202,
    response_model=JobBatch,
    summary="Submit many jobs, all or nothing",
    responses={
        200: {"model": JobBatch, "description": "An Idempotency-Key replay"},
        **problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 429),
    },
    openapi_extra={**request_body(JobBatchSubmit), "parameters": [_IDEMPOTENCY_KEY_PARAMETER]},
)
async def submit_batch(request: Request) -> Response:
    """Create every job of `{"jobs": [...]}`, or none; errors are located `["jobs", i, ...]`."""
    state, principal, idempotency_key = await _submitter(request)
    principal.require_write()
    quota = await limits.check_submit(request, state, principal)
    raw = await submit.read_json_body(request, state)
    await quota.require_fresh(_batch_size(raw))
    _too_many(raw, "jobs", state.settings.max_jobs_per_request)
    batch = submit.parse_model(JobBatchSubmit, raw)
    key = submit.check_idempotency_key(idempotency_key)
    new_jobs = await submit.prepare_many(
        state, principal, batch.jobs, correlation_id=submit.correlation_header(request)
    )
    await submit.check_monthly_budget(
        state, principal.id, new_jobs, batch=True, idempotency_key=key
    )
    snapshots, replayed = await submit.commit(
        state,
        principal,
        new_jobs,
        key=key,
        request_hash=_request_hash(key, "batch", lambda: batch.model_dump(mode="json")),
        reserve=quota.reservation,
        hold=quota.active_hold,
    )
    return views.respond(
        {"jobs": [views.job(s) for s in snapshots]}, 200 if replayed else 202, quota.headers()
    )


@router.post(
    "/status",
    response_model=JobStatusResult,
    summary="Read many jobs",
    responses=problem_responses(400, 401, 415, 422),
    openapi_extra=request_body(JobStatusQuery),
)
async def job_status(
    request: Request, state: StateDep, principal: CurrentPrincipal
) -> dict[str, Any]:
    """The jobs named in `ids`, in order; unknown ids and other owners' are `not_found`."""
    raw = await submit.read_json_body(request, state)
    _too_many(raw, "ids", state.settings.max_jobs_per_request)
    query = submit.parse_model(JobStatusQuery, raw)
    ids = list(dict.fromkeys(query.ids))
    async with state.db.read() as conn:
        owned = set(await job_repo.owned_ids(conn, ids, principal.owner_filter())) if ids else set()
        snapshots = await job_repo.load(conn, [i for i in ids if i in owned])
    return {
        "jobs": [views.job(s) for s in snapshots],
        "not_found": [i for i in ids if i not in owned],
    }


def _time(value: str | None, name: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_rfc3339(value)
    except (ValueError, OverflowError):
        raise ValidationFailed(
            f"{name} is not an RFC 3339 time",
            errors=[{"loc": ["query", name], "msg": "Input should be an RFC 3339 time"}],
        ) from None


@router.get(
    "",
    response_model=JobList,
    summary="List jobs, newest first",
    responses=problem_responses(401, 403, 422),
)
async def list_jobs(
    state: StateDep,
    principal: CurrentPrincipal,
    status: Annotated[list[JobStatus] | None, Query(description="repeatable")] = None,
    pipeline: Annotated[str | None, Query(max_length=64)] = None,
    created_after: Annotated[str | None, Query(description="RFC 3339")] = None,
    created_before: Annotated[str | None, Query(description="RFC 3339")] = None,
    limit: Annotated[int, Query(ge=1, description="capped at JOBGATE_LIST_MAX_LIMIT")] = 10,
    offset: Annotated[int, Query(ge=0, le=MAX_INT64)] = 0,
    owner: Annotated[str | None, Query(description="admins only")] = None,
) -> dict[str, Any]:
    """The caller's jobs (an admin's: everyone's, or `owner`'s), filtered and paged."""
    if owner is not None and not principal.is_admin:
        raise Forbidden("only admins may list another owner's jobs")
    after = _time(created_after, "created_after")
    before = _time(created_before, "created_before")
    limit = min(limit, state.settings.list_max_limit)
    async with state.db.read() as conn:
        ids, total = await job_repo.search(
            conn,
            owner=owner if owner is not None else principal.owner_filter(),
            statuses=list(dict.fromkeys(status or [])),
            pipeline=pipeline,
            created_after=after,
            created_before=before,
            limit=limit,
            offset=offset,
        )
        snapshots = await job_repo.load(conn, ids)
    return {
        "jobs": [views.job(s) for s in snapshots],
        "total": total,
        "limit": limit,
        "offset": offset,
    }


@router.get(
    "/{job_id}",
    response_model=Job,
    summary="Read a job",
    responses=problem_responses(401, 404),
)
async def get_job(job_id: str, state: StateDep, principal: CurrentPrincipal) -> Response:
    """One job."""
    async with state.db.read() as conn:
        snapshot = await job_repo.get(conn, job_id, owner=principal.owner_filter())
    return views.respond(views.job(snapshot))


@router.post(
    "/{job_id}/cancel",
    response_model=Job,
    summary="Cancel a job",
    responses={
        202: {"model": Job, "description": "Cancellation requested; running stages stop"},
        **problem_responses(401, 403, 404, 409),
    },
)
async def cancel_job(
    job_id: str, response: Response, state: StateDep, principal: CurrentPrincipal
) -> dict[str, Any]:
    """Cancel at once (200) a job that runs nothing, else flag it (202); 409 if finished."""
    principal.require_write()
    owner = principal.owner_filter()
    async with state.db.write() as conn:
        done = await job_repo.cancel(conn, job_id, owner=owner, at=now())
        snapshot = await job_repo.get(conn, job_id, owner=owner)
    response.status_code = 200 if done else 202
    return views.job(snapshot)


@router.post(
    "/{job_id}/retry",
    status_code=202,
    response_model=Job,
    summary="Retry a failed or cancelled job",
    responses=problem_responses(401, 403, 404, 409, 429),
)
async def retry_job(job_id: str, state: StateDep, principal: CurrentPrincipal) -> dict[str, Any]:
    """Queue the job again at the stages that did not succeed; 409 unless failed/cancelled,
    429 if the owner's active-jobs cap is full."""
    principal.require_write()
    owner = principal.owner_filter()
    async with state.db.write() as conn:
        await job_repo.retry(
            conn,
            job_id,
            owner=owner,
            registry=state.registry,
            at=now(),
            aging_s=state.settings.priority_aging_s,
            room=state.limits.hold_active_room if state.limits.max_active_jobs > 0 else None,
        )
        snapshot = await job_repo.get(conn, job_id, owner=owner)
    state.wake()
    return views.job(snapshot)


@router.get(
    "/{job_id}/records",
    response_model=RecordPage,
    summary="A job's per-item results",
    responses={
        200: {
            "description": "A page of records; with `format=csv|jsonl`, all of them",
            "content": {"text/csv": {}, "application/x-ndjson": {}},
        },
        **problem_responses(401, 404, 422),
    },
)
async def list_records(
    job_id: str,
    state: StateDep,
    principal: CurrentPrincipal,
    status: Literal["succeeded", "failed"] | None = None,
    limit: Annotated[int, Query(ge=1, description="capped at 1000")] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_INT64)] = 0,
    format: Literal["json", "csv", "jsonl"] = "json",
) -> Any:
    """A page of records, or (`format=csv|jsonl`) a stream of every record."""
    async with state.db.read() as conn:
        await job_repo.get(conn, job_id, owner=principal.owner_filter())
        if format == "json":
            limit = min(limit, RECORDS_MAX_LIMIT)
            rows, total = await record_repo.page(
                conn, job_id, status=status, limit=limit, offset=offset
            )
            return {
                "records": [views.record(r) for r in rows],
                "total": total,
                "limit": limit,
                "offset": offset,
            }
    rows_stream = record_repo.stream(state.db, job_id, status=status)
    if format == "csv":
        body, media_type = _csv(rows_stream), "text/csv; charset=utf-8"
    else:
        body, media_type = _jsonl(rows_stream), "application/x-ndjson"
    filename = f"{job_id}-records.{format}"
    return StreamingResponse(
        body,
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


async def _csv(rows: AsyncIterator[Any]) -> AsyncIterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["key", "stage", "status", "data", "error"])
    async for row in rows:
        record = views.record(row)
        writer.writerow(
            [
                record["key"],
                record["stage"],
                record["status"],
                "" if record["data"] is None else json.dumps(record["data"]),
                "" if record["error"] is None else json.dumps(record["error"]),
            ]
        )
        if buffer.tell() > 65_536:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


async def _jsonl(rows: AsyncIterator[Any]) -> AsyncIterator[str]:
    async for row in rows:
        yield json.dumps(views.record(row), separators=(",", ":")) + "\n"
