"""Request bodies read as streams: JSON with a size cap, and multipart straight to blobs.

Nothing here reads a whole body into memory or lets Starlette spool it to temporary
files. Multipart bodies are parsed with `python_multipart`'s streaming parser as they
arrive; each file part flows into `BlobStore.stage_stream`, which hashes it while
writing to a temporary file of the blob store. The parts stay unpublished until the
route has read and validated the whole request: it calls `Form.publish` just before
writing their rows, so no client can hold a published upload open while its request
may still be refused. Limits are enforced on the bytes actually received, never on
what `Content-Length` claims (a larger claim is refused before reading anything):

- the whole request: `JOBGATE_MAX_UPLOAD_BYTES` (413 `file-too-large`);
- the number of parts: `JOBGATE_MAX_UPLOAD_PARTS` (400 `malformed-request`);
- each text field: `MAX_FIELD_BYTES` (413);
- each file: a caller-supplied cap, usually the pipeline's `FileRule.max_bytes` (413).

A refused request removes its temporary files, and every blob it published and created
that no committed row refers to (`Form.discard`), so it leaves no file.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote

import structlog
from fastapi import HTTPException
from pydantic_core import from_json
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from jobgate.blobs import BlobStore, StagedBlob, discard
from jobgate.errors import FileTooLarge, MalformedRequest, ValidationFailed
from jobgate.pipelines.files import sanitize_filename, sniff
from jobgate.store import Database
from jobgate.store.repositories import blobs as blob_repo

MAX_FIELD_BYTES = 64_000
"""The largest non-file multipart field (`params` included)."""

MAX_PART_HEADER_BYTES = 8_192
MAX_PART_HEADERS = 16

_FILENAME_STAR = re.compile(r"filename\*\s*=\s*([^;]+)", re.IGNORECASE)

BodyKind = Literal["json", "multipart"]


def body_kind(request: Request) -> BodyKind:
    """Whether the request carries JSON (also: no Content-Type) or multipart form data.

    Raises:
        HTTPException: 415 for any other content type.
    """
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        return "multipart"
    if media_type in ("", "application/json") or media_type.endswith("+json"):
        return "json"
    raise HTTPException(415, "send application/json or multipart/form-data")


def check_content_length(request: Request, max_bytes: int) -> None:
    """Refuse a request whose declared length is already over `max_bytes`.

    Raises:
        FileTooLarge: the declared length is too large.
        MalformedRequest: the header is not a non-negative integer.
    """
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise MalformedRequest("Content-Length is not a number") from None
    if length < 0:
        raise MalformedRequest("Content-Length is negative")
    if length > max_bytes:
        raise FileTooLarge(f"the request is larger than the limit of {max_bytes} bytes")


async def _capped(request: Request, max_bytes: int) -> AsyncGenerator[bytes, None]:
    """The body's chunks; raises `FileTooLarge` as soon as more than `max_bytes` arrived."""
    check_content_length(request, max_bytes)
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise FileTooLarge(f"the request is larger than the limit of {max_bytes} bytes")
        if chunk:
            yield chunk


async def read_json(request: Request, *, max_bytes: int) -> Any:
    """The request body parsed as JSON, read with a size cap.

    Parsed strictly (`parse_json`): `NaN`, `Infinity` and numbers too large for a float
    are refused too.

    Raises:
        MalformedRequest: the body is empty, not UTF-8, or not JSON (or nested too
            deeply, or holding a number too large for a float).
        FileTooLarge: the body is larger than `max_bytes`.
    """
    buffer = bytearray()
    async with aclosing(_capped(request, max_bytes)) as chunks:
        async for chunk in chunks:
            buffer += chunk
    if not buffer.strip():
        raise MalformedRequest("the request body is empty")
    try:
        return parse_json(buffer)
    except ValueError:
        raise MalformedRequest("the request body is not valid JSON") from None
    except OverflowError:
        raise MalformedRequest("a number in the request body is too large") from None


# Only a long exponent or a long run of digits can make a number too large for a float.
_HUGE_NUMBER = re.compile(rb"[0-9][eE]\+?[0-9]{3}|[0-9]{309}")


def parse_json(data: bytes | bytearray) -> Any:
    """`data` parsed as JSON, strictly (RFC 8259): no `NaN` or `Infinity`, no lone
    surrogates, at most 200 levels deep, no number too large for a float.

    Raises:
        ValueError: not JSON.
        OverflowError: a number that would read as infinity.
    """
    value = from_json(data, allow_inf_nan=False)
    if _HUGE_NUMBER.search(data) and _holds_infinity(value):
        raise OverflowError("a number is too large")
    return value


def _holds_infinity(value: Any) -> bool:
    if isinstance(value, float):
        return math.isinf(value)
    if isinstance(value, dict):
        return any(_holds_infinity(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_infinity(v) for v in value)
    return False


# -- multipart -------------------------------------------------------------------------


log = structlog.get_logger("jobgate.api")


@dataclass(frozen=True)
class UploadedFile:
    """A file part, staged in the blob store (published by `Form.publish`).

    Attributes:
        field: the part's field name.
        name: the sanitised file name.
        blob: the staged blob (hash, size, first bytes; once published, the stored blob).
        content_type: detected from the bytes (and the name, for text), never from the
            part's own Content-Type header.
    """

    field: str
    name: str
    blob: StagedBlob
    content_type: str

    @property
    def sha256(self) -> str:
        return self.blob.sha256

    @property
    def bytes_type(self) -> str:
        """The type the bytes alone give, which the blob's row keeps: the same bytes
        are one blob for every owner, each naming them as they like (`by_name`)."""
        return sniff(self.blob.head)

    @property
    def size(self) -> int:
        return self.blob.size


@dataclass
class Form:
    """A parsed multipart body: its text fields and its staged files, in order."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[UploadedFile] = field(default_factory=list)

    async def publish(self) -> None:
        """Publish the files under their hashes: once the request is validated, just
        before its rows are written (so the window before its commit or rollback is
        short, and the server's)."""
        for upload in self.files:
            await upload.blob.publish()

    async def drop_staged(self) -> None:
        """Remove the temporary files of the parts not published."""
        for upload in self.files:
            await upload.blob.discard()

    async def discard(self, store: BlobStore, db: Database) -> None:
        """Undo a refused request: remove its temporary files, and the blobs it
        published and created unless a committed row refers to them by now (the same
        bytes, uploaded by a request that published after this one)."""
        await self.drop_staged()
        published = [f.blob.stored for f in self.files]
        created = [blob for blob in published if blob is not None and blob.created]
        if not created:
            return
        try:
            async with db.read() as conn:
                recorded = await blob_repo.find(conn, [blob.sha256 for blob in created])
        except Exception as exc:
            # Unsure whether a row refers to them: keep them (the garbage collector's
            # job), and let the request's own error be the answer.
            log.warning("upload_discard_skipped", error=type(exc).__name__)
            return
        await discard(store, *created, keep=recorded.keys())


FileCap = Callable[[Mapping[str, str]], int | None]
"""Given the text fields seen so far, the largest file allowed now (None: no own cap)."""


@dataclass
class _Event:
    kind: Literal["part", "data", "end", "done"]
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytes = b""


class _PartReader:
    """Async iterator over the data of the current part, pulling from the event stream."""

    def __init__(self, events: AsyncIterator[_Event]) -> None:
        self._events = events
        self._ended = False

    def __aiter__(self) -> _PartReader:
        return self

    async def __anext__(self) -> bytes:
        while not self._ended:
            try:
                event = await self._events.__anext__()
            except StopAsyncIteration:
                raise MalformedRequest("the multipart body ends inside a part") from None
            if event.kind == "data":
                if event.data:
                    return event.data
            elif event.kind == "end":
                self._ended = True
            else:
                raise MalformedRequest("the multipart body is malformed")
        raise StopAsyncIteration


async def _events(
    request: Request, boundary: bytes, max_bytes: int
) -> AsyncGenerator[_Event, None]:
    """Parse the body as it arrives into part/data/end events."""
    pending: list[_Event] = []
    header_name = bytearray()
    header_value = bytearray()
    headers: dict[bytes, bytes] = {}
    finished = False

    def on_part_begin() -> None:
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(header_name).strip().lower()] = bytes(header_value).strip()
        header_name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        pending.append(_Event("part", headers=dict(headers)))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        pending.append(_Event("data", data=data[start:end]))

    def on_part_end() -> None:
        pending.append(_Event("end"))

    def on_end() -> None:
        nonlocal finished
        finished = True

    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": on_part_begin,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_headers_finished": on_headers_finished,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
                "on_end": on_end,
            },
            max_header_count=MAX_PART_HEADERS,
            max_header_size=MAX_PART_HEADER_BYTES,
        )
    except FormParserError:  # a boundary longer than the parser takes (256 bytes)
        raise MalformedRequest("the multipart boundary is too long") from None
    async with aclosing(_capped(request, max_bytes)) as chunks:
        async for chunk in chunks:
            try:
                parser.write(chunk)
            except FormParserError:
                raise MalformedRequest("the multipart body is malformed") from None
            ready, pending[:] = list(pending), []
            for event in ready:
                yield event
            if finished:
                break
    try:
        parser.finalize()
    except FormParserError:
        raise MalformedRequest("the multipart body is malformed") from None
    for event in pending:
        yield event
    if not finished:
        raise MalformedRequest("the multipart body is incomplete")
    yield _Event("done")


def _disposition(headers: Mapping[bytes, bytes]) -> tuple[str, str | None]:
    """The part's field name and, for a file, its raw file name."""
    raw = headers.get(b"content-disposition")
    if raw is None:
        raise MalformedRequest("a multipart part has no Content-Disposition")
    kind, options = parse_options_header(raw)
    if kind.lower() != b"form-data" or b"name" not in options:
        raise MalformedRequest("a multipart part is not form-data with a name")
    name = options[b"name"].decode("utf-8", "replace")
    filename: str | None = None
    # RFC 5987 `filename*=charset'lang'value`, which python_multipart does not decode,
    # comes first where both are given (RFC 6266: `filename` is the fallback for old
    # clients). Its charsets are UTF-8 and ISO-8859-1.
    match = _FILENAME_STAR.search(raw.decode("latin-1"))
    if match:
        prefix, _, encoded = match.group(1).strip().strip('"').rpartition("'")
        charset = prefix.split("'", 1)[0].strip().lower()
        encoding = "iso-8859-1" if charset in ("iso-8859-1", "latin-1", "latin1") else "utf-8"
        filename = unquote(encoded, encoding=encoding, errors="replace")
    elif b"filename" in options:
        filename = options[b"filename"].decode("utf-8", "replace")
    return name, filename


async def parse_form(
    request: Request,
    store: BlobStore,
    *,
    max_bytes: int,
    max_parts: int,
    text_fields: Collection[str],
    file_fields: Collection[str] = ("files",),
    file_cap: FileCap | None = None,
) -> Form:
    """Stream a multipart body: text fields into memory, files into `store`.

    Args:
        request: a `multipart/form-data` request.
        store: where file parts go.
        max_bytes: the most bytes the whole body may have.
        max_parts: the most parts it may have.
        text_fields: the names of the text fields accepted (each at most once).
        file_fields: the names of the file fields accepted (any number of times).
        file_cap: the per-file cap, asked when each file part starts.

    Returns:
        The fields and the staged files, to `Form.publish` (or `Form.discard`). On any
        error their temporary files are removed before the error propagates.

    Raises:
        MalformedRequest: no boundary, malformed or empty body, too many parts.
        FileTooLarge: the body, a field or a file is over its limit.
        ValidationFailed: a field that is not accepted, repeated, or not UTF-8.
    """
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if not boundary:
        raise MalformedRequest("multipart/form-data without a boundary")
    form = Form()
    try:
        await _read_parts(
            request, boundary, form, store, max_bytes, max_parts, text_fields, file_fields, file_cap
        )
    except BaseException:
        await form.drop_staged()
        raise
    if not form.fields and not form.files:
        raise MalformedRequest("the multipart body has no parts")
    return form


async def _read_parts(
    request: Request,
    boundary: bytes,
    form: Form,
    store: BlobStore,
    max_bytes: int,
    max_parts: int,
    text_fields: Collection[str],
    file_fields: Collection[str],
    file_cap: FileCap | None,
) -> None:
    parts = 0
    async with aclosing(_events(request, boundary, max_bytes)) as events:
        async for event in events:
            if event.kind == "done":
                return
            if event.kind != "part":
                raise MalformedRequest("the multipart body is malformed")
            parts += 1
            if parts > max_parts:
                raise MalformedRequest(f"the multipart body has more than {max_parts} parts")
            name, filename = _disposition(event.headers)
            reader = _PartReader(events)
            if filename is None:
                form.fields[name] = await _read_field(name, reader, form, text_fields)
                continue
            if name not in file_fields:
                raise ValidationFailed(
                    f"unexpected file field {name[:64]!r}",
                    errors=[{"loc": [name[:64]], "msg": "Unexpected file field"}],
                )
            cap = file_cap(form.fields) if file_cap is not None else None
            blob = await store.stage_stream(reader, max_bytes=cap)
            if not filename and not blob.size:
                # What a browser sends for a file input left empty: no file at all.
                await blob.discard()
                continue
            safe_name = sanitize_filename(filename)
            form.files.append(
                UploadedFile(
                    field=name, name=safe_name, blob=blob, content_type=sniff(blob.head, safe_name)
                )
            )
    raise MalformedRequest("the multipart body is incomplete")


async def _read_field(name: str, reader: _PartReader, form: Form, accepted: Collection[str]) -> str:
    if name not in accepted:
        raise ValidationFailed(
            f"unexpected field {name[:64]!r}",
            errors=[{"loc": [name[:64]], "msg": "Extra inputs are not permitted"}],
        )
    if name in form.fields:
        raise ValidationFailed(
            f"field {name!r} is repeated",
            errors=[{"loc": [name], "msg": "The field may appear only once"}],
        )
    value = bytearray()
    async for chunk in reader:
        value += chunk
        if len(value) > MAX_FIELD_BYTES:
            raise FileTooLarge(f"field {name!r} is larger than {MAX_FIELD_BYTES} bytes")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationFailed(
            f"field {name!r} is not UTF-8 text",
            errors=[{"loc": [name], "msg": "Value is not valid UTF-8"}],
        ) from None
