"""Input files: the upload rule a pipeline declares, and type detection from the bytes."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SNIFF_BYTES = 8192

# (offset, magic, mime). Longer, more specific signatures come first.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"%PDF-", "application/pdf"),
    (0, b"PK\x03\x04", "application/zip"),
    (0, b"PK\x05\x06", "application/zip"),
    (0, b"\x1f\x8b", "application/gzip"),
    (0, b"\x7fELF", "application/x-executable"),
    (0, b"\x1aE\xdf\xa3", "video/webm"),
    (0, b"\x00\x00\x01\x00", "image/x-icon"),
    (0, b"\x93NUMPY", "application/x-npy"),
    (0, b"SQLite format 3\x00", "application/vnd.sqlite3"),
)
# Magic bytes that plain text may start with too ("BMW,Audi" in a CSV, "MZ Corp", "ID3
# tags are..."): they name a binary format only when the bytes are not text.
_WEAK_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"MZ", "application/x-msdownload"),
    (b"ID3", "audio/mpeg"),
    (b"fLaC", "audio/flac"),
    (b"OggS", "audio/ogg"),
    (b"BM", "image/bmp"),
    (b"PAR1", "application/vnd.apache.parquet"),
)
_TEXT_BY_SUFFIX = {
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".csv": "text/csv",
    ".tsv": "text/tab-separated-values",
    ".json": "application/json",
    ".jsonl": "application/x-ndjson",
    ".html": "text/html",
    ".htm": "text/html",
    ".svg": "image/svg+xml",
    ".xml": "application/xml",
}
_CONTROL = set(range(0, 32)) - {8, 9, 10, 11, 12, 13, 27}
_BOM = b"\xef\xbb\xbf"


def sniff(head: bytes, filename: str = "") -> str:
    """The MIME type of a file from its first bytes; the name refines text types only.

    Binary formats are recognised by their magic bytes, whatever the name says. Bytes
    with no NUL and few control characters are text; a text file's name may then
    narrow it (`.csv` is `text/csv`), never turn it into a binary type.
    """
    for offset, magic, mime in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return mime
    binary = b"\x00" in head or sum(b in _CONTROL for b in head) > len(head) // 100
    if binary:
        for magic, mime in _WEAK_SIGNATURES:
            if head.startswith(magic):
                return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        return "audio/mp4" if head[8:11] == b"M4A" else "video/mp4"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "audio/mpeg"
    if not head:
        return "text/plain"
    if binary:
        return "application/octet-stream"
    stripped = head.removeprefix(_BOM).lstrip()[:256].lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<script")):
        return "text/html"
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in head):
        return "image/svg+xml"
    return by_name("text/plain", filename)


def by_name(mime: str, filename: str) -> str:
    """`mime`, or for plain text the narrower type the file's name gives (`.csv`:
    `text/csv`), as `sniff` does: `sniff(head, name) == by_name(sniff(head), name)`."""
    if mime != "text/plain":
        return mime
    return _TEXT_BY_SUFFIX.get(Path(filename).suffix.lower(), "text/plain")


# C0 and C1 controls, line and paragraph separators, and every bidi control (marks,
# embeddings, overrides, isolates).
_UNSAFE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)
MAX_FILENAME = 255


def sanitize_filename(raw: str | None) -> str:
    """A display name safe to store and show: no directories, controls or bidi tricks."""
    name = unicodedata.normalize("NFC", raw or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE.sub("", name).strip().lstrip(".")
    if len(name) > MAX_FILENAME:
        _stem, dot, suffix = name.rpartition(".")
        keep = suffix if dot and len(suffix) <= 16 else ""
        name = (name[: MAX_FILENAME - len(keep) - 1] + "." + keep) if keep else name[:MAX_FILENAME]
    return name or "file"


@dataclass(frozen=True)
class FileRule:
    """Which files a pipeline accepts.

    Args:
        types: accepted MIME types, detected from the bytes (`text/*` style wildcards work).
        max_bytes: the largest single file.
        min_count: the fewest files a job needs.
        max_count: the most files a job takes.
    """

    types: Sequence[str] = ()
    max_bytes: int = 10_000_000
    min_count: int = 0
    max_count: int = 20

    def accepts(self, mime: str) -> bool:
        """Whether a detected MIME type is allowed (no `types` allows any)."""
        if not self.types:
            return True
        return any(mime == t or (t.endswith("/*") and mime.startswith(t[:-1])) for t in self.types)

    def describe(self) -> dict[str, Any]:
        return {
            "types": list(self.types),
            "max_bytes": self.max_bytes,
            "min_count": self.min_count,
            "max_count": self.max_count,
        }


@dataclass(frozen=True)
class InputFile:
    """A file of the job, as stage code sees it."""

    name: str
    sha256: str
    size: int
    content_type: str
    path: Path

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def read_text(self, encoding: str = "utf-8") -> str:
        """The file decoded strictly: invalid bytes raise `UnicodeDecodeError`."""
        return self.path.read_bytes().decode(encoding)

    def open(self) -> IO[bytes]:
        return self.path.open("rb")


@dataclass(frozen=True)
class FilesSummary:
    """What a cost estimate sees of the job's files."""

    items: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    @property
    def count(self) -> int:
        return len(self.items)

    @property
    def total_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.items)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)
