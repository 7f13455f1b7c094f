"""Submissions: from a request body to validated `NewJob`s, then one transaction.

The checks run in API.md's order (after authentication, role and the rate limits of
`api/limits.py`): the body's form (400), its content (413, 415, 422), then the budgets
(422 `budget-exceeded`: the job's, then the owner's monthly cap). A refused submission
leaves nothing: files it streamed in stay unpublished until the caller has validated
the submission (`Submission.publish`, just before `commit`), are removed by the caller
(`Submission.discard`) if it is refused, and rows are written only in `commit`'s single
transaction.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import HTTPException
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request

from jobgate.api import limits
from jobgate.api.models import JobSubmit
from jobgate.api.state import AppState
from jobgate.api.uploads import (
    Form,
    UploadedFile,
    body_kind,
    parse_form,
    parse_json,
    read_json,
)
from jobgate.auth import Principal
from jobgate.config import Settings
from jobgate.errors import (
    BudgetExceeded,
    FileTooLarge,
    IdempotencyConflict,
    NotFound,
    RequestError,
    UnknownPipeline,
    UnsupportedFileType,
    ValidationFailed,
)
from jobgate.ids import month_start, now, uuid7
from jobgate.observability import metrics
from jobgate.pipelines import Pipeline, Registry
from jobgate.pipelines.files import by_name, sanitize_filename
from jobgate.store.repositories import blobs as blob_repo
from jobgate.store.repositories import idempotency
from jobgate.store.repositories import jobs as job_repo
from jobgate.store.repositories.jobs import JobSnapshot, NewJob
from jobgate.webhooks import ssrf

M = TypeVar("M", bound=BaseModel)

FORM_FIELDS = (
    "pipeline",
    "version",
    "params",
    "priority",
    "budget_usd",
    "correlation_id",
    "webhook",
)
"""The text parts a multipart submit may have, besides its `files` parts."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")


# -- errors ------------------------------------------------------------------------------


def validation_failed(exc: ValidationError, prefix: Sequence[str | int] = ()) -> ValidationFailed:
    """A pydantic error as a 422, without echoing any input back."""
    return ValidationFailed(
        "the request is invalid",
        errors=[
            {"loc": [*prefix, *err["loc"]], "msg": err["msg"], "type": err["type"]}
            for err in exc.errors(include_input=False, include_url=False, include_context=False)
        ],
    )


def parse_model(model: type[M], raw: Any, prefix: Sequence[str | int] = ()) -> M:
    """Validate `raw` as `model`, or raise `ValidationFailed` with `errors[].loc`."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise validation_failed(exc, prefix) from None


def prefixed(exc: RequestError, prefix: Sequence[str | int]) -> RequestError:
    """The same error, with every `errors[].loc` starting with `prefix`."""
    errors = exc.errors or [{"loc": [], "msg": exc.message}]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in prefix).lstrip(".")
    return type(exc)(
        f"{where}: {exc.message}",
        errors=[{**err, "loc": [*prefix, *err.get("loc", [])]} for err in errors],
    )


def combined(failures: Sequence[RequestError]) -> RequestError:
    """One error for several: the first one's kind, every one's `errors`."""
    first = failures[0]
    errors = [err for failure in failures for err in failure.errors or []]
    return type(first)(first.message, errors=errors)


def check_idempotency_key(key: str | None) -> str | None:
    """The `Idempotency-Key` header, if sane.

    Raises:
        ValidationFailed: longer than 255 characters, or empty.
    """
    if key is None:
        return None
    if not key.strip() or len(key) > idempotency.MAX_KEY_LENGTH:
        raise ValidationFailed(
            "Idempotency-Key must be 1 to 255 characters",
            errors=[
                {
                    "loc": ["header", "Idempotency-Key"],
                    "msg": "String should have 1 to 255 characters",
                }
            ],
        )
    return key


def correlation_header(request: Request) -> str | None:
    """The `X-Correlation-ID` header, stripped of control characters and capped."""
    value = request.headers.get("x-correlation-id")
    if value is None:
        return None
    return _CONTROL.sub("", value).strip()[:255] or None


# -- reading a submission --------------------------------------------------------------


@dataclass
class Submission:
    """A submit body that has the right form (but is not validated against a pipeline)."""

    body: JobSubmit
    fingerprint: Any
    form: Form | None = None
    uploads: list[UploadedFile] = field(default_factory=list)

    async def publish(self) -> None:
        """Publish the streamed files: once validated, just before `commit`."""
        if self.form is not None:
            await self.form.publish()

    async def discard(self, state: AppState) -> None:
        """Remove the files this request streamed in (`Form.discard`)."""
        if self.form is not None:
            await self.form.discard(state.blobs, state.db)


def file_cap(registry: Registry) -> Callable[[Mapping[str, str]], int | None]:
    """The per-file cap once the form's `pipeline` (and `version`) are known."""

    def cap(fields: Mapping[str, str]) -> int | None:
        name = fields.get("pipeline")
        if name is None:
            return None
        try:
            rule = registry.get(name, fields.get("version") or None).files
        except UnknownPipeline:
            return None
        return rule.max_bytes if rule is not None else None

    return cap


async def read_submission(request: Request, state: AppState) -> Submission:
    """Read `POST /v1/jobs`: a JSON body, or a multipart form whose files are staged.

    Raises:
        MalformedRequest, FileTooLarge, ValidationFailed, HTTPException(415).
    """
    settings = state.settings
    if body_kind(request) == "json":
        raw = await read_json(request, max_bytes=json_limit(settings))
        body = parse_model(JobSubmit, raw)
        return Submission(body=body, fingerprint=body.model_dump(mode="json"))
    form = await parse_form(
        request,
        state.blobs,
        max_bytes=settings.max_upload_bytes,
        max_parts=settings.max_upload_parts,
        text_fields=FORM_FIELDS,
        file_cap=file_cap(state.registry),
    )
    try:
        body = parse_model(JobSubmit, _form_values(form))
    except BaseException:
        await form.drop_staged()
        raise
    fingerprint = {
        "fields": form.fields,
        "files": [[f.field, f.name, f.sha256] for f in form.files],
    }
    return Submission(body=body, fingerprint=fingerprint, form=form, uploads=list(form.files))


def _form_values(form: Form) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, text in form.fields.items():
        if name in ("params", "webhook"):
            try:
                values[name] = parse_json(text.encode()) if text.strip() else None
            except (ValueError, OverflowError):
                raise ValidationFailed(
                    f"{name} is not valid JSON",
                    errors=[{"loc": [name], "msg": "Invalid JSON", "type": "json_invalid"}],
                ) from None
        elif name in ("version", "budget_usd", "correlation_id") and not text.strip():
            values[name] = None
        else:
            values[name] = text
    if "pipeline" not in values:
        raise ValidationFailed(
            "the form has no pipeline field",
            errors=[{"loc": ["pipeline"], "msg": "Field required", "type": "missing"}],
        )
    return values


# -- validating against the pipeline ---------------------------------------------------


def _pipeline(registry: Registry, body: JobSubmit) -> Pipeline:
    try:
        return registry.get(body.pipeline, body.version)
    except UnknownPipeline as exc:
        loc = "pipeline" if body.pipeline not in registry else "version"
        raise UnknownPipeline(exc.message, errors=[{"loc": [loc], "msg": exc.message}]) from None


def _check_webhook(state: AppState, body: JobSubmit) -> dict[str, Any] | None:
    if body.webhook is None:
        return None
    # A literal address or a local name is judged now; other names when delivered.
    policy = ssrf.Policy.from_settings(state.settings)
    if policy.literal_refusal(body.webhook.url.host or "") is not None:
        raise ValidationFailed(
            "webhook URLs may not target loopback, private or link-local addresses",
            errors=[{"loc": ["webhook", "url"], "msg": "Private or local address"}],
        )
    return {"url": str(body.webhook.url), "events": list(dict.fromkeys(body.webhook.events))}


async def _files(
    state: AppState, principal: Principal, body: JobSubmit, uploads: Sequence[UploadedFile]
) -> list[dict[str, Any]]:
    """The job's files: streamed uploads, then the blobs named in `files`."""
    files = [
        {"name": f.name, "sha256": f.sha256, "size": f.size, "content_type": f.content_type}
        for f in uploads
    ]
    if not body.files:
        return files
    refs = [(r, None) if isinstance(r, str) else (r.sha256, r.name) for r in body.files]
    shas = [sha for sha, _ in refs]
    async with state.db.read() as conn:
        allowed = await blob_repo.usable(conn, shas, owner=principal.owner_filter())
        rows = await blob_repo.find(conn, [s for s in shas if s in allowed])
    for index, (sha, name) in enumerate(refs):
        row = rows.get(sha)
        if row is None:
            raise NotFound(
                f"no file {sha}",
                errors=[{"loc": ["files", index], "msg": "No such file"}],
            )
        safe_name = sanitize_filename(name) if name else sha
        files.append(
            {
                "name": safe_name,
                "sha256": sha,
                "size": row.size,
                # The bytes' type, narrowed by this job's name for them, as for an upload.
                "content_type": by_name(row.content_type, safe_name),
            }
        )
    return files


def check_files(pipeline: Pipeline, files: Sequence[Mapping[str, Any]]) -> None:
    """Apply the pipeline's `FileRule`: count (422), each type (415), each size (413)."""
    rule = pipeline.files
    if rule is None:
        if files:
            raise ValidationFailed(
                f"pipeline {pipeline.name!r} takes no files",
                errors=[{"loc": ["files"], "msg": "This pipeline takes no files"}],
            )
        return
    if not rule.min_count <= len(files) <= rule.max_count:
        raise ValidationFailed(
            f"pipeline {pipeline.name!r} takes {rule.min_count} to {rule.max_count} files, "
            f"not {len(files)}",
            errors=[
                {
                    "loc": ["files"],
                    "msg": f"Between {rule.min_count} and {rule.max_count} files are needed",
                }
            ],
        )
    for index, item in enumerate(files):
        if not rule.accepts(item["content_type"]):
            raise UnsupportedFileType(
                f"{item['name']}: {item['content_type']} is not accepted; "
                f"pipeline {pipeline.name!r} takes {', '.join(rule.types)}",
                errors=[{"loc": ["files", index], "msg": f"Type {item['content_type']}"}],
            )
    for index, item in enumerate(files):
        if item["size"] > rule.max_bytes:
            raise FileTooLarge(
                f"{item['name']} is larger than the limit of {rule.max_bytes} bytes",
                errors=[{"loc": ["files", index], "msg": f"Larger than {rule.max_bytes} bytes"}],
            )


async def prepare(
    state: AppState,
    principal: Principal,
    body: JobSubmit,
    *,
    uploads: Sequence[UploadedFile] = (),
    correlation_id: str | None = None,
) -> NewJob:
    """Validate one submission's content (not its budget) into a `NewJob`.

    Raises:
        UnknownPipeline, ValidationFailed, NotFound (a file the caller may not use),
        UnsupportedFileType, FileTooLarge.
    """
    settings = state.settings
    pipeline = _pipeline(state.registry, body)
    params = pipeline.validate_params(body.params)
    if body.budget_usd is not None and body.budget_usd > settings.job_budget_usd:
        raise ValidationFailed(
            f"budget_usd may be at most {settings.job_budget_usd}",
            errors=[
                {
                    "loc": ["budget_usd"],
                    "msg": f"Input should be at most {settings.job_budget_usd}",
                }
            ],
        )
    webhook = _check_webhook(state, body)
    files = await _files(state, principal, body, uploads)
    check_files(pipeline, files)
    return NewJob(
        id=uuid7(),
        pipeline=pipeline,
        owner=principal.id,
        params=params,
        files=files,
        priority=body.priority,
        budget_usd=settings.job_budget_usd if body.budget_usd is None else body.budget_usd,
        estimated_usd=pipeline.estimate(params, files),
        correlation_id=body.correlation_id or correlation_id,
        webhook=webhook,
    )


def check_budget(job: NewJob) -> None:
    """Raise `BudgetExceeded` when the pre-flight estimate is over the job's budget."""
    if job.estimated_usd > job.budget_usd:
        raise BudgetExceeded(
            f"the estimated cost {job.estimated_usd:.4f} USD is over the budget of "
            f"{job.budget_usd:.4f} USD",
            errors=[{"loc": ["budget_usd"], "msg": "Estimated cost over budget"}],
        )


async def prepare_many(
    state: AppState,
    principal: Principal,
    bodies: Sequence[JobSubmit],
    *,
    correlation_id: str | None = None,
) -> list[NewJob]:
    """`prepare` and `check_budget` every item; errors are located at `["jobs", i, ...]`.

    Raises:
        The first failing item's kind of error, with every failing item's `errors`.
    """
    new_jobs: list[NewJob] = []
    failures: list[RequestError] = []
    for index, body in enumerate(bodies):
        try:
            new_jobs.append(await prepare(state, principal, body, correlation_id=correlation_id))
        except RequestError as exc:
            failures.append(prefixed(exc, ["jobs", index]))
    if failures:
        raise combined(failures)
    for index, job in enumerate(new_jobs):
        try:
            check_budget(job)
        except RequestError as exc:
            failures.append(prefixed(exc, ["jobs", index]))
    if failures:
        raise combined(failures)
    return new_jobs


async def check_monthly_budget(
    state: AppState,
    owner: str,
    new_jobs: Sequence[NewJob],
    *,
    batch: bool = False,
    idempotency_key: str | None = None,
) -> None:
    """Hold `new_jobs` to the owner's monthly spend cap (`JOBGATE_USER_MONTHLY_BUDGET_USD`).

    The estimates together must fit what the owner's jobs of this month have left;
    then each job's budget is lowered to that, so a job stops when the month's money
    runs out. (Jobs running at once may each spend what is left: the cap can be
    passed by their number times that; docs/limits.md.)

    A submit whose `idempotency_key` is known passes: it replays what it created.

    Raises:
        BudgetExceeded: the estimates do not fit what is left this month.
    """
    cap = state.settings.user_monthly_budget_usd
    if cap <= 0:
        return
    async with state.db.read() as conn:
        spent = await job_repo.spent_since(conn, owner, month_start(now()))
    left = max(0.0, cap - spent)
    estimated = sum(job.estimated_usd for job in new_jobs)
    if estimated > left + 1e-9 or left <= 0:
        if await limits.idempotency_key_known(state, owner, idempotency_key):
            return
        raise BudgetExceeded(
            f"the monthly spend cap of {cap:.4f} USD has {left:.4f} USD left; "
            f"the estimated cost is {estimated:.4f} USD",
            errors=[
                {
                    "loc": ["jobs"] if batch else ["budget_usd"],
                    "msg": "Estimated cost over what the monthly spend cap leaves",
                }
            ],
        )
    for job in new_jobs:
        job.budget_usd = min(job.budget_usd, left)


# -- writing ---------------------------------------------------------------------------


async def commit(
    state: AppState,
    principal: Principal,
    new_jobs: Sequence[NewJob],
    *,
    uploads: Sequence[UploadedFile] = (),
    key: str | None = None,
    request_hash: str = "",
    reserve: Callable[[], Awaitable[None]] | None = None,
    hold: Callable[[AsyncConnection], Awaitable[None]] | None = None,
) -> tuple[list[JobSnapshot], bool]:
    """Write the jobs (and their key) in one transaction, or replay the key's jobs.

    `hold` (the active-jobs cap, counted under the owner's lock) and then `reserve`
    (taking rate-limit slots) are awaited once each, after the key's lookup found no
    replay and before anything is written; what they raise leaves nothing written.

    Returns:
        The jobs, and whether they are a replay of an earlier request with this key.

    Raises:
        IdempotencyConflict: the key was used with a different request.
    """
    settings = state.settings
    # Jobs with no key, upload or file to record are one insert statement on PostgreSQL:
    # written with no BEGIN/COMMIT around it, together with other requests' (`submits`).
    single_statement = (
        key is None
        and not uploads
        and not state.db.is_sqlite
        and not any(job.files for job in new_jobs)
        and not job_repo.needs_transaction(new_jobs)
        and hold is None
    )
    if reserve is not None and key is None and hold is None:
        # No replay possible: take the slots before holding any lock (SQLite's writer).
        await reserve()
        reserve = None
    if single_statement:
        # Written with the other requests' jobs waiting now, in one statement.
        snapshots = await state.submits.create(new_jobs)  # it wakes the worker
        _count_submitted(new_jobs)
        return snapshots, False
    for attempt in range(2):
        at = now()
        lender = state.submits.lender
        loan = lender.lend() if lender is not None else None
        committed = False
        try:
            async with state.db.write() as conn:
                if key is not None:
                    found = await idempotency.lookup(
                        conn, owner=principal.id, key=key, at=at, ttl_s=settings.idempotency_ttl_s
                    )
                    if found is not None:
                        if found.request_hash != request_hash:
                            raise IdempotencyConflict(
                                "this Idempotency-Key was used with a different request"
                            )
                        return await job_repo.load(conn, found.job_ids), True
                if hold is not None:
                    await hold(conn)
                if reserve is not None:
                    # After the lookup and the cap, so that a replay or a refusal does
                    # not count.
                    await reserve()
                    reserve = None
                await blob_repo.add(
                    conn,
                    (
                        blob_repo.BlobRow(sha256=f.sha256, size=f.size, content_type=f.bytes_type)
                        for f in uploads
                    ),
                    at=at,
                )
                snapshots = await job_repo.create(
                    conn,
                    new_jobs,
                    at=at,
                    aging_s=settings.priority_aging_s,
                    stride_s=settings.fair_share_stride_s,
                    loan=loan,
                )
                # One grant per owner (a submit has one): two statements, not two a job.
                files_by_owner: dict[str, list[str]] = {}
                for job in new_jobs:
                    files_by_owner.setdefault(job.owner, []).extend(f["sha256"] for f in job.files)
                for owner, sha256s in files_by_owner.items():
                    await blob_repo.grant(conn, sha256s, owner=owner, at=at)
                ids = [job.id for job in new_jobs]
                if key is not None:
                    await idempotency.remember(
                        conn,
                        owner=principal.id,
                        key=key,
                        request_hash=request_hash,
                        job_ids=ids,
                        at=at,
                        ttl_s=settings.idempotency_ttl_s,
                    )
            committed = True
        except IntegrityError:
            # A concurrent request with the same key committed first: replay it.
            if key is None or attempt:
                raise
            continue
        finally:
            if lender is not None and loan is not None:
                if not committed:
                    loan.started = []  # rolled back (or unknown: their leases run out)
                lender.settle(loan)
        if loan is None or loan.left_ready:
            state.wake()
        _count_submitted(new_jobs)
        return snapshots, False
    raise AssertionError("unreachable")  # pragma: no cover


def _count_submitted(new_jobs: Sequence[NewJob]) -> None:
    for pipeline, count in Counter(job.pipeline.name for job in new_jobs).items():
        metrics.JOBS_SUBMITTED.labels(pipeline=pipeline).inc(count)


def json_limit(settings: Settings) -> int:
    """The most bytes a JSON body may have: its own limit, within the upload limit."""
    return min(settings.max_json_bytes, settings.max_upload_bytes)


async def read_json_body(request: Request, state: AppState) -> Any:
    """A JSON-only route's body (415 for another content type)."""
    if body_kind(request) != "json":
        raise HTTPException(415, "send application/json")
    return await read_json(request, max_bytes=json_limit(state.settings))
