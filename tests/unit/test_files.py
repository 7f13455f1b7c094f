"""Type detection reads the bytes; filenames are made safe."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobgate.pipelines.files import MAX_FILENAME, by_name, sanitize_filename, sniff

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
        # Text that begins as a binary format's magic does is still text (regression:
        # a CSV of car makers was image/bmp, and refused by a text pipeline).
        (b"BMW,Audi,VW\n1,2,3\n", "cars.csv", "text/csv"),
        (b"BMI report\n", "a.txt", "text/plain"),
        (b"MZ Corp annual report\n", "a.txt", "text/plain"),
        (b"ID3 tags are metadata\n", "a.txt", "text/plain"),
        (b"OggS is a container\n", "a.txt", "text/plain"),
        (b"fLaC and PAR1\n", "a.txt", "text/plain"),
        (b"BM\x36\x00\x0c\x00\x00\x00\x00\x00\x36\x00\x00\x00\x28\x00", "a.txt", "image/bmp"),
        (b"MZ\x90\x00\x03\x00\x00\x00\x04\x00", "a.txt", "application/x-msdownload"),
        (b"OggS\x00\x02\x00\x00", "a.txt", "audio/ogg"),
        (b"\xef\xbb\xbf<!DOCTYPE html><p>x", "a.txt", "text/html"),  # after a UTF-8 BOM
        (b"one\x0btwo\n", "a.txt", "text/plain"),  # a vertical tab is text
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
        ("a\u009b31mb\u0090.txt", "a31mb.txt"),  # C1 controls (CSI, DCS)
        ("x\u0080\u009f.txt", "x.txt"),
        ("a\u061cb.txt", "ab.txt"),  # the Arabic letter mark, a bidi control
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
    assert not any(unicodedata.category(c) == "Cc" for c in name)
    assert not any(unicodedata.bidirectional(c) in _BIDI_CONTROLS for c in name)


_BIDI_CONTROLS = {"LRE", "RLE", "PDF", "LRO", "RLO", "LRI", "RLI", "FSI", "PDI"}


@pytest.mark.parametrize(
    ("head", "name"),
    [(b"plain words\n", "a.csv"), (b"plain", "b.json"), (PNG, "c.csv"), (b"<html>", "d.txt")],
)
def test_the_type_of_the_bytes_narrowed_by_a_name_is_the_sniffed_type(
    head: bytes, name: str
) -> None:
    """A blob's row keeps the bytes' own type; each job's name for it narrows that."""
    assert by_name(sniff(head), name) == sniff(head, name)
