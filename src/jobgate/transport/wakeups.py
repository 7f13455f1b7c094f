"""PostgreSQL `LISTEN/NOTIFY` wake-ups for workers, and the election of one sweeper.

The store calls `tasks.notify_ready(conn)` in each transaction that makes tasks ready;
PostgreSQL delivers the notification when (and only if) that transaction commits, so a
worker is never woken for a task it cannot yet see. Notifications carry nothing: a lost
one only delays a claim until the worker's next poll, never loses a task.

The same dedicated connection does two more jobs (docs/liveness.md):

- It names its worker (`application_name`), so `pg_stat_activity` shows the worker
  alive exactly as long as its process holds the connection: a SIGKILLed worker's
  backend ends at once.
- It takes part in electing the leader, the one worker that sweeps: the holder of a
  session-level advisory lock, freed the moment its connection closes.

While tasks exist, the leader notifies `LEADER_CHANNEL` with every other check (the
beacon); followers that miss it for long enough try to take the lock over. With no task
at all the leader says "idle" once and falls silent, and followers wait for a
notification that tasks are ready before they expect beacons again. So no follower
sends a statement while a leader lives, and an idle fleet sends no beacon: every
notification costs each listening connection of the database a transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog
from sqlalchemy import Select, and_, case, func, literal, not_, select
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from jobgate.store.repositories.tasks import CHANNEL
from jobgate.store.repositories.workers import application_name
from jobgate.store.tables import tasks
from jobgate.waits import wait_at_most

log = structlog.get_logger("jobgate.transport")

LEADER_CHANNEL = "jobgate_leader"
LEADER_LOCK = 0x6A6F62676C656164  # "jobglead": an advisory-lock key of jobgate's own
# pg_locks shows a bigint advisory key as its high and low 32 bits (objsubid 1).
_LOCK_HIGH, _LOCK_LOW = LEADER_LOCK >> 32, LEADER_LOCK & 0xFFFFFFFF
_ASK_LEADER = "SELECT pg_notify($1, $2)"
_DEPOSE = (
    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 1"
    " AND granted AND pid <> pg_backend_pid()"
)
_IDLE = "idle"
_RESIGN = "resign"
_ASK = "ask"  # a follower heard nothing while tasks exist: the leader beacons at once
# How long followers of an idle leader wait before they make sure it still lives. Only
# a race (the leader dies as work arrives) needs it: work itself makes them expect it.
_IDLE_PATIENCE_S = 300.0
EXPECTED_MAX = 1024
"""Expected notifications (`PostgresWakeups.expect`) kept, at most."""
_DIALECT = asyncpg_dialect.dialect()  # type: ignore[no-untyped-call]  # untyped in SQLAlchemy


def asyncpg_dsn(url: str) -> str:
    """The plain `postgresql://` DSN asyncpg takes, from a SQLAlchemy URL."""
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


class PostgresWakeups:
    """One dedicated connection that LISTENs and calls `on_wake` for each notification.

    It reconnects by itself (with backoff) after the server restarts, and calls
    `on_wake` after every reconnect, since notifications sent meanwhile are lost.

    Args:
        url: the store's URL.
        on_wake: called for every notification that tasks are ready.
        worker_id: names the connection after this worker (`application_name`).
        elect: take part in electing the leader.
        check_s: how often a leader checks while tasks exist; it beacons every other
            check, and followers try to take over after `beacon_patience_s` without one.
        depose_after_s: how long a leader may stay silent while tasks exist, its lock
            still held, before a follower ends its session and takes over (a leader
            whose process hangs or was stopped keeps its connection, and its lock).
    """

    def __init__(
        self,
        url: str,
        on_wake: Callable[[], None],
        *,
        worker_id: str | None = None,
        elect: bool = False,
        check_s: float = 2.0,
        depose_after_s: float = 15.0,
    ) -> None:
        self._dsn = asyncpg_dsn(url)
        self._depose_after_s = depose_after_s
        self._on_wake = on_wake
        self._name = application_name(worker_id) if worker_id is not None else None
        self._elect = elect
        self._check_s = check_s
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._conn: Any = None
        self._using = asyncio.Lock()  # one operation at a time on the connection
        self._leader = False
        self._named = False
        # As leader: when the next beacon is due, and whether followers may be waiting
        # for one (it said "busy" last, or tasks were announced since it said "idle").
        self._beacon_due = 0.0
        self._followers_expect = True
        # As follower: the loop time by which it expects a beacon.
        self._deadline = 0.0
        self._busy = False
        self._beacons = 0  # heard so far
        self._nudged = asyncio.Event()
        self.elected = asyncio.Event()
        """Set whenever this connection becomes the leader; its owner clears it."""
        self.notified_at = 0.0
        """Loop time of the last notification that tasks are ready."""
        # Payloads of notifications whose news `on_wake` already had (`expect`).
        self._expected: dict[str, None] = {}

    @property
    def beacon_every_s(self) -> float:
        """How often a leader beacons while tasks exist."""
        return 2 * self._check_s

    @property
    def beacon_patience_s(self) -> float:
        """How long a follower waits for a beacon before it tries to lead: one beacon
        interval, one check (beacons ride on checks) and a second."""
        return self.beacon_every_s + self._check_s + 1.0

    async def start(self) -> None:
        """Start listening; returns once the first connection listens (and, with `elect`,
        knows whether it leads), or after 5 s."""
        self._task = asyncio.create_task(self._run(), name="jobgate-wakeups")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._connected.wait()

    def expect(self, notice: str) -> None:
        """The notification with payload `notice` is no news: its owner was woken
        directly after the write that sends it committed, so `on_wake` is not called for
        it. A notification that never comes is forgotten after `EXPECTED_MAX` others."""
        if len(self._expected) >= EXPECTED_MAX:
            del self._expected[next(iter(self._expected))]
        self._expected[notice] = None

    @property
    def listening(self) -> bool:
        """Whether notifications are being received right now."""
        return self._connected.is_set()

    @property
    def vouched(self) -> bool:
        """Whether `pg_stat_activity` shows this worker alive right now: listening, and
        the server kept the `application_name` it was given."""
        return self.listening and self._named

    @property
    def is_leader(self) -> bool:
        """Whether this connection holds the leader lock."""
        return self.listening and self._leader

    async def fetch(self, statement: ClauseElement) -> list[dict[str, Any]] | None:
        """Run a statement on this connection (one transaction, no pool checkout).

        Returns:
            Its rows, or None if the connection is down.
        """
        sql, args = _compile(statement)
        async with self._using:
            if not self.listening:
                return None
            rows = await self._conn.fetch(sql, *args)
        return [dict(row) for row in rows]

    async def lead(self, statement: Select[Any]) -> dict[str, Any] | None:
        """Run a one-row query on the leader's connection; the beacon rides on it.

        The query must return exactly one row with a boolean `busy` column: whether
        followers need a leader they can count on (tasks exist). While it is true the
        beacon goes with every other call; the first false one says "idle".

        Returns:
            The row, or None if this connection is not the leader.
        """
        loop = asyncio.get_running_loop()
        due = loop.time() >= self._beacon_due
        inner = statement.subquery()
        beacon = case(
            (and_(inner.c.busy, literal(due)), func.pg_notify(LEADER_CHANNEL, "busy")),
            (
                and_(not_(inner.c.busy), literal(self._followers_expect)),
                func.pg_notify(LEADER_CHANNEL, _IDLE),
            ),
        )
        sql, args = _compile(select(inner, beacon.label("beacon")))
        async with self._using:
            if not self.is_leader:
                return None
            row = await self._conn.fetchrow(sql, *args)
        if row is None:
            return None
        if row["busy"] and due:
            # Half a check early, so that every other check carries it.
            self._beacon_due = loop.time() + self.beacon_every_s - self._check_s / 2
            self._followers_expect = True
        elif not row["busy"]:
            self._followers_expect = False
        return dict(row)

    async def aclose(self) -> None:
        """Close the connection; a leader first hands over (followers try at once)."""
        if self._task is None:
            return
        if self.is_leader:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._resign(), timeout=2)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _resign(self) -> None:
        async with self._using:
            await self._conn.execute(
                "SELECT pg_advisory_unlock($1), pg_notify($2, $3)",
                LEADER_LOCK,
                LEADER_CHANNEL,
                _RESIGN,
            )

    async def _run(self) -> None:
        delay = 0.1
        while True:
            conn: Any = None
            follower: asyncio.Task[None] | None = None
            try:
                settings = {"application_name": self._name} if self._name else None
                conn = await asyncpg.connect(self._dsn, timeout=5, server_settings=settings)
                lost = asyncio.Event()
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(CHANNEL, self._notified)
                self._conn = conn
                self._named = self._name is not None and (
                    conn.get_settings().application_name == self._name
                )
                if self._elect:
                    await conn.add_listener(LEADER_CHANNEL, self._beacon)
                    if not await self._try_lead():
                        follower = asyncio.create_task(self._follow(), name="jobgate-follower")
                self._connected.set()
                delay = 0.1
                self._on_wake()  # anything committed while we were not listening
                await lost.wait()
                log.warning("wakeups_connection_lost", leader=self._leader)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("wakeups_connect_failed", error=type(exc).__name__, retry_in_s=delay)
            finally:
                self._connected.clear()
                self._leader = False
                self._conn = None
                if follower is not None:
                    follower.cancel()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=2)
            await asyncio.sleep(delay)
            # Capped low: a leader waits `absent_grace_s` for workers to reconnect after
            # a restart before it takes their absence for a loss.
            delay = min(delay * 2, 2.0)

    async def _try_lead(self) -> bool:
        """Take the lock if it is free; if not, expect beacons only if tasks exist.

        Sets `_busy`: whether tasks exist (the leader then beacons)."""
        query = select(
            func.pg_try_advisory_lock(LEADER_LOCK).label("won"),
            select(tasks.c.id).exists().label("busy"),
        )
        sql, args = _compile(query)
        async with self._using:
            row = await self._conn.fetchrow(sql, *args)
        loop = asyncio.get_running_loop()
        if row["won"]:
            self._leader = True
            self._beacon_due = 0.0
            self._followers_expect = True  # they learn the state from the first check
            self.elected.set()
            log.info("leader_elected")
            return True
        self._busy = bool(row["busy"])
        patience = self.beacon_patience_s if self._busy else _IDLE_PATIENCE_S
        self._deadline = loop.time() + patience
        return False

    async def _depose(self) -> None:
        """End the session that holds the leader's lock (it beacons no more)."""
        async with self._using:
            ended = await self._conn.fetch(_DEPOSE, _LOCK_HIGH, _LOCK_LOW)
        log.warning("leader_deposed", silent_s=self._depose_after_s, sessions=len(ended))

    async def _follow(self) -> None:
        """Wait while the leader beacons (or is idle); when it falls silent, take over.

        A leader that is silent while tasks exist but still holds the lock (its process
        hangs or was stopped; its connection lives on) is deposed after
        `depose_after_s` of failed tries: otherwise nothing would sweep again."""
        loop = asyncio.get_running_loop()
        silent_since: float | None = None  # the first failed try while tasks exist
        heard = self._beacons
        while True:
            if heard != self._beacons:
                heard, silent_since = self._beacons, None  # the leader spoke
            left = self._deadline - loop.time()
            if left > 0:
                self._nudged.clear()
                await wait_at_most(self._nudged, left)
                continue
            # Followers whose patience ran out together: the first new leader's beacon
            # (its first check follows its election at once) saves the others the try.
            jitter = random.uniform(0, min(0.5, self._check_s))  # noqa: S311 - not secrecy
            await asyncio.sleep(jitter)
            if loop.time() < self._deadline:
                continue
            try:
                if await self._try_lead():
                    return
                if not self._busy:
                    silent_since = None  # an idle leader is silent by design
                elif silent_since is None:
                    # A leader still idle for tasks no notification announced (not due
                    # yet) checks only every 30 s: ask it to check, and so beacon, now.
                    silent_since = loop.time()
                    async with self._using:
                        await self._conn.execute(_ASK_LEADER, LEADER_CHANNEL, _ASK)
                elif loop.time() - silent_since >= self._depose_after_s:
                    await self._depose()
                    silent_since = None
                    self._deadline = loop.time() + 0.2  # its lock goes as its session ends
                if silent_since is not None:
                    # Try again when the asked leader is due to be deposed, not a whole
                    # patience later (which would double a silent leader's reign).
                    self._deadline = min(self._deadline, silent_since + self._depose_after_s)
            except Exception as exc:  # the connection is going; `_run` reconnects
                log.warning("leader_election_failed", error=type(exc).__name__)
                self._deadline = loop.time() + self.beacon_patience_s

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        loop = asyncio.get_running_loop()
        self.notified_at = loop.time()
        # Work arrives: followers expect the leader to beacon soon (busy, or idle again).
        self._followers_expect = True
        self._deadline = min(self._deadline, loop.time() + self.beacon_patience_s)
        self._nudged.set()
        if payload in self._expected:
            # Its claim went out when the write committed; another would find nothing.
            del self._expected[payload]
            return
        self._on_wake()

    def _beacon(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        loop = asyncio.get_running_loop()
        if payload == _ASK:
            if self._leader:  # check (and so beacon) at the next tick, as for new work
                self._beacon_due = 0.0
                self._followers_expect = True
                self.notified_at = loop.time()
            return
        self._beacons += 1
        if payload == _RESIGN:
            self._deadline = loop.time()
        elif payload == _IDLE:
            self._deadline = loop.time() + _IDLE_PATIENCE_S
        else:
            self._deadline = loop.time() + self.beacon_patience_s
        self._nudged.set()


def _compile(statement: ClauseElement) -> tuple[str, list[Any]]:
    """SQL text and positional arguments of a SQLAlchemy statement, for asyncpg."""
    compiled = statement.compile(dialect=_DIALECT)
    assert isinstance(compiled, SQLCompiler)
    params = compiled.construct_params()
    return str(compiled), [params[name] for name in compiled.positiontup or ()]


def _setter(event: asyncio.Event) -> Callable[[Any], None]:
    return lambda _conn: event.set()
