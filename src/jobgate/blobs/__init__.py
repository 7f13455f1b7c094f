"""Content-addressed blob storage, chosen by URL (`JOBGATE_BLOBS_URL`).

    file:///abs/dir   LocalBlobStore, the embedded default
    s3://bucket/pfx   S3-compatible object storage (not available yet)

Backends are imported only when their scheme is configured, so a missing optional
dependency only matters to whoever configures that backend.
"""

from __future__ import annotations

import importlib
from typing import Protocol
from urllib.parse import urlsplit

from jobgate.blobs.base import (
    HEAD_BYTES,
    BlobError,
    BlobStore,
    InvalidDigest,
    StagedBlob,
    StoredBlob,
    check_sha256,
    discard,
    is_sha256,
)

__all__ = [
    "HEAD_BYTES",
    "BlobError",
    "BlobStore",
    "InvalidDigest",
    "StagedBlob",
    "StoredBlob",
    "check_sha256",
    "discard",
    "is_sha256",
    "open_blob_store",
]

# scheme -> "module:class" whose `from_url(url)` builds the store, or None while the
# backend does not exist yet.
BACKENDS: dict[str, str | None] = {
    "file": "jobgate.blobs.local:LocalBlobStore",
    "s3": None,
}


class _BackendClass(Protocol):
    def from_url(self, url: str) -> BlobStore: ...


def open_blob_store(url: str) -> BlobStore:
    """Build the blob store that `url` names.

    Args:
        url: For example `file:///var/lib/jobgate/blobs`.

    Returns:
        The store, ready to use; call `aclose()` when done.

    Raises:
        BlobError: The scheme is unknown, its backend is not available, or the rest of
            the URL is invalid for the backend.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme not in BACKENDS:
        known = ", ".join(f"{name}://" for name in BACKENDS)
        raise BlobError(f"Unknown blob storage URL {url!r}; expected one of: {known}")
    target = BACKENDS[scheme]
    if target is None:
        raise BlobError(
            f"{scheme.upper()} blob storage is not available yet; "
            "set JOBGATE_BLOBS_URL to a file:///absolute/path URL"
        )
    module_name, _, class_name = target.partition(":")
    backend: _BackendClass = getattr(importlib.import_module(module_name), class_name)
    return backend.from_url(url)
