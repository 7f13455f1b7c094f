"""Every API operation as data: the request to make and how to read its answer; no I/O.

`Client` and `AsyncClient` only send a `Call` and hand its answer to `Call.parse`, so each
operation is written once, here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from jobgate.client._files import FileInput, Part, file_ref, open_parts
from jobgate.client._models import (
    Artifact,
    Download,
    FileInfo,
    Job,
    JobPage,
    JobSpec,
    JobStatuses,
    Me,
    RecordPage,
    Webhook,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
Query = list[tuple[str, str | int | float | bool | None]]
EVENT_STREAM = "text/event-stream"


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and the parser of its (successful) answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Query = field(default_factory=list)
    json: Any = None
    data: Mapping[str, str] | None = None
    files: Sequence[FileInput] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    repeatable: bool = False
    """Safe to send again if it may have reached the server (`Retries`): true of reads,
    and of writes whose repeat changes nothing (an upload, a keyed submit)."""

    @property
    def safe_to_repeat(self) -> bool:
        """Whether sending it twice does what sending it once does."""
        return self.repeatable or self.method == "GET" or "Idempotency-Key" in self.headers

    def build(self, http: httpx.Client | httpx.AsyncClient, stack: ExitStack) -> httpx.Request:
        """The request; files named by path are opened in `stack`, to stream as it is sent."""
        parts: list[Part] | None = open_parts(self.files, stack) if self.files else None
        return http.build_request(
            self.method,
            self.path,
            params=self.params or None,
            json=self.json,
            data=self.data,
            files=parts,
            headers=self.headers,
        )


def new_idempotency_key() -> str:
    """A fresh Idempotency-Key: a submit sent with one may be retried safely."""
    return f"sdk-{uuid.uuid4().hex}"


def job_path(job_id: str, *rest: str) -> str:
    """`/v1/jobs/{id}/...`, the id quoted (ids are opaque)."""
    return "/".join([f"/v1/jobs/{quote(job_id, safe='')}", *rest])


def _model(model: type[M], key: str | None = None) -> Callable[[httpx.Response], M]:
    def parse(response: httpx.Response) -> M:
        body = response.json()
        return model.model_validate(body[key] if key is not None else body)

    return parse


def _models(model: type[M], key: str) -> Callable[[httpx.Response], list[M]]:
    def parse(response: httpx.Response) -> list[M]:
        return [model.model_validate(item) for item in response.json()[key]]

    return parse


def _without_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _webhook(webhook: Webhook | Mapping[str, Any] | str | None) -> dict[str, Any] | None:
    if webhook is None:
        return None
    if isinstance(webhook, str):
        return {"url": webhook}
    if isinstance(webhook, Webhook):
        return webhook.model_dump(exclude_none=True)
    return dict(webhook)


def submit(
    pipeline: str,
    params: Mapping[str, Any] | None = None,
    *,
    files: Sequence[FileInput] = (),
    priority: int | None = None,
    budget_usd: float | None = None,
    webhook: Webhook | Mapping[str, Any] | str | None = None,
    idempotency_key: str | None = None,
    correlation_id: str | None = None,
    version: str | None = None,
) -> Call[Job]:
    """`POST /v1/jobs`: JSON when every file is an uploaded `FileInfo`, else multipart.

    Raises:
        ValueError: `files` mixes both (`upload()` the local ones first).
    """
    headers = {"Idempotency-Key": idempotency_key or new_idempotency_key()}
    body = _without_none(
        {
            "pipeline": pipeline,
            "version": version,
            "params": dict(params) if params is not None else None,
            "priority": priority,
            "budget_usd": budget_usd,
            "webhook": _webhook(webhook),
            "correlation_id": correlation_id,
        }
    )
    refs = [file_ref(f) for f in files if isinstance(f, FileInfo)]
    if len(refs) == len(files):
        if refs:
            body["files"] = refs
        return Call("POST", "/v1/jobs", _model(Job), json=body, headers=headers)
    if refs:
        raise ValueError("upload() the local files first, then submit their FileInfos")
    form = {k: v if isinstance(v, str) else json.dumps(v) for k, v in body.items()}
    return Call("POST", "/v1/jobs", _model(Job), data=form, files=files, headers=headers)


def submit_batch(
    jobs: Iterable[JobSpec | Mapping[str, Any]], *, idempotency_key: str | None = None
) -> Call[list[Job]]:
    """`POST /v1/jobs/batch`: all the jobs, or none."""
    items = [
        j.model_dump(mode="json", exclude_none=True) if isinstance(j, JobSpec) else dict(j)
        for j in jobs
    ]
    headers = {"Idempotency-Key": idempotency_key or new_idempotency_key()}
    return Call(
        "POST", "/v1/jobs/batch", _models(Job, "jobs"), json={"jobs": items}, headers=headers
    )


def upload(files: Sequence[FileInput]) -> Call[list[FileInfo]]:
    """`POST /v1/files`: store files once, to name them by `sha256` in later submits."""
    if not files:
        raise ValueError("upload() needs at least one file")
    # Content-addressed: the same bytes uploaded twice are one blob.
    return Call("POST", "/v1/files", _models(FileInfo, "files"), files=files, repeatable=True)


def get(job_id: str) -> Call[Job]:
    """`GET /v1/jobs/{id}`."""
    return Call("GET", job_path(job_id), _model(Job))


def list_page(
    *,
    status: str | Sequence[str] | None = None,
    pipeline: str | None = None,
    created_after: str | None = None,
    created_before: str | None = None,
    owner: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> Call[JobPage]:
    """`GET /v1/jobs`: one page, newest first."""
    query: Query = [("status", s) for s in ([status] if isinstance(status, str) else status or [])]
    optional = {
        "pipeline": pipeline,
        "created_after": created_after,
        "created_before": created_before,
        "owner": owner,
        "limit": limit,
    }
    query += [(k, v) for k, v in optional.items() if v is not None]
    query.append(("offset", offset))
    return Call("GET", "/v1/jobs", _model(JobPage), params=query)


def status(ids: Iterable[str]) -> Call[JobStatuses]:
    """`POST /v1/jobs/status`: many jobs at once."""
    return Call(
        "POST", "/v1/jobs/status", _model(JobStatuses), json={"ids": list(ids)}, repeatable=True
    )


def cancel(job_id: str) -> Call[Job]:
    """`POST /v1/jobs/{id}/cancel`."""
    return Call("POST", job_path(job_id, "cancel"), _model(Job))


def retry(job_id: str) -> Call[Job]:
    """`POST /v1/jobs/{id}/retry`."""
    return Call("POST", job_path(job_id, "retry"), _model(Job))


def records_page(
    job_id: str, *, status: str | None = None, limit: int | None = None, offset: int = 0
) -> Call[RecordPage]:
    """`GET /v1/jobs/{id}/records`: one page of map-stage results."""
    query: Query = [(k, v) for k, v in {"status": status, "limit": limit}.items() if v is not None]
    query.append(("offset", offset))
    return Call("GET", job_path(job_id, "records"), _model(RecordPage), params=query)


def artifacts(job_id: str) -> Call[list[Artifact]]:
    """`GET /v1/jobs/{id}/artifacts`."""
    return Call("GET", job_path(job_id, "artifacts"), _models(Artifact, "artifacts"))


def download_link(job_id: str, name: str | None = None) -> Call[Download]:
    """A signed URL for the artifact `name`, or for the primary artifact."""
    path = (
        job_path(job_id, "download")
        if name is None
        else job_path(job_id, "artifacts", quote(name, safe=""))  # `?`, `#`, `%2E`: literal
    )
    return Call("GET", path, _model(Download))


def me() -> Call[Me]:
    """`GET /v1/me`."""
    return Call("GET", "/v1/me", _model(Me))


def next_offset(offset: int, shown: int, total: int) -> int | None:
    """The offset of the page after one that started at `offset`; None after the last."""
    after = offset + shown
    return after if shown and after < total else None
