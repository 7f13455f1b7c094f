"""Files going up (multipart parts, streamed from disk) and coming down (atomic writes)."""

from __future__ import annotations

import hashlib
import mimetypes
import os
import secrets
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from jobgate.client._errors import DownloadError
from jobgate.client._models import Download, FileInfo

FileContent = bytes | IO[bytes]
FileInput = (
    str
    | os.PathLike[str]
    | bytes
    | tuple[str, FileContent]
    | tuple[str, FileContent, str | None]
    | FileInfo
)
"""A file to send: a path (streamed from disk), bytes, `(name, bytes or binary file[,
content_type])`, or a `FileInfo` already uploaded with `upload()` (sent by `sha256`)."""

Part = tuple[str, tuple[str, FileContent, str]]
OCTET_STREAM = "application/octet-stream"


def to_upload_first(files: Sequence[FileInput]) -> list[FileInput]:
    """The local files of a submit that mixes them with uploaded `FileInfo`s (none if
    it does not): a request is JSON or multipart, so these go up first, by `upload()`."""
    local: list[FileInput] = [f for f in files if not isinstance(f, FileInfo)]
    return local if local and len(local) < len(files) else []


def with_uploaded(files: Sequence[FileInput], uploaded: Sequence[FileInfo]) -> list[FileInput]:
    """`files` with each local one replaced by its upload, in their order (a map stage
    over the job's files numbers its items by it)."""
    replacements = iter(uploaded)
    return [f if isinstance(f, FileInfo) else next(replacements) for f in files]


def file_ref(info: FileInfo) -> dict[str, str]:
    """An uploaded file in a JSON submit: by `sha256`, keeping the name it was sent with."""
    return {"sha256": info.sha256, "name": info.name}


def open_parts(files: Sequence[FileInput], stack: ExitStack) -> list[Part]:
    """Multipart `files` parts; paths are opened in `stack` and streamed, never read whole.

    The server detects each file's type from its bytes (and the name, for text), so the
    content type sent is only a hint.
    """
    parts: list[Part] = []
    for index, item in enumerate(files):
        name: str
        content: FileContent
        kind: str | None
        if isinstance(item, FileInfo):
            raise TypeError("an uploaded FileInfo is sent by sha256, not as a part")
        if isinstance(item, bytes):
            name, content, kind = f"file{index + 1}", item, None
        elif isinstance(item, tuple):
            name, content = item[0], item[1]
            kind = item[2] if len(item) > 2 else None
        else:
            path = Path(item)
            name, kind = path.name, None
            content = stack.enter_context(path.open("rb"))
        kind = kind or mimetypes.guess_type(name)[0] or OCTET_STREAM
        parts.append(("files", (name, content, kind)))
    return parts


def target_path(path: str | os.PathLike[str] | None, filename: str) -> Path:
    """Where a download goes: `path`, or `filename` inside `path` if it is a directory
    (one that exists, or any path ending in a separator: `out/` is made if need be)."""
    name = Path(filename).name
    if name in ("", ".", ".."):
        name = "download"
    if path is None:
        return Path.cwd() / name
    target = Path(path)
    as_dir = os.fspath(path).endswith(tuple(filter(None, (os.sep, os.altsep))))
    return target / name if as_dir or target.is_dir() else target


def _create_temp(target: Path) -> tuple[Path, int]:
    """A new temporary file next to `target`, made as any new file is: its mode is what
    the umask leaves of 0666 (`mkstemp` would make it 0600, and the rename keep that)."""
    while True:
        # Not named after the target: a 255-byte name plus a suffix is too long.
        temp = target.with_name(f".jobgate-download-{secrets.token_hex(6)}.part")
        try:
            return temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


class AtomicFile:
    """A download in progress: a temporary file next to the target, renamed when complete.

    The size and SHA-256 the server announced are checked before the rename, so the
    target is either absent (or as it was) or the whole, right file.
    """

    def __init__(self, target: Path, expected: Download | None = None) -> None:
        self.target = target
        self._expected = expected
        self._hash = hashlib.sha256()
        self.size = 0
        target.parent.mkdir(parents=True, exist_ok=True)
        self._temp, fd = _create_temp(target)
        self._file: IO[bytes] = os.fdopen(fd, "wb")

    @property
    def sha256(self) -> str:
        """The hex SHA-256 of what was written so far."""
        return self._hash.hexdigest()

    def write(self, chunk: bytes) -> None:
        """Append a chunk."""
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def commit(self) -> Path:
        """Check, flush to disk and move into place; the target path."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            expected = self._expected
            if expected is not None and (expected.size, expected.sha256) != (
                self.size,
                self.sha256,
            ):
                raise DownloadError(
                    f"{expected.filename}: got {self.size} bytes (sha256 {self.sha256}), "
                    f"expected {expected.size} bytes (sha256 {expected.sha256})"
                )
            os.replace(self._temp, self.target)
        except BaseException:
            self.abort()
            raise
        return self.target

    def abort(self) -> None:
        """Drop the temporary file."""
        self._file.close()
        self._temp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._file.closed:
            self.abort()
