"""The async engine, with the pragmas and transaction modes each dialect needs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from asyncpg import exceptions as asyncpg_errors
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, Pool

from jobgate.store import pg
from jobgate.store.tables import metadata

_WRITE = "jobgate_write"
OUTBOX = "jobgate_outbox"
CHANGES = "jobgate_changes"
"""Execution option of a write connection: job id -> last event `seq` it appended."""
EVENT_ROWS = "jobgate_event_rows"
"""Execution option of a write connection: a `NotedRows`, the events it appended whose
rows the writer read back (`events.note_rows`), each with its job's `owner`."""


class NotedRows(list[dict[str, Any]]):
    """A write's event rows for this process's live streams; `wanted` says whether
    anything would use them now (`Database.rows_wanted`), so writers read them back
    only then."""

    __slots__ = ("_db",)

    def __init__(self, db: Database) -> None:
        super().__init__()
        self._db = db

    @property
    def wanted(self) -> bool:
        return self._db.on_rows is not None and self._db.rows_wanted


IDLE_IN_TRANSACTION_S = 60.0
"""PostgreSQL ends a session idle this long inside a transaction, freeing its locks.
jobgate's transactions never wait on anything but the store and, for a submit, the
limits' Redis (seconds at most)."""


class Database:
    """One engine and the two ways to use it: `read()` and `write()` transactions.

    On SQLite, a write transaction starts with `BEGIN IMMEDIATE`, so two writers never
    deadlock upgrading a read lock, and waits up to `busy_timeout` for another process's
    writer; reads start deferred and, under WAL, never wait for writers.

    `on_changes`, when set, is called after each committed write that appended events,
    with the jobs' new last `seq` (`events.note`): the event bus's publish. `on_rows`,
    when set, is called just before it with the event rows the write noted
    (`events.note_rows`): this process's live streams send them without reading them back.
    """

    on_changes: Callable[[Mapping[str, int]], None] | None = None
    on_rows: Callable[[list[dict[str, Any]]], None] | None = None
    rows_wanted = False
    """Whether `on_rows` has a use now (a global stream is open in this process)."""

    def __init__(
        self,
        url: str,
        *,
        echo: bool = False,
        pool_size: int = 20,
        outbox: bool = False,
        idle_in_transaction_s: float = IDLE_IN_TRANSACTION_S,
    ) -> None:
        self.url = url
        # With an external transport, every task made ready also leaves an outbox token.
        self.outbox = outbox
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self.is_sqlite = self.dialect == "sqlite"
        options: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            options["connect_args"] = {"timeout": 30}
        else:
            options.update(pool_size=pool_size, max_overflow=pool_size)
            if parsed.get_driver_name() == "asyncpg":
                # A session that stops mid-transaction (a process cut off by a
                # partition, frozen, or stuck) would hold its row locks until TCP
                # gives up on it, hours later: the server ends it instead.
                idle_ms = str(max(1, round(idle_in_transaction_s * 1000)))
                options["connect_args"] = {
                    "server_settings": {"idle_in_transaction_session_timeout": idle_ms}
                }
        self.engine: AsyncEngine = create_async_engine(url, **options)
        if not self.is_sqlite:
            event.listen(self.engine.sync_engine.pool, "checkin", _note_checkin)
            event.listen(self.engine.sync_engine.pool, "checkout", _ping_if_idle)
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        # Set-up autocommit connections between uses: at most a quarter of the pool.
        self._warm: list[_Warm] = []
        self._warm_max = max(1, pool_size // 4)
        self._closed = False
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_on_connect)
            event.listen(self.engine.sync_engine, "begin", _sqlite_on_begin)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that may write; committed on success, rolled back on error.

        Never open one inside another: on SQLite the inner one would wait for the outer.
        """
        if self._write_lock is None:
            async with self._transaction(write=True) as conn:
                yield conn
            return
        # SQLite has one writer. Queueing this process's writers here wakes the next
        # one the moment the lock frees, where SQLite's busy handler sleeps and polls.
        async with self._write_lock, self._transaction(write=True) as conn:
            yield conn

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        """PostgreSQL: a connection on which each statement commits on its own.

        For a write that is a single statement (atomic by itself), it saves the
        `BEGIN` and `COMMIT` round trips of `write()`. Connections used this way are
        kept set up between uses (`_Warm`), not handed back to the pool each time.

        Only jobgate's prebuilt statements run here (`store/pg.py`), each with a plan
        test, so PostgreSQL runs them on their generic plans (`_GENERIC_PLANS`).
        """
        if self.is_sqlite:
            raise RuntimeError("autocommit() is for PostgreSQL; use write()")
        warm = await self._take_warm()
        try:
            yield warm.conn
        except BaseException:
            warm.changes.clear()
            warm.rows.clear()
            await _hand_back(warm)
            raise
        changes = dict(warm.changes)
        warm.changes.clear()
        rows = warm.rows[:]
        warm.rows.clear()
        await self._keep_warm(warm)
        self._announce(changes, rows)

    async def _take_warm(self) -> _Warm:
        while self._warm:
            warm = self._warm.pop()
            if warm.driver.is_closed():
                await warm.conn.invalidate()  # the server closed it: not back to the pool
            elif warm.pool is self.engine.pool:
                # Not pinged however long it idled: the driver sees a connection the
                # server closed (a restart) as closed, above, and a ping, with the reset
                # and set-up of a trip through the pool, would cost an idle worker's
                # once-a-minute claim three round trips (two transactions) more.
                return warm
            else:  # from a pool dropped after a lost connection: back to it, to go
                await _hand_back(warm)
        pool = self.engine.pool
        conn = await self.engine.connect()
        changes: dict[str, int] = {}
        rows = NotedRows(self)
        options = {"isolation_level": "AUTOCOMMIT", _WRITE: True, OUTBOX: self.outbox}
        try:
            await conn.execution_options(**options, **{CHANGES: changes, EVENT_ROWS: rows})
            driver = (await conn.get_raw_connection()).driver_connection
            await pg.value(conn, _GENERIC_PLANS)  # a lost connection retires the pool
        except BaseException:
            await conn.close()
            raise
        return _Warm(conn, changes, rows, pool, driver)

    async def _keep_warm(self, warm: _Warm) -> None:
        if self._closed or warm.conn.invalidated or len(self._warm) >= self._warm_max:
            await _hand_back(warm)
            return
        self._warm.append(warm)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction."""
        async with self._transaction(write=False) as conn:
            yield conn

    @asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        changes: dict[str, int] = {}
        rows = NotedRows(self)
        async with self.engine.connect() as conn:
            if write:
                options = {
                    _WRITE: True,
                    OUTBOX: self.outbox,
                    CHANGES: changes,
                    EVENT_ROWS: rows,
                }
                conn = await conn.execution_options(**options)
            async with conn.begin():
                yield conn
        self._announce(changes, rows)

    def _announce(self, changes: dict[str, int], rows: list[dict[str, Any]]) -> None:
        if rows and self.on_rows is not None:
            self.on_rows(rows)
        if changes and self.on_changes is not None:
            self.on_changes(changes)

    async def create_all(self) -> None:
        """Create the tables directly (tests); deployments use `jobgate db upgrade`."""
        async with self.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)

    async def ping(self) -> float:
        """Round-trip a trivial query; the latency in milliseconds."""
        started = time.perf_counter()
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return (time.perf_counter() - started) * 1000

    async def aclose(self) -> None:
        self._closed = True
        while self._warm:
            await self._warm.pop().conn.close()
        await self.engine.dispose()


# PostgreSQL plans a prepared statement anew at each run while it judges a plan made
# for the values cheaper than its generic plan. For the submit's insert it always
# does (the generic plan guesses a thousand rows per `generate_series`), and planning
# cost more than running: 1.1 ms a statement from the client, 0.55-0.66 ms on the
# generic plan. Warm connections run only prebuilt statements whose generic plans are
# tested (claims, renewals, outcomes, stream reads: tests/engine/test_claims.py,
# test_complete_many.py, test_stream_plans.py; inserts read no table), so they always
# use them; the pool's other statements are left to PostgreSQL's choice.
_GENERIC_PLANS = "SET plan_cache_mode = force_generic_plan"
_RESET_PLANS = "RESET plan_cache_mode"
_RESET_TIMEOUT_S = 5.0


async def _hand_back(warm: _Warm) -> None:
    """Give a warm connection back to the pool with the pool's plan mode; discard one
    that cannot take the reset (broken, or a statement still on it)."""
    if not warm.conn.invalidated and not warm.driver.is_closed():
        try:
            await warm.driver.execute(_RESET_PLANS, timeout=_RESET_TIMEOUT_S)
        except BaseException as exc:
            await warm.conn.invalidate()
            if not isinstance(exc, Exception):
                raise
            return
    await warm.conn.close()


class _Warm:
    """An autocommit connection kept checked out and set up between uses: taking one
    from the pool and setting its options costs more Python than the statement run on
    it (about 0.1 ms). `changes` and `rows` are what its `CHANGES` and `EVENT_ROWS`
    options hold, emptied after each use."""

    __slots__ = ("changes", "conn", "driver", "pool", "rows")

    def __init__(
        self,
        conn: AsyncConnection,
        changes: dict[str, int],
        rows: NotedRows,
        pool: Pool,
        driver: Any,
    ) -> None:
        self.conn = conn
        self.changes = changes
        self.rows = rows
        self.pool = pool
        self.driver = driver  # the asyncpg connection under `conn`


# A pooled connection idle for longer than this is pinged before use. SQLAlchemy's
# `pool_pre_ping` pings every checkout (BEGIN; SELECT; ROLLBACK on asyncpg: three round
# trips per transaction); a connection back in use within a second is known to be alive,
# and one that died since fails its statement, which invalidates the whole pool.
IDLE_PING_S = 1.0
_CHECKED_IN_AT = "jobgate_checked_in_at"


def _note_checkin(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    record.info[_CHECKED_IN_AT] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
    checked_in_at = record.info.get(_CHECKED_IN_AT)
    if checked_in_at is None or time.monotonic() - checked_in_at < IDLE_PING_S:
        return
    try:
        dbapi_connection.ping()
    except Exception as exc:
        # The pool drops this connection and checks out (or opens) another.
        raise DisconnectionError(f"pooled connection is dead: {exc}") from exc


def _sqlite_on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself, so it can choose IMMEDIATE.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_on_begin(conn: Any) -> None:
    immediate = conn.get_execution_options().get(_WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


OUTAGE_TYPES: tuple[type[Exception], ...] = (
    sa_exc.DBAPIError,  # OperationalError, InterfaceError; others when the connection died
    sa_exc.TimeoutError,
    sa_exc.DisconnectionError,
    ConnectionError,
    asyncpg_errors.InterfaceError,
    asyncpg_errors.PostgresConnectionError,
    asyncpg_errors.AdminShutdownError,
    asyncpg_errors.CrashShutdownError,
    asyncpg_errors.CannotConnectNowError,
    # Refusals of a new connection: the server's connection slots are all taken, or the
    # database was closed to connections (maintenance). Both pass; no statement ran.
    asyncpg_errors.TooManyConnectionsError,
    asyncpg_errors.ObjectNotInPrerequisiteStateError,
)
"""Exceptions that may mean the store is out of reach; `is_outage` decides."""


# SQLSTATEs of text PostgreSQL cannot store: NUL (U+0000) in a string or in JSON.
_UNSTORABLE_TEXT = {"22021", "22P05"}
UNSTORABLE_TEXT_TYPES: tuple[type[Exception], ...] = (
    asyncpg_errors.CharacterNotInRepertoireError,
    asyncpg_errors.UntranslatableCharacterError,
)
"""The driver's own errors for them (the fast path's statements are not SQLAlchemy's)."""


def is_unstorable_text(exc: BaseException) -> bool:
    """Whether `exc` is PostgreSQL refusing a text value it cannot hold (a NUL, U+0000,
    in a string or a JSON document): the request's fault, not the server's."""
    return any(getattr(link, "sqlstate", None) in _UNSTORABLE_TEXT for link in _chain(exc))


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it: SQLAlchemy's `orig`, then causes and contexts."""
    seen: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and all(link is not s for s in seen):
        seen.append(link)
        orig = getattr(link, "orig", None)
        link = orig if isinstance(orig, BaseException) else (link.__cause__ or link.__context__)
    return seen


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` means the store cannot be reached now (a retry may succeed), not
    that a statement is wrong: refused or lost connections, a pool with no connection
    free in time, a server shutting down, SQLite's lock timeout.

    SQLAlchemy wraps driver errors (`DBAPIError.orig`, which the driver's own error
    caused), so the whole chain is looked at.
    """
    for link in _chain(exc):
        if isinstance(link, sa_exc.DBAPIError):
            if link.connection_invalidated or isinstance(
                link, sa_exc.OperationalError | sa_exc.InterfaceError
            ):
                return True
        elif isinstance(link, OUTAGE_TYPES):
            return True
    return False
