"""`Client`: the blocking SDK. Every operation is a shared `Call`; this module only sends."""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from jobgate.client import _calls as calls
from jobgate.client._base import PAGE_SIZE, BaseClient
from jobgate.client._errors import (
    NotAcceptableError,
    NotFoundError,
    raise_for_problem,
    transport_error,
    unexpected_answer,
)
from jobgate.client._files import (
    AtomicFile,
    FileInput,
    target_path,
    to_upload_first,
    with_uploaded,
)
from jobgate.client._models import (
    Artifact,
    Download,
    Event,
    FileInfo,
    Job,
    JobPage,
    JobSpec,
    JobStatuses,
    Me,
    Record,
    RecordPage,
    Webhook,
)
from jobgate.client._sse import SSEDecoder
from jobgate.client._stream import Poller, Reconnect, Resumer, deadline_after, is_event_stream

T = TypeVar("T")


class Client(BaseClient):
    """A blocking client of a jobgate server.

    Args:
        base_url: the server; default `JOBGATE_URL`, else `http://127.0.0.1:8000`.
        api_key: an API key or a JWT; default `JOBGATE_API_KEY`.
        timeout: seconds (or an `httpx.Timeout`) for each ordinary request.
        stream_timeout: seconds an event stream may stay silent before it is resumed.
        reconnect: how dropped event streams are resumed (`Reconnect`).
        headers: more headers for every request.
        transport: an `httpx.BaseTransport` to send through (tests: `httpx.MockTransport`).

    Use it as a context manager, or call `close()`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__(base_url, api_key, **options)
        self._http = httpx.Client(transport=transport, **self._http_options())

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _send(self, call: calls.Call[T]) -> T:
        tries = 0
        while True:
            tries += 1
            with ExitStack() as stack:  # files are opened anew for each try
                try:
                    response = self._http.send(call.build(self._http, stack))
                except httpx.TransportError as exc:
                    wait = self._retry_wait(call, tries, error=exc)
                    if wait is None:
                        raise transport_error(exc, self.base_url) from exc
                    time.sleep(wait)
                    continue
            wait = self._retry_wait(call, tries, response=response)
            if wait is None:
                break
            time.sleep(wait)
        raise_for_problem(response)
        try:
            return call.parse(response)
        except ValueError as exc:  # not JSON, or not the JSON the API sends
            raise unexpected_answer(response) from exc

    # -- jobs ----------------------------------------------------------------------------

    def submit(
        self,
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
    ) -> Job:
        """Submit a job.

        Args:
            pipeline: the pipeline's name.
            params: the pipeline's parameters.
            files: paths (streamed from disk), bytes, `(name, bytes or file[, type])`, or
                `FileInfo`s from `upload()`.
            priority: -100 to 100, higher runs first.
            budget_usd: a cost limit below the server's.
            webhook: a URL (or `Webhook`) to call when the job ends.
            idempotency_key: the same key within 24 h returns the first job.
            correlation_id: your id for the job, stored with it.
            version: a pipeline version, if not the newest.

        Returns:
            The new job (or, for a replayed idempotency key, the first one).

        Raises:
            InvalidRequestError: bad params or files, unknown pipeline, over budget.
            RateLimitedError: over the submit rate limit (see `retry_after`).
        """
        local = to_upload_first(files)
        if local:
            files = with_uploaded(files, self.upload(local))
        return self._send(
            calls.submit(
                pipeline,
                params,
                files=files,
                priority=priority,
                budget_usd=budget_usd,
                webhook=webhook,
                idempotency_key=idempotency_key,
                correlation_id=correlation_id,
                version=version,
            )
        )

    def submit_batch(
        self, jobs: Iterable[JobSpec | Mapping[str, Any]], *, idempotency_key: str | None = None
    ) -> builtins.list[Job]:
        """Submit many jobs at once, all or none (files by `sha256`, see `upload()`)."""
        return self._send(calls.submit_batch(jobs, idempotency_key=idempotency_key))

    def upload(self, files: Sequence[FileInput]) -> builtins.list[FileInfo]:
        """Store files (streamed) to name them by `sha256` in later submits."""
        return self._send(calls.upload(files))

    def get(self, job_id: str) -> Job:
        """A job. Raises `NotFoundError` for unknown ids (and other owners' jobs)."""
        return self._send(calls.get(job_id))

    def list_page(self, *, limit: int | None = None, offset: int = 0, **filters: Any) -> JobPage:
        """One page of jobs, newest first; `filters` as in `list()`."""
        return self._send(calls.list_page(limit=limit, offset=offset, **filters))

    def list(
        self,
        *,
        status: str | Sequence[str] | None = None,
        pipeline: str | None = None,
        created_after: str | None = None,
        created_before: str | None = None,
        owner: str | None = None,
        page_size: int = PAGE_SIZE,
    ) -> Iterator[Job]:
        """Every matching job, newest first, fetched page by page as you iterate.

        Args:
            status: only jobs in this status (or these).
            pipeline: only this pipeline's jobs.
            created_after: RFC 3339 time.
            created_before: RFC 3339 time.
            owner: only this owner's jobs (admins).
            page_size: jobs per request.
        """
        filters = {
            "status": status,
            "pipeline": pipeline,
            "created_after": created_after,
            "created_before": created_before,
            "owner": owner,
        }
        offset: int | None = 0
        seen: set[str] = set()
        while offset is not None:
            page = self.list_page(limit=page_size, offset=offset, **filters)
            # Jobs created meanwhile shift the pages; never yield one twice.
            yield from (job for job in page.jobs if job.id not in seen)
            seen.update(job.id for job in page.jobs)
            offset = calls.next_offset(page.offset, len(page.jobs), page.total)

    def status(self, ids: Iterable[str]) -> JobStatuses:
        """Many jobs in one request; unknown ids come back in `not_found`."""
        return self._send(calls.status(ids))

    def cancel(self, job_id: str) -> Job:
        """Cancel a job; a running one gets `cancel_requested` and stops soon after."""
        return self._send(calls.cancel(job_id))

    def retry(self, job_id: str) -> Job:
        """Queue a failed or cancelled job again, from the stages that did not succeed."""
        return self._send(calls.retry(job_id))

    def wait(self, job_id: str, timeout: float | None = None, *, poll_interval: float = 0.5) -> Job:
        """Block until the job succeeds, fails or is cancelled; the final job.

        Follows the event stream, or polls every `poll_interval` seconds (growing) when
        the server has no streams.

        Raises:
            WaitTimeout: not finished within `timeout` seconds (`.job` is the last seen).
        """
        deadline = deadline_after(timeout)
        try:
            for _ in self._follow(job_id, None, heartbeats=True, deadline=deadline):
                pass
        except (NotAcceptableError, NotFoundError):
            pass  # no streams here: polling answers 404 itself if the job is unknown
        poller = Poller(deadline, interval=poll_interval)
        while (delay := poller.delay(job := self.get(job_id))) is not None:
            time.sleep(delay)
        return job

    # -- events --------------------------------------------------------------------------

    def events(
        self,
        job_id: str,
        last_event_id: str | int | None = None,
        *,
        heartbeats: bool = False,
        reconnect: Reconnect | None = None,
    ) -> Iterator[Event]:
        """A job's events as they happen, until its terminal event.

        A fresh stream starts with a `state` event (the whole job); with `last_event_id`
        it starts after that event instead. A dropped connection is resumed where it
        stopped, with no gap and no duplicate.

        Raises:
            TransportError: the stream could not be resumed (see `Reconnect`).
        """
        return self._follow(
            job_id, last_event_id, heartbeats=heartbeats, reconnect=reconnect, deadline=None
        )

    def all_events(
        self,
        last_event_id: str | int | None = None,
        *,
        heartbeats: bool = False,
        reconnect: Reconnect | None = None,
    ) -> Iterator[Event]:
        """The events of every job the caller may see (`GET /v1/events`); never ends."""
        resumer = Resumer(
            reconnect or self.reconnect,
            last_event_id=None if last_event_id is None else str(last_event_id),
            heartbeats=heartbeats,
            ends=False,
            what="the event stream",
        )
        return self._stream("/v1/events", resumer)

    def _follow(
        self,
        job_id: str,
        last_event_id: str | int | None,
        *,
        heartbeats: bool,
        deadline: float | None,
        reconnect: Reconnect | None = None,
    ) -> Iterator[Event]:
        resumer = Resumer(
            reconnect or self.reconnect,
            last_event_id=None if last_event_id is None else str(last_event_id),
            heartbeats=heartbeats,
            deadline=deadline,
            what=f"job {job_id}'s event stream",
        )
        return self._stream(calls.job_path(job_id, "events"), resumer)

    def _stream(self, path: str, resumer: Resumer) -> Iterator[Event]:
        while True:
            failure: Exception | None = None
            timeout = self._stream_timeout(resumer.read_timeout(self.stream_timeout))
            try:
                with self._http.stream(
                    "GET", path, headers=resumer.headers(), timeout=timeout
                ) as response:
                    if not is_event_stream(response):
                        response.read()
                        failure = resumer.refusal(response)
                    else:
                        decoder = SSEDecoder()
                        for chunk in response.iter_bytes():
                            for sse in decoder.feed(chunk):
                                if (event := resumer.accept(sse)) is not None:
                                    yield event
                                if resumer.finished:
                                    return
                            resumer.note_place(decoder.dispatched_id)
            except httpx.TransportError as exc:
                failure = exc
            time.sleep(resumer.backoff(failure))

    # -- records, artifacts, identity ------------------------------------------------------

    def records_page(
        self, job_id: str, *, status: str | None = None, limit: int | None = None, offset: int = 0
    ) -> RecordPage:
        """One page of a job's map-stage results."""
        return self._send(calls.records_page(job_id, status=status, limit=limit, offset=offset))

    def records(
        self, job_id: str, status: str | None = None, *, page_size: int = 1000
    ) -> Iterator[Record]:
        """Every map-stage result of a job (`status`: `succeeded` or `failed` only)."""
        offset: int | None = 0
        while offset is not None:
            page = self.records_page(job_id, status=status, limit=page_size, offset=offset)
            yield from page.records
            offset = calls.next_offset(page.offset, len(page.records), page.total)

    def artifacts(self, job_id: str) -> builtins.list[Artifact]:
        """The files a job produced."""
        return self._send(calls.artifacts(job_id))

    def download_link(self, job_id: str, name: str | None = None) -> Download:
        """A signed URL (valid without credentials until it expires) for an artifact."""
        return self._send(calls.download_link(job_id, name))

    def download(
        self, job_id: str, name: str | None = None, path: str | os.PathLike[str] | None = None
    ) -> Path:
        """Save an artifact (default: the primary one) to `path`; the path written.

        `path` is a file, or a directory to put the artifact's own name in (default:
        the current directory). The file is streamed to a temporary name, checked
        against the announced size and SHA-256, then renamed: never half-written.

        Raises:
            NotFoundError: no such job or artifact.
            DownloadError: the bytes are not the announced ones.
        """
        link = self.download_link(job_id, name)
        target = target_path(path, link.filename)
        try:
            # auth=None: the URL is signed, and may point at another host (S3).
            with (
                self._http.stream("GET", link.download_url, auth=None) as response,
                AtomicFile(target, link) as out,
            ):
                if response.is_error:
                    response.read()
                    raise_for_problem(response)
                for chunk in response.iter_bytes():
                    out.write(chunk)
                return out.commit()
        except httpx.TransportError as exc:
            raise transport_error(exc, link.download_url) from exc

    def me(self) -> Me:
        """Who the caller is, its limits and its usage."""
        return self._send(calls.me())
