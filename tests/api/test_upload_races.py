"""Uploads of the same bytes at once: a refused request never removes a blob that another
request stored.

Blobs are content-addressed, so two requests uploading the same bytes share one file. A
request publishes its parts only once it has read and validated all of them, and a
refused request removes only what it created and no committed row refers to.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import pytest
from fastapi import FastAPI

from jobgate.api.uploads import Form, UploadedFile
from jobgate.ids import now
from jobgate.store.repositories import blobs as blob_repo
from tests.api.helpers import asgi_scope, blob_root, multipart, state_of

MakeClient = Any
ExpectProblem = Any


def _scope(path: str, key: str, length: int) -> dict[str, Any]:
    return asgi_scope(
        "POST",
        path,
        [
            (b"authorization", key.encode()),
            (b"content-type", b"multipart/form-data; boundary=B"),
            (b"content-length", str(length).encode()),
        ],
    )


@pytest.mark.parametrize("path", ["/v1/files", "/v1/jobs"])
async def test_a_refused_upload_never_removes_the_same_bytes_another_request_stored(
    app: FastAPI, make_client: MakeClient, expect_problem: ExpectProblem, path: str
) -> None:
    """Alice streams a file part and holds her request open; Bob uploads the same bytes
    (201); Alice's request then fails (a malformed tail, 400). Bob's file is still
    stored, and a job of Bob's may use it."""
    alice = await make_client("alice")
    bob = await make_client("bob")
    content = b"shared bytes " + os.urandom(8).hex().encode() + b"\n"
    sha256 = hashlib.sha256(content).hexdigest()
    fields = (
        b'--B\r\nContent-Disposition: form-data; name="pipeline"\r\n\r\ntext-stats\r\n'
        if path == "/v1/jobs"
        else b""
    )
    first = (
        fields
        + b'--B\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n\r\n'
        + content
        + b"\r\n--B\r\n"
    )
    rest = b"Garbage-without-colon\r\n\r\nxx\r\n--B--\r\n"
    asked_again = asyncio.Event()
    go = asyncio.Event()
    chunks = [first, rest]

    async def receive() -> dict[str, Any]:
        if len(chunks) == 2:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": True}
        if chunks:
            asked_again.set()  # the first chunk, her whole file part, has been read
            await go.wait()
            return {"type": "http.request", "body": chunks.pop(0), "more_body": False}
        await asyncio.Event().wait()  # the client stays; the app must not ask again
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = _scope(path, alice.headers["authorization"], len(first) + len(rest))
    alices_request = asyncio.create_task(app(scope, receive, send))  # type: ignore[arg-type]
    await asyncio.wait_for(asked_again.wait(), timeout=10)

    upload = await bob.post("/v1/files", files=[("files", ("b.txt", content, "text/plain"))])
    assert upload.status_code == 201, upload.text
    assert upload.json()["files"][0]["sha256"] == sha256

    go.set()
    await asyncio.wait_for(alices_request, timeout=10)
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 400
    assert (b"content-type", b"application/problem+json") in start["headers"]

    stored = state_of(app).blobs.local_path(sha256)
    assert stored is not None
    assert stored.read_bytes() == content
    job = await bob.post("/v1/jobs", json={"pipeline": "text-stats", "files": [sha256]})
    assert job.status_code == 202, job.text
    assert list((blob_root(app) / "tmp").glob("*.part")) == []


async def test_discard_keeps_a_blob_it_created_once_a_committed_row_refers_to_it(
    app: FastAPI, make_client: MakeClient
) -> None:
    """A request that published a blob first (and so created it) and is refused after
    another request of the same bytes committed its row leaves the blob in place."""
    state = state_of(app)
    content = b"published first " + os.urandom(8).hex().encode() + b"\n"

    async def chunks() -> Any:
        yield content

    staged = await state.blobs.stage_stream(chunks())
    form = Form(files=[UploadedFile("files", "a.txt", staged, "text/plain")])
    await form.publish()
    assert staged.stored is not None
    assert staged.stored.created

    bob = await make_client("bob")
    body, headers = multipart(files=[("b.txt", content)])
    assert (await bob.post("/v1/files", content=body, headers=headers)).status_code == 201

    await form.discard(state.blobs, state.db)
    assert await state.blobs.exists(staged.sha256)
    job = await bob.post("/v1/jobs", json={"pipeline": "text-stats", "files": [staged.sha256]})
    assert job.status_code == 202, job.text


async def test_discard_removes_what_a_refused_request_created_and_nobody_recorded(
    app: FastAPI,
) -> None:
    """Without a row referring to it, the blob a refused request published is removed,
    and a part it never published leaves no temporary file."""
    state = state_of(app)

    async def chunks(data: bytes) -> Any:
        yield data

    published = await state.blobs.stage_stream(chunks(os.urandom(32)))
    staged = await state.blobs.stage_stream(chunks(os.urandom(32)))
    form = Form(
        files=[
            UploadedFile("files", "a.bin", published, "application/octet-stream"),
            UploadedFile("files", "b.bin", staged, "application/octet-stream"),
        ]
    )
    await published.publish()
    await form.discard(state.blobs, state.db)
    assert not await state.blobs.exists(published.sha256)
    assert not await state.blobs.exists(staged.sha256)
    assert list((blob_root(app) / "tmp").glob("*.part")) == []


async def test_a_refused_request_keeps_the_bytes_another_request_published_but_not_committed(
    app: FastAPI, make_client: MakeClient
) -> None:
    """Bob's request publishes the bytes first (creating the blob); Alice's publishes the
    same bytes (finding them stored) and has yet to commit her row when Bob's is refused.
    The blob stays, and Alice's job can use it (regression: Bob's refusal removed it, as
    no committed row referred to it yet; a probe lost Alice's file in 64 of 300 rounds)."""
    state = state_of(app)
    content = b"same bytes " + os.urandom(8).hex().encode() + b"\n"

    async def chunks() -> Any:
        yield content

    bobs = Form(
        files=[
            UploadedFile("files", "b.txt", await state.blobs.stage_stream(chunks()), "text/plain")
        ]
    )
    await bobs.publish()
    alices = Form(
        files=[
            UploadedFile("files", "a.txt", await state.blobs.stage_stream(chunks()), "text/plain")
        ]
    )
    await alices.publish()
    assert [f.blob.stored.created for f in bobs.files + alices.files if f.blob.stored] == [
        True,
        False,
    ]

    await bobs.discard(state.blobs, state.db)
    sha256 = hashlib.sha256(content).hexdigest()
    stored = state.blobs.local_path(sha256)
    assert stored is not None
    assert stored.read_bytes() == content
    async with state.db.write() as conn:  # what Alice's request does next
        row = blob_repo.BlobRow(sha256=sha256, size=len(content), content_type="text/plain")
        await blob_repo.add(conn, [row], at=now())
        await blob_repo.grant(conn, [sha256], owner="alice", at=now())
    alice = await make_client("alice")
    job = await alice.post("/v1/jobs", json={"pipeline": "text-stats", "files": [sha256]})
    assert job.status_code == 202, job.text
    assert list((blob_root(app) / "tmp").glob("*.part")) == []
