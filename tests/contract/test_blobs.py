"""The `BlobStore` contract, run against every backend."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import pytest

from jobgate.blobs import (
    HEAD_BYTES,
    BlobError,
    BlobStore,
    InvalidDigest,
    discard,
    is_sha256,
    local,
    open_blob_store,
)
from jobgate.blobs.local import CHUNK_BYTES, LocalBlobStore
from jobgate.errors import FileTooLarge

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@pytest.fixture(params=[pytest.param("local", id="local")])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    """An empty store of each backend."""
    backend: BlobStore = LocalBlobStore(tmp_path / "blobs")
    yield backend
    await backend.aclose()


def leftovers(store: BlobStore) -> list[Path]:
    """Temporary files still in the store (local backend)."""
    assert isinstance(store, LocalBlobStore)
    tmp = store.root / "tmp"
    return sorted(tmp.iterdir()) if tmp.exists() else []


def stored_files(store: BlobStore) -> list[Path]:
    assert isinstance(store, LocalBlobStore)
    return sorted(
        path
        for path in store.root.rglob("*")
        if path.is_file() and path.relative_to(store.root).parts[0] != "tmp"
    )


async def stream(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


# -- writing ----------------------------------------------------------------------------


async def test_put_stream_hashes_and_measures_the_bytes(store: BlobStore) -> None:
    """The blob is named by the SHA-256 of all chunks, in order, and keeps their size."""
    chunks = [b"a" * 1000, b"", b"b" * 70_000, b"c"]
    data = b"".join(chunks)

    blob = await store.put_stream(stream(chunks))

    assert hashlib.sha256(data).hexdigest() == blob.sha256
    assert len(data) == blob.size
    assert data[:HEAD_BYTES] == blob.head
    assert blob.created
    assert await store.exists(blob.sha256)


async def test_stored_bytes_read_back_identical(store: BlobStore) -> None:
    """A stream longer than one write batch is stored byte for byte."""
    data = bytes(range(256)) * (3 * CHUNK_BYTES // 256 + 17)
    chunks = [data[i : i + 65_536] for i in range(0, len(data), 65_536)]

    blob = await store.put_stream(stream(chunks))

    path = store.local_path(blob.sha256)
    assert path is not None
    assert data == path.read_bytes()
    assert leftovers(store) == []


async def test_head_is_whole_content_when_short(store: BlobStore) -> None:
    """`head` holds the first 8192 bytes, or everything if there are fewer."""
    short = await store.put_bytes(b"%PDF-1.7 tiny")
    long = await store.put_stream(stream([b"x" * 5000, b"y" * 5000]))

    assert short.head == b"%PDF-1.7 tiny"
    assert long.head == b"x" * 5000 + b"y" * (HEAD_BYTES - 5000)


async def test_empty_stream_is_a_blob(store: BlobStore) -> None:
    """Zero bytes are a valid blob, named by the hash of nothing."""
    blob = await store.put_stream(stream([]))

    assert (blob.sha256, blob.size, blob.head) == (EMPTY_SHA256, 0, b"")


async def test_same_bytes_are_stored_once(store: BlobStore) -> None:
    """A second write of the same bytes reuses the blob and says it did not create it."""
    first = await store.put_bytes(b"same bytes")
    second = await store.put_stream(stream([b"same ", b"bytes"]))

    assert first.sha256 == second.sha256
    assert (first.created, second.created) == (True, False)
    assert len(stored_files(store)) == 1
    assert leftovers(store) == []


async def test_concurrent_writers_of_same_bytes_agree_on_the_creator(store: BlobStore) -> None:
    """Racing writers of the same bytes: exactly one reports having created the blob."""
    blobs = await asyncio.gather(*(store.put_bytes(b"race" * 10_000) for _ in range(8)))

    assert sum(blob.created for blob in blobs) == 1
    assert len({blob.sha256 for blob in blobs}) == 1
    assert leftovers(store) == []


async def test_put_file_matches_put_bytes(store: BlobStore, tmp_path: Path) -> None:
    """Copying a file gives the same blob as writing its bytes."""
    source = tmp_path / "input.bin"
    source.write_bytes(b"file content " * 100_000)

    from_file = await store.put_file(source)

    assert hashlib.sha256(source.read_bytes()).hexdigest() == from_file.sha256
    assert source.stat().st_size == from_file.size
    assert source.read_bytes()[:HEAD_BYTES] == from_file.head
    assert source.exists()
    assert (await store.put_bytes(source.read_bytes())).sha256 == from_file.sha256


async def test_put_file_of_a_missing_file_is_a_blob_error(store: BlobStore, tmp_path: Path) -> None:
    """An unreadable source raises `BlobError`, not `OSError`, and leaves nothing."""
    with pytest.raises(BlobError):
        await store.put_file(tmp_path / "missing.bin")

    assert leftovers(store) == []


# -- refusals and failures leave nothing ------------------------------------------------


async def test_max_bytes_allows_exactly_the_limit(store: BlobStore) -> None:
    """A stream of exactly `max_bytes` bytes is accepted."""
    blob = await store.put_stream(stream([b"12345", b"67890"]), max_bytes=10)

    assert blob.size == 10


async def test_max_bytes_stops_the_stream_and_leaves_nothing(store: BlobStore) -> None:
    """Past `max_bytes`, the write stops at once: FileTooLarge, no blob, no temp file."""
    consumed: list[int] = []

    async def endless() -> AsyncIterator[bytes]:
        for index in range(1_000):
            consumed.append(index)
            yield b"z" * 4096

    with pytest.raises(FileTooLarge):
        await store.put_stream(endless(), max_bytes=10_000)

    assert len(consumed) == 3
    assert leftovers(store) == []
    assert stored_files(store) == []


async def test_failing_stream_leaves_nothing(store: BlobStore) -> None:
    """An error raised by the source propagates unchanged and removes the temp file."""

    async def broken() -> AsyncIterator[bytes]:
        yield b"partial upload" * 100_000
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.put_stream(broken())

    assert leftovers(store) == []
    assert stored_files(store) == []


async def test_cancelled_stream_leaves_nothing(store: BlobStore) -> None:
    """Cancelling a write mid-stream removes its temp file before the task ends."""
    started = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"first chunk" * 200_000  # past one write batch, so a write is done
        started.set()
        await asyncio.Event().wait()
        yield b"never"

    task = asyncio.create_task(store.put_stream(stalled()))
    await started.wait()
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(store) == []
    assert stored_files(store) == []


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.01])
async def test_cancelled_put_file_leaves_nothing(
    store: BlobStore, tmp_path: Path, delay: float
) -> None:
    """Cancelling a file copy at any point leaves no temp file and no new blob."""
    source = tmp_path / "big.bin"
    source.write_bytes(b"q" * (8 * CHUNK_BYTES))

    task = asyncio.create_task(store.put_file(source))
    await asyncio.sleep(delay)
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(store) == []
    assert stored_files(store) == []


# -- names, deletion, lifecycle ---------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "../../etc/passwd",
        "0" * 63,
        "0" * 65,
        "A" * 64,
        "g" * 64,
        "/" + "0" * 63,
        "0" * 62 + "/.",
        "0" * 64 + "\n",
    ],
)
async def test_invalid_sha256_is_rejected_before_any_path(store: BlobStore, bad: str) -> None:
    """Anything but 64 lowercase hex characters is refused by every method."""
    assert not is_sha256(bad)
    with pytest.raises(InvalidDigest):
        store.local_path(bad)
    with pytest.raises(InvalidDigest):
        await store.exists(bad)
    with pytest.raises(InvalidDigest):
        await store.delete(bad)


async def test_invalid_digest_is_a_value_error() -> None:
    """Callers that only know `ValueError` still catch it."""
    assert issubclass(InvalidDigest, ValueError)
    assert issubclass(InvalidDigest, BlobError)


async def test_delete_is_idempotent(store: BlobStore) -> None:
    """Deleting removes the blob; deleting it again, or a never-stored one, is fine."""
    blob = await store.put_bytes(b"to be deleted")

    await store.delete(blob.sha256)
    await store.delete(blob.sha256)
    await store.delete(EMPTY_SHA256)

    assert not await store.exists(blob.sha256)


async def test_missing_blob_does_not_exist(store: BlobStore) -> None:
    """`exists` is False for a hash never stored."""
    assert not await store.exists(EMPTY_SHA256)


async def test_discard_removes_only_blobs_the_request_created(store: BlobStore) -> None:
    """A refused request removes what it wrote, never bytes that were already there."""
    existing = await store.put_bytes(b"someone else's file")
    again = await store.put_bytes(b"someone else's file")
    fresh = await store.put_bytes(b"only this request's file")

    await discard(store, again, fresh)

    assert await store.exists(existing.sha256)
    assert not await store.exists(fresh.sha256)


async def test_ping_reports_latency(store: BlobStore) -> None:
    """`ping` answers with a latency in milliseconds and leaves nothing."""
    latency = await store.ping()

    assert latency >= 0
    assert leftovers(store) == []


# -- the local backend ------------------------------------------------------------------


async def test_local_layout_is_two_levels_of_prefixes(tmp_path: Path) -> None:
    """Blobs live at `root/ab/cd/<sha256>`."""
    store = LocalBlobStore(tmp_path)

    blob = await store.put_bytes(b"layout")

    sha = blob.sha256
    assert tmp_path / sha[:2] / sha[2:4] / sha == store.local_path(sha)


async def test_ping_fails_on_an_unwritable_root(tmp_path: Path) -> None:
    """A root that cannot be written is a `BlobError` from `ping`."""
    (tmp_path / "file").write_text("not a directory")
    store = LocalBlobStore(tmp_path / "file")

    with pytest.raises(BlobError):
        await store.ping()


async def test_remove_stale_temp_files(tmp_path: Path) -> None:
    """Temp files left by a crash are removed once old enough, fresh ones are kept."""
    store = LocalBlobStore(tmp_path)
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "put-crashed.part").write_bytes(b"half")

    assert await store.remove_stale_temp_files(older_than_s=3600) == 0
    assert await store.remove_stale_temp_files(older_than_s=-1) == 1
    assert leftovers(store) == []


# -- choosing a backend by URL ----------------------------------------------------------


def test_open_blob_store_file_url(tmp_path: Path) -> None:
    """`file:///abs/path` opens a local store rooted there."""
    store = open_blob_store(tmp_path.as_uri())

    assert isinstance(store, LocalBlobStore)
    assert tmp_path == store.root


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("s3://bucket/prefix", "S3 blob storage is not available yet"),
        ("ftp://host/dir", "Unknown blob storage URL"),
        ("file://remote-host/dir", "local file"),
        ("file:relative/dir", "absolute"),
    ],
)
def test_open_blob_store_refuses_other_urls(url: str, match: str) -> None:
    """Unsupported or malformed URLs raise a `BlobError` that says why."""
    with pytest.raises(BlobError, match=match):
        open_blob_store(url)


def test_local_store_satisfies_the_protocol(tmp_path: Path) -> None:
    """`LocalBlobStore` is a `BlobStore`."""
    make: Callable[[Path], BlobStore] = LocalBlobStore
    assert isinstance(make(tmp_path), BlobStore)


async def test_a_staged_write_is_invisible_until_published(store: BlobStore) -> None:
    """`stage_stream` hashes the bytes but publishes nothing; `publish` does, once."""
    data = b"staged bytes\n" * 1000
    staged = await store.stage_stream(stream([data[:5000], data[5000:]]))
    assert (staged.sha256, staged.size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert staged.head == data[:HEAD_BYTES]
    assert staged.stored is None
    assert not await store.exists(staged.sha256)
    stored = await staged.publish()
    assert stored.created
    assert stored == staged.stored == await staged.publish()
    assert await store.exists(staged.sha256)
    await staged.discard()  # once published: nothing to remove
    assert await store.exists(staged.sha256)
    assert leftovers(store) == []


async def test_a_discarded_staged_write_leaves_nothing(store: BlobStore) -> None:
    staged = await store.stage_stream(stream([b"never published"]))
    await staged.discard()
    assert stored_files(store) == []
    assert leftovers(store) == []


async def test_discard_keeps_blobs_named_in_keep(store: BlobStore) -> None:
    kept = await store.put_bytes(b"a row refers to me")
    dropped = await store.put_bytes(b"nobody refers to me")
    await discard(store, kept, dropped, keep={kept.sha256})
    assert await store.exists(kept.sha256)
    assert not await store.exists(dropped.sha256)


# -- withdrawing what a refused request created ---------------------------------------
# The creator of a blob may be refused while another writer of the same bytes, which
# found the blob stored, has yet to commit the row that refers to it.


async def test_withdraw_removes_a_blob_nobody_else_wrote(store: BlobStore) -> None:
    blob = await store.put_bytes(b"only mine")
    assert await store.withdraw(blob)
    assert not await store.exists(blob.sha256)
    assert leftovers(store) == []


async def test_withdraw_keeps_a_blob_another_writer_found_stored(store: BlobStore) -> None:
    """The second writer found the bytes there (`created` False) and relies on them:
    the creator's withdraw leaves them (regression: it removed them, and the second
    writer's committed job had no input file)."""
    mine = await store.put_bytes(b"shared bytes")
    theirs = await store.put_bytes(b"shared bytes")
    assert mine.created
    assert not theirs.created
    assert not await store.withdraw(mine)
    assert await store.exists(mine.sha256)
    assert leftovers(store) == []


async def test_a_writer_after_a_withdraw_publishes_its_own_copy(store: BlobStore) -> None:
    mine = await store.put_bytes(b"gone, then back")
    assert await store.withdraw(mine)
    theirs = await store.put_bytes(b"gone, then back")
    assert theirs.created
    assert await store.exists(theirs.sha256)


async def test_a_writer_finding_the_blob_mid_withdraw_keeps_its_bytes(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other writer comes while the creator is withdrawing, between moving the file
    aside and checking it: its publish starts again and stores its own copy, and the
    creator's check finds the file unclaimed and removes only its moved copy."""
    assert isinstance(store, LocalBlobStore)
    mine = await store.put_bytes(b"raced bytes")
    theirs: list[bool] = []
    real_stat = local.os.stat

    def stat_then_publish(path: object, *args: object, **kwargs: object) -> object:
        if str(path).endswith(".part") and "withdrawn-" in str(path) and not theirs:
            # Between the creator's move and its check: a synchronous publish of the
            # other writer, in this thread (the withdraw runs in a worker thread).
            theirs.append(asyncio.run(store.put_bytes(b"raced bytes")).created)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(local.os, "stat", stat_then_publish)
    removed = await store.withdraw(mine)
    monkeypatch.undo()
    assert theirs == [True]
    assert removed
    assert store.local_path(mine.sha256).read_bytes() == b"raced bytes"
    assert leftovers(store) == []
