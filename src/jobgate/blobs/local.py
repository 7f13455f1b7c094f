"""Blobs in a local directory, the embedded default.

Layout: `root/ab/cd/<sha256>` for blobs, `root/tmp/*.part` for writes in progress.
A write fills a temporary file in `root/tmp/` (same filesystem, so publishing it is an
atomic link or rename), fsyncs it, and links it under its hash only if no blob of that
hash exists yet. Every file operation runs in a worker thread, never on the event loop.

A staged write (`stage_stream`) stops before the link: its closed temporary file waits
for `publish` or `discard`.

Guarantees: a blob path only ever holds complete bytes matching its name; a write that
fails, is refused (`max_bytes`) or is cancelled removes its temporary file before the
error reaches the caller. Only a crash of the process can leave `*.part` files behind;
`remove_stale_temp_files` clears them. Several processes (API, workers) may share one
root, on one machine or on a shared filesystem that supports hard links.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlsplit
from urllib.request import url2pathname

from jobgate.blobs.base import HEAD_BYTES, BlobError, BlobFile, StoredBlob, check_sha256, is_sha256
from jobgate.errors import FileTooLarge

T = TypeVar("T")

CHUNK_BYTES = 1 << 20
"""Writes are batched to about this many bytes per thread hop."""


class LocalBlobStore:
    """A `BlobStore` on a local (or shared) directory.

    Args:
        root: The directory; created on first write.
        fsync: Flush each blob to stable storage before publishing it. Turn it off only
            for throwaway data (tests, benchmarks).
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root).absolute()
        self.fsync = fsync
        self._tmp = self.root / "tmp"

    @classmethod
    def from_url(cls, url: str) -> LocalBlobStore:
        """Build a store from a `file:///absolute/path` URL.

        Raises:
            BlobError: The URL is not a local, absolute `file://` URL.
        """
        parts = urlsplit(url)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise BlobError(f"Expected a local file:///absolute/path URL, got {url!r}")
        path = Path(url2pathname(parts.path))
        if not path.is_absolute():
            raise BlobError(f"The blob directory must be absolute, got {url!r}")
        return cls(path)

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    # -- writing ----------------------------------------------------------------------

    async def put_stream(
        self, chunks: AsyncIterator[bytes], *, max_bytes: int | None = None
    ) -> StoredBlob:
        """Store the bytes `chunks` yields; see `BlobStore.put_stream`."""
        staged = await self.stage_stream(chunks, max_bytes=max_bytes)
        return await staged.publish()

    async def stage_stream(
        self, chunks: AsyncIterator[bytes], *, max_bytes: int | None = None
    ) -> LocalStagedBlob:
        """Write the bytes `chunks` yields to a temporary file; see `BlobStore.stage_stream`."""
        writer = await _in_thread(_TempFile, self._tmp, self.fsync)
        try:
            head = bytearray()
            pending: list[bytes] = []
            pending_bytes = size = 0
            async for chunk in chunks:
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise FileTooLarge(f"The file is larger than the limit of {max_bytes} bytes.")
                if len(head) < HEAD_BYTES:
                    head += chunk[: HEAD_BYTES - len(head)]
                pending.append(chunk)
                pending_bytes += len(chunk)
                if pending_bytes >= CHUNK_BYTES:
                    await _in_thread(writer.write, _join(pending))
                    pending, pending_bytes = [], 0
            if pending:
                await _in_thread(writer.write, _join(pending))
            sha256 = await _in_thread(writer.finish)
        except BaseException:
            # Also on cancellation: the temporary file must not outlive the request.
            # Errors of the source (a dropped client, say) propagate unchanged.
            with contextlib.suppress(BlobError):
                await _in_thread(writer.discard)
            raise
        return LocalStagedBlob(self.root, writer, sha256, bytes(head))

    async def put_bytes(self, data: bytes) -> StoredBlob:
        """Store `data`; see `BlobStore.put_bytes`."""

        async def single() -> AsyncIterator[bytes]:
            yield data

        return await self.put_stream(single())

    async def put_file(self, path: Path) -> StoredBlob:
        """Store a copy of the file at `path`; see `BlobStore.put_file`."""
        stop = threading.Event()
        task = asyncio.ensure_future(asyncio.to_thread(self._copy_file, Path(path), stop))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The copy runs in a thread that cannot be interrupted: ask it to stop and
            # wait for it, so that no temporary file outlives the request.
            stop.set()
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is None:
                await self.withdraw(task.result())
            raise
        except OSError as exc:
            raise BlobError(f"Cannot store a copy of {path}: {exc}") from exc

    def _copy_file(self, path: Path, stop: threading.Event) -> StoredBlob:
        with path.open("rb") as source:
            writer = _TempFile(self._tmp, self.fsync)
            try:
                head = b""
                while chunk := source.read(CHUNK_BYTES):
                    if stop.is_set():
                        raise _Stopped
                    if len(head) < HEAD_BYTES:
                        head += chunk[: HEAD_BYTES - len(head)]
                    writer.write(chunk)
                sha256, created = writer.publish(self.root)
            except BaseException:
                writer.discard()
                raise
        return StoredBlob(
            sha256=sha256, size=writer.size, head=head, created=created, stamp=writer.stamp
        )

    # -- reading and removing ---------------------------------------------------------

    def local_path(self, sha256: str) -> Path:
        """Where the blob lives (or would live); see `BlobStore.local_path`."""
        return _blob_path(self.root, check_sha256(sha256))

    async def exists(self, sha256: str) -> bool:
        """Whether the blob is stored; see `BlobStore.exists`."""
        return await asyncio.to_thread(self.local_path(sha256).is_file)

    async def withdraw(self, blob: StoredBlob) -> bool:
        """Remove a blob this caller created, unless it was claimed; see
        `BlobStore.withdraw`."""
        if not blob.created or not blob.stamp:
            return False
        final = self.local_path(blob.sha256)
        try:  # `_tmp` exists: the blob was written there first
            return await asyncio.to_thread(_withdraw, final, blob.stamp, self._tmp)
        except OSError as exc:
            raise BlobError(f"Cannot withdraw blob {blob.sha256}: {exc}") from exc

    async def stamp(self, sha256: str) -> int | None:
        """The file's modification time; see `BlobStore.stamp`."""
        path = self.local_path(sha256)
        try:
            return (await asyncio.to_thread(os.stat, path)).st_mtime_ns
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BlobError(f"Cannot read blob {sha256}: {exc}") from exc

    async def list_files(self, prefix: str) -> list[BlobFile]:
        """The blob files of one shard, `root/<prefix>/`; see `BlobStore.list_files`."""
        if len(prefix) != 2 or not all(c in "0123456789abcdef" for c in prefix):
            raise ValueError(f"a shard is two lowercase hex digits, not {prefix!r}")
        return await _in_thread(_list_shard, self.root / prefix)

    async def delete(self, sha256: str) -> None:
        """Remove the blob if it is there; see `BlobStore.delete`."""
        path = self.local_path(sha256)
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except OSError as exc:
            raise BlobError(f"Cannot delete blob {sha256}: {exc}") from exc

    async def remove_stale_temp_files(self, *, older_than_s: float = 3600.0) -> int:
        """Remove temporary files left by crashed writers.

        Args:
            older_than_s: Only files untouched for this long; younger ones may belong to
                a write still in progress in another process.

        Returns:
            How many files were removed.
        """
        return await asyncio.to_thread(_remove_stale, self._tmp, time.time() - older_than_s)

    # -- lifecycle --------------------------------------------------------------------

    async def ping(self) -> float:
        """Create and remove a probe file; see `BlobStore.ping`."""
        started = time.perf_counter()
        try:
            await asyncio.to_thread(_probe, self._tmp)
        except OSError as exc:
            raise BlobError(f"The blob directory {self.root} is not writable: {exc}") from exc
        return (time.perf_counter() - started) * 1000

    async def aclose(self) -> None:
        """Nothing to release: files are opened and closed per operation."""


class LocalStagedBlob:
    """A `StagedBlob` in a closed temporary file of `root/tmp/`."""

    def __init__(self, root: Path, writer: _TempFile, sha256: str, head: bytes) -> None:
        self._root = root
        self._writer = writer
        self.sha256 = sha256
        self.size = writer.size
        self.head = head

    def __repr__(self) -> str:
        return f"LocalStagedBlob({self.sha256!r}, size={self.size})"

    @property
    def stored(self) -> StoredBlob | None:
        """The published blob, or None; see `StagedBlob.stored`."""
        if self._writer.created is None:
            return None
        return StoredBlob(
            self.sha256,
            self.size,
            self.head,
            created=self._writer.created,
            stamp=self._writer.stamp,
        )

    async def publish(self) -> StoredBlob:
        """Link the file under its hash; see `StagedBlob.publish`."""
        if self.stored is None:
            try:
                await _in_thread(self._writer.publish, self._root)
            except BaseException:
                with contextlib.suppress(BlobError):
                    await _in_thread(self._writer.discard)
                raise
        stored = self.stored
        assert stored is not None  # published, or `publish` raised
        return stored

    async def discard(self) -> None:
        """Remove the temporary file; see `StagedBlob.discard`."""
        await _in_thread(self._writer.discard)


class _Stopped(Exception):
    """The caller gave up on the copy."""


class _TempFile:
    """A temporary file being filled and hashed; every method blocks."""

    def __init__(self, directory: Path, fsync: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, prefix="put-", suffix=".part")
        self.path = Path(name)
        self.size = 0
        self.created: bool | None = None  # once published: whether it was new there
        self.stamp = 0  # once published as new: its mtime then (ns), for `withdraw`
        self._fsync = fsync
        self._hash = hashlib.sha256()
        self._file: BinaryIO = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self._file.write(data)
        self.size += len(data)

    def finish(self) -> str:
        """Flush and close the file (to stable storage, with fsync); its SHA-256."""
        if not self._file.closed:
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
            self._file.close()
        return self._hash.hexdigest()

    def publish(self, root: Path) -> tuple[str, bool]:
        """Move the file under its hash; whether it was new there."""
        sha256 = self.finish()
        final = _blob_path(root, sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        stamp = os.stat(self.path).st_mtime_ns  # the link's too: one inode
        for _ in range(_PUBLISH_TRIES):
            try:
                # A hard link publishes atomically *and* fails if the blob exists, so
                # two writers of the same bytes agree on which one created it.
                os.link(self.path, final)
            except FileExistsError:
                if not _claim(final):
                    continue  # its creator withdrew it just now: publish ours
                created = False
            except OSError:
                # Filesystems without hard links: rename instead (still atomic; a racing
                # writer of the same bytes may then also report `created`).
                created = not final.exists()
                os.replace(self.path, final)
                self.stamp = stamp if created else 0
            else:
                created, self.stamp = True, stamp
            break
        else:
            raise BlobError(f"Cannot publish blob {sha256}: it keeps being withdrawn")
        self.created = created
        self.path.unlink(missing_ok=True)
        return sha256, created

    def discard(self) -> None:
        self._file.close()
        if self.created is None:  # once published, the name may be another writer's
            self.path.unlink(missing_ok=True)


def _blob_path(root: Path, sha256: str) -> Path:
    return root / sha256[:2] / sha256[2:4] / sha256


# Same bytes, one file, two owners' requests: the one that created the file may be
# refused and withdraw it while the other, which found it there, has yet to commit the
# row that refers to it. The finder marks the file by moving its modification time on
# (`_claim`). The creator moves the file aside first, then looks at the mark (`_withdraw`):
# a finder that came before the move has marked it, and it goes back; one that comes
# after finds no file and publishes its own copy. Either way the bytes stay.
_PUBLISH_TRIES = 10


def _claim(final: Path) -> bool:
    """Mark an existing blob as wanted by one more writer; False if it is gone."""
    try:
        found = os.stat(final)
        os.utime(final, ns=(found.st_atime_ns, found.st_mtime_ns + 1))
    except FileNotFoundError:
        return False
    except PermissionError:
        # Another OS user's file (processes of two users sharing the directory): it
        # cannot be marked, so a refused creator may still withdraw it, as before marks.
        pass
    return True


def _withdraw(final: Path, stamp: int, aside_dir: Path) -> bool:
    """Remove `final` unless its mark moved past `stamp`; whether it was removed."""
    aside = aside_dir / f"withdrawn-{uuid.uuid4().hex}.part"
    try:
        os.rename(final, aside)
    except FileNotFoundError:
        return False
    try:
        if os.stat(aside).st_mtime_ns == stamp:
            return True
        with contextlib.suppress(FileExistsError):  # published again meanwhile: as good
            os.link(aside, final)
        return False
    finally:
        aside.unlink(missing_ok=True)


def _list_shard(shard: Path) -> list[BlobFile]:
    found: list[BlobFile] = []
    try:
        directories = [entry for entry in os.scandir(shard) if entry.is_dir()]
    except FileNotFoundError:
        return found
    for directory in directories:
        try:
            entries = list(os.scandir(directory.path))
        except FileNotFoundError:
            continue
        for entry in entries:
            name = entry.name
            if not is_sha256(name) or (name[:2], name[2:4]) != (shard.name, directory.name):
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue
            found.append(BlobFile(name, stat.st_size, stat.st_mtime_ns))
    return found


def _join(chunks: list[bytes]) -> bytes:
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _probe(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix="ping-", suffix=".part")
    os.close(fd)
    os.unlink(name)


def _remove_stale(directory: Path, cutoff: float) -> int:
    removed = 0
    try:
        entries = list(directory.glob("*.part"))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.stat().st_mtime < cutoff:
                entry.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


async def _in_thread(fn: Callable[..., T], *args: object) -> T:
    """Run the file operation `fn` in a thread, turning `OSError` into `BlobError`.

    On cancellation, wait for the thread before re-raising: a thread cannot be
    interrupted, and the caller must not clean up a temporary file while a write to it
    is still running.
    """
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller sees
        raise
    except OSError as exc:
        raise BlobError(f"Blob storage failed: {exc}") from exc
