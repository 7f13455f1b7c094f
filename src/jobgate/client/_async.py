"""`AsyncClient`: the asyncio SDK, the twin of `Client` (same calls, same decisions)."""

from __future__ import annotations

import asyncio
import builtins
import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
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


class AsyncClient(BaseClient):
    """An asyncio client of a jobgate server; every method is `Client`'s, awaited.

    Args:
        base_url: the server; default `JOBGATE_URL`, else `http://127.0.0.1:8000`.
        api_key: an API key or a JWT; default `JOBGATE_API_KEY`.
        timeout: seconds (or an `httpx.Timeout`) for each ordinary request.
        stream_timeout: seconds an event stream may stay silent before it is resumed.
        reconnect: how dropped event streams are resumed (`Reconnect`).
        headers: more headers for every request.
        transport: an `httpx.AsyncBaseTransport` (tests: `httpx.ASGITransport(app)`).

    Use it as an async context manager, or call `aclose()`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__(base_url, api_key, **options)
        self._http = httpx.AsyncClient(transport=transport, **self._http_options())

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _send(self, call: calls.Call[T]) -> T:
        tries = 0
        while True:
            tries += 1
            with ExitStack() as stack:  # files are opened anew for each try
                try:
                    response = await self._http.send(call.build(self._http, stack))
                except httpx.TransportError as exc:
                    wait = self._retry_wait(call, tries, error=exc)
                    if wait is None:
                        raise transport_error(exc, self.base_url) from exc
                    await asyncio.sleep(wait)
                    continue
            wait = self._retry_wait(call, tries, response=response)
            if wait is None:
                break
            await asyncio.sleep(wait)
        raise_for_problem(response)
        try:
            return call.parse(response)
        except ValueError as exc:  # not JSON, or not the JSON the API sends
            raise unexpected_answer(response) from exc

    # -- jobs ----------------------------------------------------------------------------

    async def submit(
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
        """Submit a job (see `Client.submit`)."""
        local = to_upload_first(files)
        if local:
            files = with_uploaded(files, await self.upload(local))
        return await self._send(
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

    async def submit_batch(
        self, jobs: Iterable[JobSpec | Mapping[str, Any]], *, idempotency_key: str | None = None
    ) -> builtins.list[Job]:
        """Submit many jobs at once, all or none."""
        return await self._send(calls.submit_batch(jobs, idempotency_key=idempotency_key))

    async def upload(self, files: Sequence[FileInput]) -> builtins.list[FileInfo]:
        """Store files (streamed) to name them by `sha256` in later submits."""
        return await self._send(calls.upload(files))

    async def get(self, job_id: str) -> Job:
        """A job."""
        return await self._send(calls.get(job_id))

    async def list_page(
        self, *, limit: int | None = None, offset: int = 0, **filters: Any
    ) -> JobPage:
        """One page of jobs, newest first."""
        return await self._send(calls.list_page(limit=limit, offset=offset, **filters))

    async def list(
        self,
        *,
        status: str | Sequence[str] | None = None,
        pipeline: str | None = None,
        created_after: str | None = None,
        created_before: str | None = None,
        owner: str | None = None,
        page_size: int = PAGE_SIZE,
    ) -> AsyncIterator[Job]:
        """Every matching job, newest first, page by page (see `Client.list`)."""
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
            page = await self.list_page(limit=page_size, offset=offset, **filters)
            for job in page.jobs:
                if job.id not in seen:
                    yield job
            seen.update(job.id for job in page.jobs)
            offset = calls.next_offset(page.offset, len(page.jobs), page.total)

    async def status(self, ids: Iterable[str]) -> JobStatuses:
        """Many jobs in one request."""
        return await self._send(calls.status(ids))

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job."""
        return await self._send(calls.cancel(job_id))

    async def retry(self, job_id: str) -> Job:
        """Queue a failed or cancelled job again."""
        return await self._send(calls.retry(job_id))

    async def wait(
        self,
        job_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 - as Client.wait; it also bounds reads
        *,
        poll_interval: float = 0.5,
    ) -> Job:
        """Until the job succeeds, fails or is cancelled; the final job (see `Client.wait`)."""
        deadline = deadline_after(timeout)
        try:
            async for _ in self._follow(job_id, None, heartbeats=True, deadline=deadline):
                pass
        except (NotAcceptableError, NotFoundError):
            pass  # no streams here: polling answers 404 itself if the job is unknown
        poller = Poller(deadline, interval=poll_interval)
        while (delay := poller.delay(job := await self.get(job_id))) is not None:  # noqa: ASYNC110
            await asyncio.sleep(delay)  # polling a server: there is nothing local to wait on
        return job

    # -- events --------------------------------------------------------------------------

    def events(
        self,
        job_id: str,
        last_event_id: str | int | None = None,
        *,
        heartbeats: bool = False,
        reconnect: Reconnect | None = None,
    ) -> AsyncIterator[Event]:
        """A job's events until its terminal one, resumed after drops (see `Client.events`)."""
        return self._follow(
            job_id, last_event_id, heartbeats=heartbeats, reconnect=reconnect, deadline=None
        )

    def all_events(
        self,
        last_event_id: str | int | None = None,
        *,
        heartbeats: bool = False,
        reconnect: Reconnect | None = None,
    ) -> AsyncIterator[Event]:
        """The events of every job the caller may see; never ends."""
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
    ) -> AsyncIterator[Event]:
        resumer = Resumer(
            reconnect or self.reconnect,
            last_event_id=None if last_event_id is None else str(last_event_id),
            heartbeats=heartbeats,
            deadline=deadline,
            what=f"job {job_id}'s event stream",
        )
        return self._stream(calls.job_path(job_id, "events"), resumer)

    async def _stream(self, path: str, resumer: Resumer) -> AsyncIterator[Event]:
        while True:
            failure: Exception | None = None
            timeout = self._stream_timeout(resumer.read_timeout(self.stream_timeout))
            try:
                async with self._http.stream(
                    "GET", path, headers=resumer.headers(), timeout=timeout
                ) as response:
                    if not is_event_stream(response):
                        await response.aread()
                        failure = resumer.refusal(response)
                    else:
                        decoder = SSEDecoder()
                        async for chunk in response.aiter_bytes():
                            for sse in decoder.feed(chunk):
                                if (event := resumer.accept(sse)) is not None:
                                    yield event
                                if resumer.finished:
                                    return
                            resumer.note_place(decoder.dispatched_id)
            except httpx.TransportError as exc:
                failure = exc
            await asyncio.sleep(resumer.backoff(failure))

    # -- records, artifacts, identity ------------------------------------------------------

    async def records_page(
        self, job_id: str, *, status: str | None = None, limit: int | None = None, offset: int = 0
    ) -> RecordPage:
        """One page of a job's map-stage results."""
        return await self._send(
            calls.records_page(job_id, status=status, limit=limit, offset=offset)
        )

    async def records(
        self, job_id: str, status: str | None = None, *, page_size: int = 1000
    ) -> AsyncIterator[Record]:
        """Every map-stage result of a job."""
        offset: int | None = 0
        while offset is not None:
            page = await self.records_page(job_id, status=status, limit=page_size, offset=offset)
            for record in page.records:
                yield record
            offset = calls.next_offset(page.offset, len(page.records), page.total)

    async def artifacts(self, job_id: str) -> builtins.list[Artifact]:
        """The files a job produced."""
        return await self._send(calls.artifacts(job_id))

    async def download_link(self, job_id: str, name: str | None = None) -> Download:
        """A signed URL for an artifact."""
        return await self._send(calls.download_link(job_id, name))

    async def download(
        self, job_id: str, name: str | None = None, path: str | os.PathLike[str] | None = None
    ) -> Path:
        """Save an artifact to `path`, atomically and checked (see `Client.download`)."""
        link = await self.download_link(job_id, name)
        target = target_path(path, link.filename)
        try:
            # auth=None: the URL is signed, and may point at another host (S3).
            async with self._http.stream("GET", link.download_url, auth=None) as response:
                if response.is_error:
                    await response.aread()
                    raise_for_problem(response)
                with await asyncio.to_thread(AtomicFile, target, link) as out:
                    async for chunk in response.aiter_bytes():
                        await asyncio.to_thread(out.write, chunk)
                    return await asyncio.to_thread(out.commit)
        except httpx.TransportError as exc:
            raise transport_error(exc, link.download_url) from exc

    async def me(self) -> Me:
        """Who the caller is, its limits and its usage."""
        return await self._send(calls.me())
