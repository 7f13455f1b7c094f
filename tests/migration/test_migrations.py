"""Migrations: upgrading to head gives exactly the schema `tables.metadata` describes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from jobgate.store import migrate
from jobgate.store.database import Database
from jobgate.store.tables import metadata


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.service("postgres")),
    ]
)
def empty_url(request: pytest.FixtureRequest) -> str:
    """The URL of a database with no tables at all, once per dialect."""
    fixture = "sqlite_url" if request.param == "sqlite" else "fresh_postgres_url"
    url: str = request.getfixturevalue(fixture)
    return url


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return list(compare_metadata(context, metadata))


async def schema_differences(url: str) -> list[Any]:
    """What autogenerate would change to make the database at `url` match `metadata`."""
    database = Database(url)
    try:
        async with database.read() as conn:
            return await conn.run_sync(_differences)
    finally:
        await database.aclose()


async def table_names(url: str) -> set[str]:
    database = Database(url)
    try:
        async with database.read() as conn:
            return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
    finally:
        await database.aclose()


def _jobgate(url: str, data_dir: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """`jobgate ARGS` on the database at `url`, in a process of its own."""
    env = {**os.environ, "JOBGATE_DATABASE_URL": url, "JOBGATE_DATA_DIR": str(data_dir)}
    jobgate = str(Path(sys.executable).parent / "jobgate")
    return subprocess.run([jobgate, *args], env=env, capture_output=True, timeout=60)


def _before_head() -> str:
    """The revision just before the newest."""
    scripts = ScriptDirectory.from_config(migrate.alembic_config())
    previous = scripts.get_revision(migrate.head_revision()).down_revision
    assert isinstance(previous, str)
    return previous


async def test_comparison_sees_a_missing_schema(empty_url: str) -> None:
    """The comparison is not vacuous: an empty database differs from the metadata."""
    differences = await schema_differences(empty_url)

    assert {table.name for table in metadata.sorted_tables} == {
        diff[1].name for diff in differences if diff[0] == "add_table"
    }


async def test_upgrade_to_head_matches_metadata(empty_url: str) -> None:
    """After `upgrade`, the database has exactly the tables, indexes and keys of `metadata`."""
    await migrate.upgrade(empty_url)

    assert await schema_differences(empty_url) == []
    assert migrate.head_revision() == await migrate.current_revision(empty_url)


async def test_upgrade_twice_is_a_no_op(empty_url: str) -> None:
    """Upgrading a database that is at head changes nothing and does not fail."""
    await migrate.upgrade(empty_url)
    tables = await table_names(empty_url)

    await migrate.upgrade(empty_url)

    assert tables == await table_names(empty_url)
    assert await schema_differences(empty_url) == []
    assert migrate.head_revision() == await migrate.current_revision(empty_url)


async def test_downgrade_to_base_removes_every_table(empty_url: str) -> None:
    """`downgrade("base")` undoes the initial migration; upgrading again works."""
    await migrate.upgrade(empty_url)

    await migrate.downgrade(empty_url, "base")

    assert {"alembic_version"} == await table_names(empty_url)
    assert await migrate.current_revision(empty_url) is None
    await migrate.upgrade(empty_url)
    assert await schema_differences(empty_url) == []


async def test_migrated_sqlite_schema_enforces_foreign_keys(sqlite_url: str) -> None:
    """Migrations run with foreign keys off, but the application's connections enforce them."""
    await migrate.upgrade(sqlite_url)
    database = Database(sqlite_url)
    try:
        with pytest.raises(Exception, match="FOREIGN KEY"):
            async with database.write() as conn:
                await conn.exec_driver_sql(
                    "INSERT INTO blob_grants (sha256, owner, created_at) VALUES ('x', 'o', 0)"
                )
    finally:
        await database.aclose()


@pytest.mark.service("postgres")
async def test_concurrent_upgrades_on_postgres_migrate_once(fresh_postgres_url: str) -> None:
    """Processes starting together serialise on the advisory lock; none fails."""
    await asyncio.gather(*(migrate.upgrade(fresh_postgres_url) for _ in range(4)))

    assert await schema_differences(fresh_postgres_url) == []
    assert migrate.head_revision() == await migrate.current_revision(fresh_postgres_url)


def test_processes_upgrading_one_sqlite_file_together_migrate_once(tmp_path: Path) -> None:
    """Three processes upgrading one new SQLite file at once: one migrates, the others
    wait for it, and none fails (regression: SQLite's lock ended with each migration's
    transaction, another process planned from a revision read midway, and ran again a
    migration done meanwhile: `table ... already exists`, 1 trial in 4; 8 trials here)."""
    script = (
        "import asyncio, sys\n"
        "from jobgate.store import migrate\n"
        "asyncio.run(migrate.upgrade(sys.argv[1]))\n"
    )
    for trial in range(8):
        url = f"sqlite+aiosqlite:///{tmp_path}/race-{trial}.db"
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", script, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            for _ in range(3)
        ]
        for process in processes:
            _, err = process.communicate(timeout=120)
            assert process.returncode == 0, err.decode()[-2000:]
        assert asyncio.run(migrate.current_revision(url)) == migrate.head_revision()
        assert asyncio.run(schema_differences(url)) == []


@pytest.mark.service("postgres")
async def test_a_postgres_schema_that_is_not_this_jobgates_is_named_at_start_up(
    fresh_postgres_url: str, tmp_path: Path
) -> None:
    """On PostgreSQL only `jobgate db upgrade` migrates. A process started on a database
    left behind, empty, or migrated by a newer jobgate refuses to start and says what
    to do (regression: it started, /readyz said ready, and requests failed with 500);
    at head it starts."""
    head = migrate.head_revision()
    assert "jobgate db upgrade" in (await migrate.schema_problem(fresh_postgres_url) or "")

    previous = _before_head()
    await migrate.upgrade(fresh_postgres_url, previous)
    behind = await migrate.schema_problem(fresh_postgres_url) or ""
    assert previous in behind
    assert head in behind
    assert "jobgate db upgrade" in behind
    worker = _jobgate(fresh_postgres_url, tmp_path, "worker")
    assert worker.returncode == 1
    assert "jobgate db upgrade" in worker.stderr.decode()
    assert "Traceback" not in worker.stderr.decode()

    await migrate.upgrade(fresh_postgres_url)
    assert await migrate.schema_problem(fresh_postgres_url) is None
    database = Database(fresh_postgres_url)
    try:
        async with database.write() as conn:
            await conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    finally:
        await database.aclose()
    assert "does not know" in (await migrate.schema_problem(fresh_postgres_url) or "")


def test_a_sqlite_database_newer_than_this_jobgate_is_named_not_migrated(tmp_path: Path) -> None:
    """A SQLite file a newer jobgate migrated: the CLI says so in one line and exits 1
    (regression: a long traceback ending in `Can't locate revision`)."""
    url = f"sqlite+aiosqlite:///{tmp_path}/data/jobgate.db"
    asyncio.run(migrate.upgrade(url))

    async def stamp_newer() -> None:
        database = Database(url)
        try:
            async with database.write() as conn:
                await conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
        finally:
            await database.aclose()

    asyncio.run(stamp_newer())
    keys = _jobgate(url, tmp_path, "keys", "list")
    err = keys.stderr.decode()
    assert keys.returncode == 1, err
    assert "9999" in err
    assert "newer jobgate" in err
    assert "Traceback" not in err


def test_the_cli_shows_the_revision_and_goes_back_one(tmp_path: Path) -> None:
    """`jobgate db current` names both revisions; `jobgate db downgrade REV` goes back,
    and `db upgrade` forward again, to a schema equal to the models."""
    url = f"sqlite+aiosqlite:///{tmp_path}/data/jobgate.db"
    head = migrate.head_revision()
    previous = _before_head()

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        done = _jobgate(url, tmp_path, *args)
        assert done.returncode == 0, done.stderr.decode()
        return done

    run("db", "upgrade")
    assert run("db", "current").stdout.decode().split() == [
        "database:",
        head,
        "this",
        "jobgate:",
        head,
    ]
    run("db", "downgrade", previous)
    assert asyncio.run(migrate.current_revision(url)) == previous
    run("db", "upgrade")
    assert asyncio.run(migrate.current_revision(url)) == head
    assert asyncio.run(schema_differences(url)) == []
