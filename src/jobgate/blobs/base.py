"""The blob store contract: content-addressed files, named by their SHA-256.

Key contracts:

- A blob's name is the lowercase hex SHA-256 of its bytes, so the same bytes are stored
  once, and a stored blob never changes.
- A blob becomes visible only complete: bytes stream to a temporary object first, and
  are published under their hash in one atomic step. A failed, refused or cancelled
  write leaves nothing behind.
- A write may also be staged (`stage_stream`): hashed and kept unpublished until its
  caller decides, so a request publishes its uploads only once it has read and
  validated all of them, just before it writes their rows.
- The store knows nothing of owners or jobs; the `blobs` and `blob_grants` tables do.
  Garbage collection deletes blobs that no row references any more.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from jobgate.errors import JobgateError

HEAD_BYTES = 8192
"""How many leading bytes `StoredBlob.head` keeps, for sniffing the file type."""

_SHA256 = re.compile(r"[0-9a-f]{64}")


class BlobError(JobgateError):
    """The blob storage failed."""


class InvalidDigest(BlobError, ValueError):
    """Not a SHA-256 digest (64 lowercase hexadecimal characters)."""

    def __init__(self, value: str) -> None:
        super().__init__(f"Not a SHA-256 digest (64 lowercase hex characters): {value[:80]!r}")
        self.value = value


def is_sha256(value: str) -> bool:
    """Whether `value` is a SHA-256 digest in canonical form (64 lowercase hex)."""
    return _SHA256.fullmatch(value) is not None


def check_sha256(value: str) -> str:
    """Return `value` if it is a canonical SHA-256 digest.

    Raises:
        InvalidDigest: `value` is anything else, so it never reaches a path or a key.
    """
    if not is_sha256(value):
        raise InvalidDigest(value)
    return value


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """A blob that is now stored.

    Attributes:
        sha256: The lowercase hex SHA-256 of the bytes, the blob's name.
        size: Its length in bytes.
        head: Its first `HEAD_BYTES` bytes (all of them if shorter), for type sniffing.
        created: Whether this write created the blob (False: the bytes were already
            stored, perhaps for someone else, so `discard` leaves them alone).
        stamp: What the creator needs to `withdraw` the blob (the local store: its
            modification time as published, which a later writer of the same bytes moves).
    """

    sha256: str
    size: int
    head: bytes
    created: bool = True
    stamp: int = 0


@dataclass(frozen=True, slots=True)
class BlobFile:
    """A stored blob as a listing finds it: its hash, length and stamp (see `StoredBlob`;
    the local store: its modification time in nanoseconds)."""

    sha256: str
    size: int
    stamp: int


class StagedBlob(Protocol):
    """Bytes written and hashed, not yet published under their hash (`stage_stream`).

    Nobody else sees them until `publish`. Call `publish` or `discard`: a staged blob
    holds a temporary object until one of them runs.
    """

    @property
    def sha256(self) -> str:
        """The lowercase hex SHA-256 of the bytes."""
        ...

    @property
    def size(self) -> int:
        """Their length in bytes."""
        ...

    @property
    def head(self) -> bytes:
        """Their first `HEAD_BYTES` bytes, for type sniffing."""
        ...

    @property
    def stored(self) -> StoredBlob | None:
        """The published blob, once `publish` has run (even if its caller was
        cancelled meanwhile), else None."""
        ...

    async def publish(self) -> StoredBlob:
        """Publish the bytes under their hash (dropped if that blob exists already).

        Publishing twice returns the first result.

        Raises:
            BlobError: The storage failed; the temporary object is removed.
        """
        ...

    async def discard(self) -> None:
        """Remove the temporary object; nothing, once published."""
        ...


@runtime_checkable
class BlobStore(Protocol):
    """Where file bytes live, named by their SHA-256.

    Every method may raise `BlobError` when the storage itself fails; no method lets a
    driver or `OSError` escape.
    """

    async def put_stream(
        self, chunks: AsyncIterator[bytes], *, max_bytes: int | None = None
    ) -> StoredBlob:
        """Store the bytes `chunks` yields, hashing them on the way.

        The bytes go to a temporary object that is published under its hash only when
        the stream ends; if the blob already exists, the copy is dropped (same bytes,
        stored once).

        Args:
            chunks: The bytes, in chunks of any size.
            max_bytes: Refuse the stream as soon as it passes this many bytes.

        Returns:
            The stored blob's hash, size and first bytes.

        Raises:
            FileTooLarge: The stream passed `max_bytes`; nothing is kept.
            BlobError: The storage failed; nothing is kept.
        """
        ...

    async def stage_stream(
        self, chunks: AsyncIterator[bytes], *, max_bytes: int | None = None
    ) -> StagedBlob:
        """Write and hash the bytes `chunks` yields, without publishing them.

        Args:
            chunks: The bytes, in chunks of any size.
            max_bytes: Refuse the stream as soon as it passes this many bytes.

        Returns:
            The staged bytes; `publish` or `discard` them.

        Raises:
            FileTooLarge: The stream passed `max_bytes`; nothing is kept.
            BlobError: The storage failed; nothing is kept.
        """
        ...

    async def put_bytes(self, data: bytes) -> StoredBlob:
        """Store `data`; see `put_stream`."""
        ...

    async def put_file(self, path: Path) -> StoredBlob:
        """Store a copy of the local file at `path`; see `put_stream`.

        Raises:
            BlobError: `path` cannot be read, or the storage failed.
        """
        ...

    async def exists(self, sha256: str) -> bool:
        """Whether the blob is stored.

        Raises:
            InvalidDigest: `sha256` is not a canonical digest.
        """
        ...

    def local_path(self, sha256: str) -> Path | None:
        """Where the blob lives on this machine's disk, or None for remote backends.

        The path is computed, not checked: call `exists` to know whether it is there.
        Never write to it.

        Raises:
            InvalidDigest: `sha256` is not a canonical digest.
        """
        ...

    async def withdraw(self, blob: StoredBlob) -> bool:
        """Remove a blob that this caller's write created, unless another writer has
        published the same bytes since, or does so meanwhile: it then stays. Whether it
        was removed. For undoing a refused request; `delete` removes unconditionally.

        Raises:
            InvalidDigest: `blob.sha256` is not a canonical digest.
        """
        ...

    async def stamp(self, sha256: str) -> int | None:
        """The blob's stamp now (None: it is not stored), for a later `withdraw` that
        removes it only if no writer has published the same bytes since.

        Raises:
            InvalidDigest: `sha256` is not a canonical digest.
        """
        ...

    async def list_files(self, prefix: str) -> list[BlobFile]:
        """The stored blobs whose hash starts with `prefix` (two hex digits: one of 256
        shards), for garbage collection to find the ones the store has no row for.

        Raises:
            ValueError: `prefix` is not two lowercase hex digits.
        """
        ...

    async def delete(self, sha256: str) -> None:
        """Remove the blob; removing a missing blob is not an error.

        Raises:
            InvalidDigest: `sha256` is not a canonical digest.
        """
        ...

    async def ping(self) -> float:
        """Check that the storage answers and accepts writes.

        Returns:
            The round trip in milliseconds.

        Raises:
            BlobError: The storage does not answer or refuses writes.
        """
        ...

    async def aclose(self) -> None:
        """Release the store's resources; the store is not used afterwards."""
        ...


async def discard(store: BlobStore, *blobs: StoredBlob, keep: Collection[str] = ()) -> None:
    """Remove the published blobs a refused request created, so it leaves no file behind.

    Kept are the blobs that were already stored before the request (`created` is False),
    those named in `keep` (the hashes a committed row refers to, which the caller reads
    from the store just before), and those another writer published too, before or
    during the removal (`BlobStore.withdraw`): the same bytes may be another caller's,
    whose row is not committed yet.

    Args:
        store: The store the blobs were written to.
        *blobs: The blobs the refused request published.
        keep: Hashes not to remove, whoever created them.
    """
    for blob in blobs:
        if blob.created and blob.sha256 not in keep:
            await store.withdraw(blob)
