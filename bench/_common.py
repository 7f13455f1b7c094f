"""What every benchmark shares: fresh databases, the results table, the machine."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import platform
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import asyncpg  # type: ignore[import-untyped]
import redis.asyncio as aioredis
from sqlalchemy.engine import make_url

from jobgate.ids import uuid7
from jobgate.pipelines import Registry
from jobgate.store.repositories import jobs
from jobgate.transport import TransportError, from_url

DATABASES = ("sqlite", "postgres")
# Where a fresh `jobgate_bench` database is dropped and created (any database of the
# server will do for that); JOBGATE_BENCH_PG_URL overrides it.
PG_ADMIN_URL = os.environ.get(
    "JOBGATE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PG_BENCH_DB = "jobgate_bench"
RUNS = 3
# The brokers jobgate's other transports run on (issue 3: every figure on each transport).
BROKERS = {
    "rabbitmq": os.environ.get("JOBGATE_BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    "redis": os.environ.get("JOBGATE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
}


@dataclass
class Result:
    """One figure: every run's value and the median that is reported."""

    benchmark: str
    database: str
    unit: str
    values: list[float] = field(default_factory=list)
    errors: int = 0
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")


class EventCounter(logging.Filter):
    """Counts jobgate log events by name; swallows the noisy ones listed in `quiet`."""

    def __init__(self, quiet: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.quiet = quiet
        self.counts: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        event = record.msg.get("event") if isinstance(record.msg, dict) else None
        if isinstance(event, str):
            self.counts[event] += 1
            return event not in self.quiet
        return True


# `lease_lost` fires spuriously when a lease renewal races a task's completion (see
# bench/RESULTS.md); it is counted and reported per run instead of printed.
EVENTS = EventCounter(quiet=frozenset({"lease_lost"}))


def new_job(registry: Registry, pipeline: str, params: dict[str, object]) -> jobs.NewJob:
    """A job of `pipeline` for owner `bench`, as the API's submit would make it."""
    p = registry.get(pipeline)
    return jobs.NewJob(
        id=uuid7(),
        pipeline=p,
        owner="bench",
        params=p.validate_params(params),
        files=[],
        priority=0,
        budget_usd=1.0,
        estimated_usd=0.0,
    )


def log(message: str) -> None:
    """Progress for people, on stderr (the table goes to stdout)."""
    print(f"  . {message}", file=sys.stderr, flush=True)


@contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"jobgate-bench-{prefix}-") as name:
        yield Path(name)


def sqlite_url(directory: Path) -> str:
    return f"sqlite+aiosqlite:///{directory / 'jobgate.db'}"


async def _run_sql(database: str | None, *statements: str) -> None:
    """Run `statements` one by one on `database` (None: the admin URL's own)."""
    admin = make_url(PG_ADMIN_URL)
    conn = await asyncpg.connect(
        host=admin.host or "127.0.0.1",
        port=admin.port or 5432,
        user=admin.username or "postgres",
        password=admin.password,
        database=database or admin.database or "postgres",
    )
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def fresh_postgres(name: str = PG_BENCH_DB) -> str:
    """Drop and create the database `name` (`jobgate_bench`); its SQLAlchemy (asyncpg)
    URL, empty."""
    await _run_sql(
        None, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"'
    )
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql+asyncpg", database=name)
    return url.render_as_string(hide_password=False)


async def drop_postgres(name: str) -> None:
    """Drop the database `name`, if it is there."""
    await _run_sql(None, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def analyze_postgres(name: str = PG_BENCH_DB) -> None:
    """ANALYZE the database `name` (untimed). The bench server may run with autovacuum off;
    without statistics PostgreSQL seq-scans the `id IN (...)` reads, and every figure
    would then degrade with the table size instead of measuring jobgate."""
    await _run_sql(name, "ANALYZE")


async def postgres_version() -> tuple[str | None, str | None]:
    """(the server's version, None) when it answers, else (None, why not)."""

    admin = make_url(PG_ADMIN_URL)
    try:
        conn = await asyncio.wait_for(
            asyncpg.connect(
                host=admin.host or "127.0.0.1",
                port=admin.port or 5432,
                user=admin.username or "postgres",
                password=admin.password,
                database=admin.database or "postgres",
            ),
            timeout=5,
        )
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    try:
        version = str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()
    return version, None


def transport_namespace() -> str:
    """A namespace of queue names no other run shares, so no run sees another's tokens."""
    return f"jgbench{uuid7().replace('-', '')[-12:]}"


async def broker_answers(broker: str) -> str | None:
    """None when `broker`'s server answers, else why not (the figure is then skipped)."""
    transport = from_url(BROKERS[broker], namespace=transport_namespace())
    assert transport is not None, broker
    try:
        await transport.connect()
    except TransportError as exc:
        return str(exc)
    finally:
        await transport.aclose()
    return None


async def answering_brokers() -> list[str]:
    """The brokers whose servers answer; each one that does not is logged and skipped
    (a broker transport keeps its truth in the store, so its figures are taken on
    PostgreSQL, as a deployment would run it)."""
    brokers = []
    for broker in BROKERS:
        why = await broker_answers(broker)
        if why is None:
            brokers.append(broker)
        else:
            log(f"the {broker} transport's figures skipped: {why}")
    return brokers


async def delete_namespace(
    broker: str, namespace: str, queues: tuple[str, ...] = ("default",)
) -> None:
    """Remove the broker's queues (RabbitMQ) or streams (Redis) of `namespace`: a run's
    tokens left unconsumed would otherwise stay on the broker's disk."""
    if broker == "rabbitmq":
        connection = await aio_pika.connect(BROKERS[broker])
        try:
            channel = await connection.channel()
            for queue in queues:
                await channel.queue_delete(f"{namespace}.{queue}")
        finally:
            await connection.close()
        return
    client = aioredis.Redis.from_url(BROKERS[broker])
    try:
        keys = [key async for key in client.scan_iter(match=f"{namespace}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def machine(postgres: str = "n/a") -> dict[str, str]:
    """nproc, CPU model, RAM, OS, Python, date: what the figures were measured on."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    import sqlite3

    return {
        "nproc": str(os.cpu_count() or "?"),
        "cpu": model,
        "ram": ram,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql server": postgres,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def fmt(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def table_rows(results: list[Result]) -> list[list[str]]:
    counts = sorted({len(r.values) for r in results})
    runs_of = " or ".join(str(count) for count in counts) or "0"
    rows = [["benchmark", "database", f"figure (median of {runs_of})", "unit", "runs", "errors"]]
    for r in results:
        runs = " / ".join(fmt(v) for v in r.values) or "-"
        rows.append([r.benchmark, r.database, fmt(r.median), r.unit, runs, str(r.errors)])
    return rows


def text_table(results: list[Result]) -> str:
    rows = table_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: list[Result]) -> str:
    rows = table_rows(results)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)
