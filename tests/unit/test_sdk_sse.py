"""The SDK's SSE decoder: the WHATWG event-stream rules, on chunks split anywhere."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobgate.client import ServerSentEvent, SSEDecoder


def decode(*chunks: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


@dataclass
class Block:
    """An event as written on the wire (a model to compare the decoder with)."""

    event: str | None
    data: list[str]
    id: str | None
    retry: int | None
    comment: str | None


text = st.text(st.characters(exclude_characters="\r\n\0", codec="utf-8"), max_size=12)
blocks = st.builds(
    Block,
    event=st.none()
    | st.text(st.characters(exclude_characters="\r\n: ", codec="utf-8"), min_size=1, max_size=8),
    data=st.lists(text, max_size=3),
    id=st.none() | text,
    retry=st.none() | st.integers(0, 10**6),
    comment=st.none() | text,
)
newlines = st.sampled_from(["\n", "\r", "\r\n"])


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[ServerSentEvent]]:
    """A stream of blocks with mixed line endings, and the events it must give."""
    wire: list[str] = []
    expected: list[ServerSentEvent] = []
    last_id = ""
    for block in draw(st.lists(blocks, max_size=6)):
        lines = []
        if block.comment is not None:
            lines.append(":" + block.comment)
        if block.id is not None:
            lines.append(f"id: {block.id}")
            last_id = block.id
        if block.event is not None:
            lines.append(f"event: {block.event}")
        if block.retry is not None:
            lines.append(f"retry: {block.retry}")
        lines += [f"data: {line}" for line in block.data]
        lines.append("")
        for line in lines:
            ending = draw(newlines)
            if not line and wire and wire[-1].endswith("\r") and ending.startswith("\n"):
                ending = "\r"  # "\r" then "\n" is one line break, not an empty line
            wire.append(line + ending)
        if block.data:
            expected.append(
                ServerSentEvent(
                    event=block.event or "message",
                    data="\n".join(block.data),
                    id=block.id,
                    last_event_id=last_id,
                    retry=block.retry,
                )
            )
    return "".join(wire).encode(), expected


@settings(max_examples=200)
@given(streams())
def test_a_stream_decodes_the_same_split_at_every_position(
    stream: tuple[bytes, list[ServerSentEvent]],
) -> None:
    """Whole, or cut in two at any byte (inside a character, between \\r and \\n), the
    events are exactly the model's."""
    wire, expected = stream
    assert decode(wire) == expected
    for cut in range(len(wire) + 1):
        assert decode(wire[:cut], wire[cut:]) == expected, cut


@given(streams(), st.lists(st.integers(0, 200), max_size=10))
def test_a_stream_decodes_the_same_in_many_chunks(
    stream: tuple[bytes, list[ServerSentEvent]], cuts: list[int]
) -> None:
    """Cut at many places at once (byte by byte included), the events do not change."""
    wire, expected = stream
    points = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    assert decode(*(wire[a:b] for a, b in itertools.pairwise(points))) == expected
    assert decode(*(wire[i : i + 1] for i in range(len(wire)))) == expected


def test_jobgate_frames() -> None:
    """The server's frames: an id'd event, then a heartbeat with no id of its own."""
    wire = b'id: 7\nevent: state\ndata: {"id": "j"}\n\nevent: heartbeat\ndata: {}\n\n'
    assert decode(wire) == [
        ServerSentEvent("state", '{"id": "j"}', "7", "7"),
        ServerSentEvent("heartbeat", "{}", None, "7"),
    ]


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"data: a\r\n\r\n", [ServerSentEvent(data="a")]),
        (b"data: a\r\rdata: b\r\r", [ServerSentEvent(data="a"), ServerSentEvent(data="b")]),
        (b"data:a\ndata\ndata:  c\n\n", [ServerSentEvent(data="a\n\n c")]),
        (b"\xef\xbb\xbfdata: bom\n\n", [ServerSentEvent(data="bom")]),
        (b": a comment\ndata: x\n: another\n\n", [ServerSentEvent(data="x")]),
        (b"event: e\n\ndata: x\n\n", [ServerSentEvent(data="x")]),
        (b"id: a\0b\ndata: x\n\n", [ServerSentEvent(data="x")]),
        (b"retry: 1.5\ndata: x\n\n", [ServerSentEvent(data="x")]),
        (b"unknown: field\ndata: x\n\n", [ServerSentEvent(data="x")]),
        (b"data: no blank line at the end\n", []),
        (b"data: caf\xc3\n\n", [ServerSentEvent(data="caf\ufffd")]),
    ],
    ids=[
        "crlf",
        "cr",
        "multi-line-data-and-no-space",
        "bom",
        "comments",
        "data-less-block-resets-type",
        "id-with-nul-ignored",
        "retry-not-digits-ignored",
        "unknown-field",
        "incomplete-event-dropped",
        "invalid-utf8-replaced",
    ],
)
def test_spec_cases(wire: bytes, expected: list[ServerSentEvent]) -> None:
    """Edge cases of the WHATWG rules, one per line."""
    assert decode(wire) == expected


def test_ids_and_retry_persist_on_the_decoder() -> None:
    """An id-only block moves `last_event_id` without an event; `retry` is remembered."""
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 3\nretry: 250\n\n") == []
    assert (decoder.last_event_id, decoder.retry) == ("3", 250)
    assert decoder.feed(b"data: x\n\n") == [ServerSentEvent(data="x", last_event_id="3")]
    decoder.feed(b"id\n\n")
    assert decoder.last_event_id == ""


def test_cr_at_the_end_of_a_chunk_dispatches_without_waiting() -> None:
    """`\\r\\r` completes an event at once; a `\\n` arriving next is not another line."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r\r") == [ServerSentEvent(data="x")]
    assert decoder.feed(b"\ndata: y\n\n") == [ServerSentEvent(data="y")]


def test_the_sdk_exports_what_it_lists() -> None:
    """Every name in `jobgate.client.__all__` exists, and nothing private is listed."""
    import jobgate.client

    assert all(hasattr(jobgate.client, name) for name in jobgate.client.__all__)
    assert not [name for name in jobgate.client.__all__ if name.startswith("_")]
    assert {"Client", "AsyncClient", "ProblemError", "Event", "Job"} <= set(jobgate.client.__all__)
