"""The PostgreSQL bus: `NOTIFY` and `LISTEN` on one dedicated connection per process."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import asyncpg
import structlog

from jobgate.bus.base import Changes, Listener, Listeners, decode, encode, merge, origin_of
from jobgate.transport.wakeups import asyncpg_dsn

log = structlog.get_logger("jobgate.bus")

CHANNEL = "jobgate_events"
_NOTIFY = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p"


class PostgresBus:
    """Sends what `publish` gathered in one `pg_notify` statement per round trip, and,
    with listeners, `LISTEN`s on the same connection.

    Publishing never waits: changes gather while a statement is under way, so a busy
    process sends fewer, fuller notifications. This process's own listeners get its
    changes at once, not after the server's echo, which they then skip. The connection
    comes back by itself after the server restarts; listeners are then told that
    anything may have changed (None), since notifications sent meanwhile are lost.
    Changes published while the server is away are sent once it is back.
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
            await asyncio.wait_for(self._connected.wait(), timeout=5)

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
                conn = await asyncpg.connect(
                    self._dsn, timeout=5, server_settings={"application_name": "jobgate-bus"}
                )
                conn.add_termination_listener(lambda _conn: self._kick.set())
                if self._listeners:
                    await conn.add_listener(self._channel, self._notified)
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
                    await conn.execute(_NOTIFY, self._channel, encode(pending, self._origin))
            except BaseException:
                merge(self._pending, pending)  # sent after the reconnect
                raise

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if origin_of(payload) != self._origin:  # this process's own went out at once
            self._listeners(decode(payload))
