"""The PostgreSQL bus: `NOTIFY` and `LISTEN` on one dedicated connection per process."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import asyncpg
import structlog

from jobgate.bus.base import (
    ORIGIN_MARK,
    Changes,
    Listener,
    Listeners,
    decode,
    encode,
    merge,
    origin_of,
)
from jobgate.transport.wakeups import asyncpg_dsn

log = structlog.get_logger("jobgate.bus")

CHANNEL = "jobgate_events"
_NOTIFY = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p"
LISTENERS_TTL_S = 1.0
"""How long a bus trusts its last look at whether another process listens."""
# A listening bus's connection is named for its channel; a process that only sends (a
# worker) uses another name, as nobody needs to hear of it.
_SENDER_NAME = "jobgate-bus-send"
# Another listener of the channel, or a name that did not survive (a proxy rewrote it:
# then the others' names cannot be trusted either, so the bus sends as it always did).
_OTHER_LISTENERS = (
    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name = $1 AND pid <> pg_backend_pid()) OR NOT EXISTS (SELECT 1 "
    "FROM pg_stat_activity WHERE pid = pg_backend_pid() AND application_name = $2)"
)


def listener_name(channel: str) -> str:
    """The `application_name` of a bus connection that listens on `channel`."""
    return f"jobgate-bus:{channel}"[:63]  # PostgreSQL keeps 63 bytes of it


class PostgresBus:
    """Sends what `publish` gathered in one `pg_notify` statement per round trip, and,
    with listeners, `LISTEN`s on the same connection.

    Publishing never waits: changes gather while a statement is under way, so a busy
    process sends fewer, fuller notifications. This process's own listeners get its
    changes at once, not after the server's echo, which they then skip. The connection
    comes back by itself after the server restarts; listeners are then told that
    anything may have changed (None), since notifications sent meanwhile are lost.
    Changes published while the server is away are sent once it is back.

    Nothing is sent while no other process listens on the channel: a lone `serve`
    (its own streams hear its changes at once) would only make PostgreSQL echo them
    back. A bus looks at the server's connections for another listener at most once a
    `LISTENERS_TTL_S` while it has something to send, and a listener that connects
    says so on the channel, so the other listeners send to it from then on (a sender
    that does not listen, a worker, learns of it within `LISTENERS_TTL_S`). A bus whose
    own connection name did not survive (a proxy rewrote it) always sends.
    """

    def __init__(self, url: str, *, channel: str = CHANNEL) -> None:
        self._dsn = asyncpg_dsn(url)
        self._channel = channel
        self._listeners = Listeners()
        self._origin = uuid.uuid4().hex[:16]  # this process's mark on what it sends
        self._pending: dict[str, int] = {}
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        self._using = asyncio.Lock()  # one operation at a time on the connection
        self._connected = asyncio.Event()
        # Whether another process listens, and when that was last seen (0: look first).
        self._heard = False
        self._heard_at = 0.0
        self._name = _SENDER_NAME  # this connection's application_name

    def publish(self, changes: Changes) -> None:
        merge(self._pending, changes)
        self._kick.set()
        self._listeners.soon(changes)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.add(listener)

    async def start(self) -> None:
        """Connect; returns once connected, or after 5 s (it keeps trying meanwhile)."""
        self._task = asyncio.create_task(self._run(), name="jobgate-bus")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._connected.wait()

    async def ping(self) -> float:
        started = time.perf_counter()
        async with self._using:
            if self._conn is None or self._conn.is_closed():
                raise ConnectionError("the event bus is not connected to PostgreSQL")
            await self._conn.fetchval("SELECT 1")
        return (time.perf_counter() - started) * 1000

    async def aclose(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        delay = 0.1
        while True:
            conn: Any = None
            try:
                listening = bool(self._listeners)
                name = self._name = listener_name(self._channel) if listening else _SENDER_NAME
                conn = await asyncpg.connect(
                    self._dsn, timeout=5, server_settings={"application_name": name}
                )
                conn.add_termination_listener(lambda _conn: self._kick.set())
                self._heard_at = 0.0  # who listens may have changed while away
                if listening:
                    await conn.add_listener(self._channel, self._notified)
                    # Others that listen send to this process from now on.
                    await conn.execute(_NOTIFY, self._channel, [self._hello()])
                self._conn = conn
                self._connected.set()
                delay = 0.1
                if self._listeners:
                    self._listeners(None)  # whatever was announced while we were away
                await self._send(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("bus_connection_lost", backend="postgres", error=type(exc).__name__)
            finally:
                self._connected.clear()
                self._conn = None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=2)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _send(self, conn: Any) -> None:
        """Send pending changes as they come, until the connection is lost."""
        while True:
            await self._kick.wait()
            self._kick.clear()
            if conn.is_closed():
                raise ConnectionError("connection closed")
            if not self._pending:
                continue
            pending, self._pending = self._pending, {}
            try:
                async with self._using:
                    if await self._others_listen(conn):
                        await conn.execute(_NOTIFY, self._channel, encode(pending, self._origin))
            except BaseException:
                merge(self._pending, pending)  # sent after the reconnect
                raise

    async def _others_listen(self, conn: Any) -> bool:
        """Whether another process listens on the channel, as last seen, or looked up
        when that is older than `LISTENERS_TTL_S`."""
        at = time.monotonic()
        if at - self._heard_at >= LISTENERS_TTL_S:
            listeners = listener_name(self._channel)
            self._heard = bool(await conn.fetchval(_OTHER_LISTENERS, listeners, self._name))
            self._heard_at = at
        return self._heard

    def _hello(self) -> str:
        """A payload of no changes: "this process listens"."""
        return f"{ORIGIN_MARK}{self._origin}"

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if origin_of(payload) == self._origin:  # this process's own went out at once
            return
        self._heard, self._heard_at = True, time.monotonic()  # another process listens
        changes = decode(payload)
        if changes:
            self._listeners(changes)
