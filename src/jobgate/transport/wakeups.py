"""PostgreSQL `LISTEN/NOTIFY` wake-ups for workers on the database transport.

The store calls `tasks.notify_ready(conn)` in each transaction that makes tasks ready;
PostgreSQL delivers the notification when (and only if) that transaction commits, so a
worker is never woken for a task it cannot yet see. Notifications carry nothing: a lost
one only delays a claim until the worker's next poll, never loses a task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog
from sqlalchemy.engine import make_url

from jobgate.store.repositories.tasks import CHANNEL

log = structlog.get_logger("jobgate.transport")


def asyncpg_dsn(url: str) -> str:
    """The plain `postgresql://` DSN asyncpg takes, from a SQLAlchemy URL."""
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


class PostgresWakeups:
    """One dedicated connection that LISTENs and calls `on_wake` for each notification.

    It reconnects by itself (with backoff) after the server restarts, and calls
    `on_wake` after every reconnect, since notifications sent meanwhile are lost.
    """

    def __init__(self, url: str, on_wake: Callable[[], None]) -> None:
        self._dsn = asyncpg_dsn(url)
        self._on_wake = on_wake
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    async def start(self) -> None:
        """Start listening; returns once the first connection listens (or 5 s passed)."""
        self._task = asyncio.create_task(self._run(), name="jobgate-wakeups")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout=5)

    @property
    def listening(self) -> bool:
        """Whether notifications are being received right now."""
        return self._connected.is_set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        delay = 0.1
        while True:
            conn: Any = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=5)
                lost = asyncio.Event()
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(CHANNEL, self._notified)
                self._connected.set()
                delay = 0.1
                self._on_wake()  # anything committed while we were not listening
                await lost.wait()
                self._connected.clear()
                log.warning("wakeups_connection_lost")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("wakeups_connect_failed", error=type(exc).__name__, retry_in_s=delay)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=2)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _notified(self, *_args: Any) -> None:
        self._on_wake()


def _setter(event: asyncio.Event) -> Callable[[Any], None]:
    return lambda _conn: event.set()
