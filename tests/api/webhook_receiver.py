"""A webhook receiver for tests: a real HTTP/1.1 server on loopback that records what
it is sent and answers as told, and a Standard Webhooks verifier written from the spec.

`Receiver.plan(...)` queues how the next requests are answered, one behaviour each:
`"ok"` (200), a status code (`500`, `410`, ...), `"reset"` (the connection is reset),
`"stall"` (no answer until the client gives up), or `("redirect", url)` (302). With
nothing planned, requests get 200.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import socket
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any

Behaviour = str | int | tuple[str, str]


@dataclass
class Received:
    """One request as it arrived."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    answered: Behaviour = "ok"


@dataclass
class Receiver:
    """Start with `async with Receiver() as receiver:`; `url` is where it listens."""

    requests: list[Received] = field(default_factory=list)
    _plans: deque[Behaviour] = field(default_factory=deque)
    _server: asyncio.Server | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    delay_s: float = 0.0  # how long a slow receiver takes to answer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def plan(self, *behaviours: Behaviour) -> None:
        """Answer the next requests like this, in order (then 200)."""
        self._plans.extend(behaviours)

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._release.set()
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """The requests once at least `count` have arrived (fails after `timeout`)."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return list(self.requests)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            writer.close()
            return
        behaviour = self._plans.popleft() if self._plans else "ok"
        async with self._arrived:
            self.requests.append(Received(method, path, headers, body, behaviour))
            self._arrived.notify_all()
        try:
            await self._answer(behaviour, reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(
        self, behaviour: Behaviour, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if behaviour == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        if behaviour == "stall":
            # Until the client hangs up (its timeout) or the receiver closes.
            closed = asyncio.ensure_future(reader.read())
            released = asyncio.ensure_future(self._release.wait())
            await asyncio.wait([closed, released], return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            released.cancel()
            return
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        extra = ""
        if isinstance(behaviour, tuple):
            status, extra = 302, f"Location: {behaviour[1]}\r\n"
        else:
            status = 200 if behaviour == "ok" else int(behaviour)
        head = f"HTTP/1.1 {status} X\r\n{extra}Content-Length: 2\r\nConnection: close\r\n"
        writer.write(head.encode() + b"\r\nok")
        await writer.drain()


def verify(secret: str, headers: dict[str, str], body: bytes) -> list[int]:
    """Which signatures of `webhook-signature` (by position) are right for `secret`.

    Written from the Standard Webhooks spec, independently of jobgate's signer: the
    content is `{webhook-id}.{webhook-timestamp}.{body}`, the key the base64 after
    `whsec_`, each signature `v1,` + base64(HMAC-SHA256).
    """
    assert secret.startswith("whsec_")
    key = base64.b64decode(secret[len("whsec_") :])
    content = b"%s.%s.%s" % (
        headers["webhook-id"].encode(),
        headers["webhook-timestamp"].encode(),
        body,
    )
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest())
    matches = []
    for position, signature in enumerate(headers["webhook-signature"].split(" ")):
        version, _, value = signature.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            matches.append(position)
    return matches


class Clock:
    """A clock that stays put until moved."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
