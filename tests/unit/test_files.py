"""Type detection reads the bytes; filenames are made safe."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobgate.pipelines.files import MAX_FILENAME, sanitize_filename, sniff

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20


@pytest.mark.parametrize(
    ("head", "name", "expected"),
    [
        (PNG, "cat.txt", "image/png"),
        (b"%PDF-1.7\n", "doc.txt", "application/pdf"),
        (b"PK\x03\x04rest", "notes.txt", "application/zip"),
        (b"\x7fELF\x02\x01", "run.txt", "application/x-executable"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "a.mp3", "audio/wav"),
        (b"ID3\x03\x00", "song", "audio/mpeg"),
        (b"fLaC\x00", "x", "audio/flac"),
        (b"hello world\n", "a.txt", "text/plain"),
        (b"a,b\n1,2\n", "t.csv", "text/csv"),
        (b"# title\n", "r.md", "text/markdown"),
        (b"caf\xe9 latin-1 text\n", "a.txt", "text/plain"),
        (b"<html><script>x</script>", "a.txt", "text/html"),
        (b'<svg xmlns="http://www.w3.org/2000/svg">', "a.txt", "image/svg+xml"),
        (b"bin\x00ary", "a.txt", "application/octet-stream"),
        (b"", "empty.txt", "text/plain"),
    ],
)
def test_sniff_trusts_bytes_over_names(head: bytes, name: str, expected: str) -> None:
    assert sniff(head, name) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("/abs/path.txt", "path.txt"),
        ("a\x00.png", "a.png"),
        ("evil\u202egnp.txt", "evilgnp.txt"),
        (".", "file"),
        ("..", "file"),
        ("", "file"),
        (None, "file"),
        (".hidden", "hidden"),
    ],
)
def test_sanitize_filename(raw: str | None, expected: str) -> None:
    assert sanitize_filename(raw) == expected


def test_long_names_are_capped_keeping_the_suffix() -> None:
    name = sanitize_filename("x" * 10_000 + ".txt")
    assert len(name) == MAX_FILENAME
    assert name.endswith(".txt")


@given(st.text())
def test_sanitized_names_are_always_plain(raw: str) -> None:
    name = sanitize_filename(raw)
    assert name
    assert "/" not in name
    assert "\\" not in name
    assert "\x00" not in name
    assert not name.startswith(".")
    assert len(name) <= MAX_FILENAME
