"""Schema migrations (Alembic), runnable from code: no `alembic.ini` needed.

The scripts live in `migrations/` next to this module and ship in the wheel.
`upgrade(url)` is what `jobgate db upgrade` and, on SQLite, every process calls at
start-up; on PostgreSQL processes check `schema_problem(url)` instead.

Key contracts:

- Each migration runs in its own transaction, on both dialects: a failed migration
  leaves the schema at the previous revision.
- On PostgreSQL, `upgrade` holds a session advisory lock, so processes upgrading together
  migrate once and the others wait, then find nothing to do. On SQLite (which the
  embedded server, its workers and the CLI upgrade at start-up) an exclusive `flock` on
  `<database file>.migrate-lock` does the same.
- On SQLite, migrations run with `foreign_keys=OFF`: batch mode rebuilds a table by
  copying and dropping it, and with foreign keys on, dropping `jobs` would cascade
  into every table that references it. `PRAGMA foreign_key_check` runs afterwards.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, NullPool

from jobgate.store.database import is_outage

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

# pg_advisory_lock key: the first 8 bytes of sha256(b"jobgate-migrations"), signed.
ADVISORY_LOCK_ID = -8422870973541682672


class MigrationError(RuntimeError):
    """The migrations left the database inconsistent."""


def alembic_config(url: str | None = None) -> Config:
    """An Alembic `Config` for jobgate's migrations, built in code.

    Args:
        url: The database URL, for commands that open their own engine.

    Returns:
        The configuration; put an open connection in `attributes["connection"]` to
        run a command on it.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    """The newest revision the shipped migrations reach."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships migrations
        raise MigrationError("No migration scripts found")
    return head


def migration_engine(url: str) -> AsyncEngine:
    """An engine for running migrations: no pool, and real transactions on SQLite.

    Args:
        url: A `sqlite+aiosqlite://` or `postgresql+asyncpg://` URL.
    """
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, poolclass=NullPool)
    if is_sqlite:
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
    return engine


async def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision`.

    Safe to call from several processes at once on PostgreSQL (an advisory lock
    serialises them); upgrading a database that is already there does nothing.

    Args:
        url: The database URL (`JOBGATE_DATABASE_URL`).
        revision: The target revision; the newest by default.

    Raises:
        MigrationError: The database is at a revision this jobgate does not know (a
            newer jobgate migrated it), or, on SQLite, the migrated data breaks a
            foreign key.
    """
    await _run(url, command.upgrade, revision)


def _known_revisions() -> set[str]:
    scripts = ScriptDirectory.from_config(alembic_config())
    return {script.revision for script in scripts.walk_revisions()}


def _newer(current: str) -> str:
    return (
        f"the database schema is at revision {current}, which this jobgate does not "
        f"know (it needs {head_revision()}): a newer jobgate migrated it; run that version"
    )


async def downgrade(url: str, revision: str) -> None:
    """Migrate the database at `url` down to `revision` (`"base"`: drop everything)."""
    await _run(url, command.downgrade, revision)


def upgrade_sync(url: str, revision: str = "head") -> None:
    """`upgrade` for callers without an event loop (the CLI)."""
    asyncio.run(upgrade(url, revision))


async def current_revision(url: str) -> str | None:
    """The revision the database at `url` is at, or None for an empty database."""
    return (await _revision_and_jobs(url))[0]


async def _revision_and_jobs(url: str) -> tuple[str | None, bool]:
    """The database's revision, and whether it has a `jobs` table: one connection."""
    engine = migration_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: (_revision_of(sync), inspect(sync).has_table("jobs"))
            )
    finally:
        await engine.dispose()


def _revision_of(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def schema_problem(url: str) -> str | None:
    """Why a process should not start on the database at `url` as it is, or None.

    A store out of reach is not a problem of the schema: None (the process starts and
    answers 503 until the store is back, as for an outage later on).

    The embedded SQLite is upgraded at start-up; PostgreSQL is upgraded by `jobgate db
    upgrade` alone, so a process started on one left behind (or already migrated by a
    newer jobgate) would fail request by request, or run without newer indexes. A schema
    made from the models directly (`Database.create_all`, no revision) is taken as is.
    """
    try:
        current, has_jobs = await _revision_and_jobs(url)
    except Exception as exc:
        if is_outage(exc) or isinstance(exc, OSError):
            return None
        raise
    head = head_revision()
    if current == head:
        return None
    if current is None:
        if has_jobs:
            return None
        return "the database has no jobgate schema: run `jobgate db upgrade`"
    if current not in _known_revisions():
        return _newer(current)
    return (
        f"the database schema is at revision {current} and this jobgate needs {head}: "
        "stop the older jobgate's processes, then run `jobgate db upgrade`"
    )


async def _run(url: str, alembic_command: Any, revision: str) -> None:
    lock = _sqlite_lock_path(url)
    if lock is None:
        await _run_locked(url, alembic_command, revision)
        return
    # SQLite has no lock that outlives a transaction, and Alembic plans its steps from
    # the revision it reads first: a process that read it while another was midway
    # would run again what the other had done ("table ... already exists"). So the
    # whole run holds an exclusive lock on a file next to the database.
    fd = await asyncio.to_thread(_lock_file, lock)
    try:
        await _run_locked(url, alembic_command, revision)
    finally:
        os.close(fd)  # releases the lock


def _sqlite_lock_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(f"{parsed.database}.migrate-lock")


def _lock_file(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for a process migrating now
    except BaseException:
        os.close(fd)
        raise
    return fd


async def _run_locked(url: str, alembic_command: Any, revision: str) -> None:
    engine = migration_engine(url)
    is_postgres = engine.dialect.name == "postgresql"
    try:
        async with engine.connect() as conn:
            if is_postgres:
                # A session lock outlives the transactions each migration opens; the
                # connection is closed (no pool) on error, which releases it too.
                await conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": ADVISORY_LOCK_ID})
                await conn.commit()
            await conn.run_sync(_run_command, alembic_command, revision)
            if is_postgres:
                await conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": ADVISORY_LOCK_ID})
                await conn.commit()
            elif engine.dialect.name == "sqlite":
                broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).fetchall()
                await conn.commit()
                if broken:
                    raise MigrationError(f"Foreign keys broken by the migration: {broken[:10]}")
    finally:
        await engine.dispose()


def _run_command(connection: Connection, alembic_command: Any, revision: str) -> None:
    # Under the run's lock, before Alembic's own "Can't locate revision" traceback.
    current = _revision_of(connection)
    if current is not None and current not in _known_revisions():
        raise MigrationError(_newer(current))
    config = alembic_config()
    config.attributes["connection"] = connection
    alembic_command(config, revision)


def _sqlite_on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    # As in `Database`: let the "begin" event below issue BEGIN itself, because the
    # driver's own implicit transactions do not cover DDL.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=OFF")
    cursor.close()


def _sqlite_on_begin(conn: Any) -> None:
    # IMMEDIATE: two processes migrating at once queue up instead of deadlocking.
    conn.exec_driver_sql("BEGIN IMMEDIATE")
