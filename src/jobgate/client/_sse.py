"""A server-sent events decoder, per the WHATWG HTML "event stream" rules; no I/O.

Feed it bytes as they arrive, in chunks split anywhere (inside a UTF-8 character, between
`\\r` and `\\n`), and it returns each event once its closing blank line is in.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event.

    Args:
        event: the `event:` field, `"message"` when absent.
        data: the `data:` lines joined by `\\n`.
        id: the `id:` field of this very event, or None if it had none.
        last_event_id: the stream's last event id when it was dispatched (ids persist).
        retry: the reconnection time in ms, if this event's block set one.
    """

    event: str = "message"
    data: str = ""
    id: str | None = None
    last_event_id: str = ""
    retry: int | None = None


class SSEDecoder:
    """Turns the bytes of a `text/event-stream` into `ServerSentEvent`s."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._started = False
        self._skip_lf = False
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._retry: int | None = None
        self.last_event_id = ""
        """The id a reconnection sends as `Last-Event-ID` (set by `id:`, kept across events)."""
        self.dispatched_id = ""
        """`last_event_id` as of the last block ended, an event or an `id:` alone (a
        block not yet ended, whose event the caller has not had, does not count)."""
        self.retry: int | None = None
        """The latest reconnection time the server asked for, in milliseconds."""

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """The events completed by `chunk`."""
        text = self._decoder.decode(chunk)
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._skip_lf and text:
            self._skip_lf = False
            text = text.removeprefix("\n")
        self._text += text
        events: list[ServerSentEvent] = []
        start = 0
        buffer = self._text
        while True:
            cr = buffer.find("\r", start)
            lf = buffer.find("\n", start)
            if cr < 0 and lf < 0:
                break
            if cr < 0 or (0 <= lf < cr):
                end, after = lf, lf + 1
            elif cr + 1 < len(buffer):
                end, after = cr, cr + 2 if buffer[cr + 1] == "\n" else cr + 1
            else:
                # A `\r` at the end of what we have: the line is over, but a `\n` may
                # follow in the next chunk and belongs to this same line break.
                end, after = cr, cr + 1
                self._skip_lf = True
            event = self._line(buffer[start:end])
            if event is not None:
                events.append(event)
            start = after
        self._text = buffer[start:]
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self._id = value
                self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = self.retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        event_id, retry = self._id, self._retry
        self._id = self._retry = None
        self.dispatched_id = self.last_event_id
        if not self._data:
            self._event = ""
            return None
        event = ServerSentEvent(
            event=self._event or "message",
            data="\n".join(self._data),
            id=event_id,
            last_event_id=self.last_event_id,
            retry=retry,
        )
        self._event, self._data = "", []
        return event
