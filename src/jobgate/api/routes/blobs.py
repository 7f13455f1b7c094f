"""`GET /v1/blobs/{sha256}` (and `HEAD`): signed downloads, without credentials.

The signature vouches for the blob, the file name, the content type and the expiry;
a tampered or expired URL is 403. Files are served as attachments with `nosniff`
and a sandboxing CSP, so an HTML or SVG artifact is never rendered inline.

`Range` follows RFC 9110 §14.2: a range of another unit, or one that is not a valid
byte range (`bytes=5-2`, `bytes=abc`), is ignored and the whole file is sent (200); a
valid range that starts past the end is 416 `range-not-satisfiable` (a problem, with
`Content-Range: bytes */<size>`).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from jobgate.api.deps import StateDep
from jobgate.api.schemas import problem_responses
from jobgate.blobs import is_sha256
from jobgate.blobs.signing import verify_blob_signature
from jobgate.errors import Forbidden, NotFound
from jobgate.ids import now

router = APIRouter(prefix="/v1/blobs", tags=["files"])


def content_disposition(filename: str) -> str:
    """`attachment` with an ASCII fallback name and the exact UTF-8 name (RFC 6266)."""
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


class BlobResponse(FileResponse):
    """A `FileResponse` whose Range refusals are problems, or ignored (module docstring)."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            return []  # no range: the whole file, as RFC 9110 allows (and for units, asks)
        except RangeNotSatisfiable as exc:
            # Raised before anything is sent, so the app's handler answers it.
            raise HTTPException(
                416,
                "the range starts past the end of the file",
                headers={"Content-Range": f"bytes */{exc.max_size}"},
            ) from None


# The longest signed parts a URL of ours has: longer ones are refused before any HMAC.
_MAX_NAME, _MAX_TYPE, _MAX_SIGNATURE = 1024, 255, 128


@router.get(
    "/{sha256}",
    response_class=BlobResponse,
    summary="Download a blob through a signed URL (no credentials)",
    responses={
        200: {"description": "The bytes", "content": {"application/octet-stream": {}}},
        206: {"description": "The requested range"},
        **problem_responses(403, 404, 416),
    },
)
async def get_blob(
    sha256: str,
    state: StateDep,
    exp: Annotated[str | None, Query()] = None,
    name: Annotated[str | None, Query()] = None,
    ct: Annotated[str | None, Query()] = None,
    sig: Annotated[str | None, Query()] = None,
) -> FileResponse:
    """The blob's bytes, with `Range` support, if the signature is genuine and live.

    A URL missing any signed part, or with a part of the wrong form, is refused like a
    tampered one (403), not as a malformed query (422), so a probe learns nothing from
    which part it changed.
    """
    if (
        exp is None
        or name is None
        or ct is None
        or sig is None
        or not (exp.isascii() and exp.isdigit() and len(exp) <= 19)
        or len(name) > _MAX_NAME
        or len(ct) > _MAX_TYPE
        or len(sig) > _MAX_SIGNATURE
    ):
        raise Forbidden("this download URL is invalid or expired")
    valid = is_sha256(sha256) and verify_blob_signature(
        key=state.settings.signing_key,
        sha256=sha256,
        filename=name,
        content_type=ct,
        expires_at=int(exp),
        signature=sig,
        now=now(),
    )
    if not valid:
        raise Forbidden("this download URL is invalid or expired")
    path = state.blobs.local_path(sha256)
    if path is None or not await state.blobs.exists(sha256):
        raise NotFound("this file is no longer stored")
    return BlobResponse(
        path,
        media_type=ct,
        headers={
            "Content-Disposition": content_disposition(name),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "sandbox; default-src 'none'",
            "Cache-Control": "private, max-age=0",
        },
    )


# HEAD too: `curl -I` and download managers ask for the size and type first. Starlette
# sends a HEAD answer's headers alone; one documented operation is enough.
router.add_api_route(
    "/{sha256}",
    get_blob,
    methods=["HEAD"],
    response_class=BlobResponse,
    include_in_schema=False,
)
