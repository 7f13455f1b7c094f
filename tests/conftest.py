"""Shared test fixtures: a clean environment, real-server gating and databases.

Tests that need a real server are marked `@pytest.mark.service("postgres")` (or
"redis", "rabbitmq"). Each server is probed once per session; when it is unreachable
the test is skipped with the reason, or fails when `CI=true`, so CI never passes by
skipping. `--only-service NAME` runs only the tests that need NAME;
`--exclude-service NAME` leaves them out.

Server addresses can be moved with `TEST_POSTGRES_DSN`, `TEST_REDIS_ADDR` and
`TEST_RABBITMQ_ADDR` (host:port).

Tests may run in parallel (`pytest -n N`, pytest-xdist). A test that stops or restarts a
shared server is marked `@pytest.mark.disruptive`: it runs alone, while no other test of
the run is in progress (see `_server_lock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from jobgate.config import get_settings
from jobgate.store.database import Database
from jobgate.store.tables import metadata

T = TypeVar("T")

POSTGRES_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
TCP_SERVICES = {
    "redis": os.environ.get("TEST_REDIS_ADDR", "127.0.0.1:6379"),
    "rabbitmq": os.environ.get("TEST_RABBITMQ_ADDR", "127.0.0.1:5672"),
}
SERVICES = ("postgres", *TCP_SERVICES)
PROBE_TIMEOUT_S = 3.0
EXCLUSIVE_FLAG = "JG_TEST_RUNS_ALONE"
"""Set to "1" while a disruptive test runs (checked by `require_exclusive`)."""

# Tracebacks as plain text: unconfigured, structlog draws them with rich and every
# frame's locals, which held a failing stage's event loop for 0.2-0.5 s.
structlog.configure(
    processors=[
        *structlog.get_config()["processors"][:-1],
        structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        ),
    ]
)

# service name -> None when reachable, else why not; filled on first use.
_probe_results: dict[str, str | None] = {}


# -- options and markers ----------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("jobgate")
    group.addoption(
        "--only-service",
        action="append",
        default=[],
        metavar="NAME",
        help="run only the tests that need this service (repeatable)",
    )
    group.addoption(
        "--exclude-service",
        action="append",
        default=[],
        metavar="NAME",
        help="leave out the tests that need this service (repeatable)",
    )


def _services_of(item: pytest.Item) -> set[str]:
    names = set()
    for marker in item.iter_markers("service"):
        if len(marker.args) != 1 or marker.args[0] not in SERVICES:
            raise pytest.UsageError(
                f"{item.nodeid}: use @pytest.mark.service(name) with name in {SERVICES}"
            )
        names.add(marker.args[0])
    return names


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    only = set(config.getoption("--only-service"))
    exclude = set(config.getoption("--exclude-service"))
    if not only and not exclude:
        return
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        needs = _services_of(item)
        wanted = (not only or bool(needs & only)) and not needs & exclude
        (kept if wanted else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for name in sorted(_services_of(item)):
        require_service(name)


@pytest.hookimpl(tryfirst=True, wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    # Outermost, so that waiting for the lock is not counted by pytest-timeout.
    with _server_lock(exclusive=item.get_closest_marker("disruptive") is not None):
        return (yield)


@contextlib.contextmanager
def _server_lock(*, exclusive: bool) -> Iterator[None]:
    """Under pytest-xdist: a shared hold for every test, an exclusive one for a disruptive test.

    Two `flock`s make a turnstile, so a waiting disruptive test is not starved: everybody
    passes the gate to take the main lock, and a disruptive test keeps the gate closed
    while it waits for the shared holders to leave.
    """
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    os.environ[EXCLUSIVE_FLAG] = "1" if exclusive else ""
    try:
        if run is None:  # one process: tests run one at a time anyway
            yield
            return
        base = Path(tempfile.gettempdir()) / f"jobgate-tests-{run}"
        with open(f"{base}.gate", "a") as gate, open(f"{base}.lock", "a") as lock:
            fcntl.flock(gate, fcntl.LOCK_EX)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            finally:
                fcntl.flock(gate, fcntl.LOCK_UN)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        os.environ.pop(EXCLUSIVE_FLAG, None)


def require_exclusive() -> None:
    """Fail unless the current test is marked disruptive (call before touching a server)."""
    if os.environ.get(EXCLUSIVE_FLAG) != "1":
        pytest.fail("a test that stops or restarts a server must be @pytest.mark.disruptive")


def require_service(name: str) -> None:
    """Skip the current test if `name` is unreachable (fail it when `CI=true`)."""
    if name not in _probe_results:
        _probe_results[name] = _probe(name)
    reason = _probe_results[name]
    if reason is None:
        return
    message = f"{name} is not reachable: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(message)


def _probe(name: str) -> str | None:
    try:
        if name == "postgres":
            run_async(lambda: _admin("SELECT 1"))
        else:
            host, _, port = TCP_SERVICES[name].rpartition(":")
            with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S):
                pass
    except (OSError, sa_exc.SQLAlchemyError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a private loop in another thread.

    Session fixtures and hooks use this, so they never touch the event loop that
    pytest-asyncio gives each test.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="test-setup") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


# -- environment ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees the developer's `JOBGATE_*` variables, or another test's settings."""
    for name in list(os.environ):
        if name.startswith("JOBGATE_"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# -- databases --------------------------------------------------------------------------


async def drop_redis_keys(pattern: str) -> None:
    """Delete the test Redis's keys matching `pattern` (a test's own namespace)."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(f"redis://{TCP_SERVICES['redis']}/0")
    try:
        keys = [key async for key in client.scan_iter(match=pattern)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def _asyncpg_url(database: str) -> str:
    url = make_url(POSTGRES_DSN).set(drivername="postgresql+asyncpg", database=database)
    return url.render_as_string(hide_password=False)


async def _admin(*statements: str, database: str | None = None) -> None:
    """Run statements outside any transaction (CREATE/DROP DATABASE need that)."""
    url = _asyncpg_url(database or make_url(POSTGRES_DSN).database or "postgres")
    engine = create_async_engine(
        url,
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
        connect_args={"timeout": PROBE_TIMEOUT_S},
    )
    try:
        async with engine.connect() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


def _create_database(name: str) -> str:
    run_async(
        lambda: _admin(
            f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"'
        )
    )
    return _asyncpg_url(name)


def _drop_database(name: str) -> None:
    # FORCE: a test that leaked a connection must not make the session hang.
    run_async(lambda: _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database URL (file in `tmp_path`; created on first connection)."""
    return f"sqlite+aiosqlite:///{tmp_path / 'jobgate.db'}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """An empty PostgreSQL database of this test session, `jobgate_test_<pid>`."""
    require_service("postgres")
    name = f"jobgate_test_{os.getpid()}"
    url = _create_database(name)
    yield url
    _drop_database(name)


@pytest.fixture(scope="session")
def _postgres_schema(postgres_url: str) -> str:
    async def create() -> None:
        database = Database(postgres_url)
        try:
            await database.create_all()
        finally:
            await database.aclose()

    run_async(create)
    return postgres_url


@pytest.fixture
def postgres_db_url(_postgres_schema: str) -> str:
    """The session's PostgreSQL database with every table present and empty."""
    tables = ", ".join(f'"{table.name}"' for table in metadata.sorted_tables)
    statement = f"TRUNCATE {tables} RESTART IDENTITY CASCADE"
    run_async(lambda: _admin(statement, database=make_url(_postgres_schema).database))
    return _postgres_schema


_fresh_counter = itertools.count()


@pytest.fixture
def fresh_postgres_url() -> Iterator[str]:
    """A brand-new, empty PostgreSQL database for this test only (migration tests)."""
    require_service("postgres")
    name = f"jobgate_test_{os.getpid()}_{next(_fresh_counter)}"
    yield _create_database(name)
    _drop_database(name)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.service("postgres")),
    ]
)
def database_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty database, once per dialect."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_db_url"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """An open `Database` with every table created and empty, once per dialect."""
    db = Database(database_url)
    if db.is_sqlite:  # PostgreSQL's schema is made once per session, then truncated
        await db.create_all()
    try:
        yield db
    finally:
        await db.aclose()
