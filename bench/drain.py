"""Drain: no-op jobs/s that one in-process worker, or N `jobgate worker` processes, finish.

In-process: a backlog of N `noop` jobs is written straight through `jobs.create` (batches of
500, one transaction each; not timed), then one `Worker` is started in this process
and timed until every job is `succeeded`, or until the time limit (a `count(*)` polled
every 50 ms). The figure is succeeded jobs / elapsed time either way, so a run stays
bounded in time however slow the engine is, and a backlog bigger than one run can
drain keeps the worker busy to the end.

Processes: N `jobgate worker` processes start on the empty database and register;
then they are frozen (SIGSTOP), the backlog is written, and they are resumed
(SIGCONT). The clock runs from the resume to the last job done, so neither process
start-up nor writing the backlog is counted (the peers in `bench/peers` are timed the
same way).
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import text

from bench._common import (
    BROKERS,
    EVENTS,
    Result,
    analyze_postgres,
    delete_namespace,
    fresh_postgres,
    log,
    new_job,
    sqlite_url,
    temp_dir,
    transport_namespace,
)
from jobgate.blobs import open_blob_store
from jobgate.config import Settings
from jobgate.ids import now
from jobgate.pipelines import Registry
from jobgate.store import Database
from jobgate.store.repositories import jobs
from jobgate.transport import from_url
from jobgate.transport.outbox import OutboxRelay
from jobgate.worker import Worker

INSERT_BATCH = 500
POLL_S = 0.05
COUNT_DONE = text("SELECT count(*) FROM jobs WHERE status = 'succeeded'")


async def insert_noop_jobs(db: Database, registry: Registry, count: int) -> None:
    """`count` queued `noop` jobs, `INSERT_BATCH` per transaction."""
    for start in range(0, count, INSERT_BATCH):
        batch = [new_job(registry, "noop", {}) for _ in range(min(INSERT_BATCH, count - start))]
        async with db.write() as conn:
            await jobs.create(conn, batch, at=now())


async def _count_done(db: Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(COUNT_DONE)).scalar_one())


async def drain_once(
    database: str, count: int, concurrency: int, time_limit_s: float, broker: str = ""
) -> tuple[float, str]:
    """One run on a fresh database: (jobs/s, what happened). With `broker`, the worker
    takes its tasks through that transport: the backlog's tokens are published before
    the clock starts, as in `drain_processes_once`."""
    namespace = transport_namespace()
    with temp_dir("drain") as tmp:
        url = sqlite_url(tmp) if database == "sqlite" else await fresh_postgres()
        settings = Settings(
            _env_file=None,
            data_dir=tmp,
            database_url=url,
            blobs_url=(tmp / "blobs").as_uri(),
            log_level="WARNING",
        )
        db = Database(url, outbox=bool(broker))
        blobs = open_blob_store(settings.blobs_url)
        try:
            await db.create_all()
            registry = Registry.from_paths([])
            await insert_noop_jobs(db, registry, count)
            if broker:
                await _publish_backlog(db, broker, namespace)
            if database == "postgres":
                await analyze_postgres()
            worker = Worker(
                settings=settings,
                db=db,
                blobs=blobs,
                registry=registry,
                concurrency=concurrency,
                transport=from_url(BROKERS[broker], namespace=namespace) if broker else None,
            )
            lost_before = EVENTS.counts["lease_lost"]
            started = time.perf_counter()
            await worker.start()
            done = 0
            try:
                while done < count and time.perf_counter() - started < time_limit_s:
                    await asyncio.sleep(POLL_S)
                    done = await _count_done(db)
                elapsed = time.perf_counter() - started
            finally:
                await worker.stop(grace_s=0)
        finally:
            await blobs.aclose()
            await db.aclose()
            if broker:
                await delete_namespace(broker, namespace)
        lost = EVENTS.counts["lease_lost"] - lost_before
        note = f"{done}/{count} in {elapsed:.1f} s, {lost} spurious lease_lost warnings"
        return done / elapsed, note


async def _repeat(
    benchmark: str,
    database: str,
    runs: int,
    once: Callable[[], Awaitable[tuple[float, str]]],
    unit: str = "jobs/s",
) -> Result:
    """`runs` drains by `once`, each logged; their rates and notes as one result."""
    result = Result(benchmark=benchmark, database=database, unit=unit)
    notes: list[str] = []
    for n in range(runs):
        value, note = await once()
        log(f"{benchmark} {database} run {n + 1}: {value:,.1f} {unit} ({note})")
        result.values.append(value)
        notes.append(note)
    result.note = "; ".join(notes)
    return result


async def run(
    databases: list[str],
    *,
    count: int,
    concurrencies: list[int],
    time_limit_s: float,
    runs: int,
    brokers: list[str],
) -> list[Result]:
    """Per database and concurrency, `runs` drains by one in-process worker; then, on
    PostgreSQL, through each of `brokers` (x16)."""
    results: list[Result] = []
    for database in databases:
        for concurrency in concurrencies:
            results.append(
                await _repeat(
                    f"drain noop, 1 worker x{concurrency}",
                    database,
                    runs,
                    functools.partial(drain_once, database, count, concurrency, time_limit_s),
                )
            )
    for broker in brokers if "postgres" in databases else []:
        results.append(
            await _repeat(
                f"drain noop, 1 worker x16, {broker} transport",
                "postgres",
                runs,
                functools.partial(drain_once, "postgres", count, 16, time_limit_s, broker),
            )
        )
    return results


COUNT_WORKERS = text("SELECT count(*) FROM workers")


def _write_lock_free(path: Path) -> bool:
    """Whether a writer could start on the SQLite database at `path` right now."""
    conn = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


async def _freeze(workers: list[subprocess.Popen[bytes]], sqlite_file: Path | None) -> None:
    """SIGSTOP every worker. On SQLite, never while one holds the write lock (a heartbeat
    or an empty claim's transaction): a worker frozen with it would lock the backlog's
    inserts out until the run failed with "database is locked"."""
    for _ in range(50):
        for worker in workers:
            worker.send_signal(signal.SIGSTOP)
        if sqlite_file is None or await asyncio.to_thread(_write_lock_free, sqlite_file):
            return
        for worker in workers:
            worker.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.05)
    raise RuntimeError("the workers kept SQLite's write lock through 50 tries to freeze them")


async def drain_processes_once(
    database: str,
    count: int,
    processes: int,
    concurrency: int,
    time_limit_s: float,
    broker: str = "",
) -> tuple[float, str]:
    """One run with `processes` worker processes: (jobs/s, what happened). With `broker`,
    they take their tasks through that transport: the backlog's tokens wait in the outbox
    and are published before the workers are resumed (untimed, as an API process's relay
    would have published them as the jobs came in; the peers' backlogs are enqueued the
    same way)."""
    namespace = transport_namespace()
    with temp_dir("drainp") as tmp:
        url = sqlite_url(tmp) if database == "sqlite" else await fresh_postgres()
        db = Database(url, outbox=bool(broker))
        env = {
            **os.environ,
            "JOBGATE_DATABASE_URL": url,
            "JOBGATE_DATA_DIR": str(tmp),
            "JOBGATE_BLOBS_URL": (tmp / "blobs").as_uri(),
            "JOBGATE_LOG_LEVEL": "WARNING",
        }
        if broker:
            env["JOBGATE_TRANSPORT_URL"] = BROKERS[broker]
            env["JOBGATE_TRANSPORT_NAMESPACE"] = namespace
        jobgate = str(Path(sys.executable).with_name("jobgate"))
        # What `jobgate worker` expects, by the measured code's own migrations (under
        # `bench.compare` the other side's: a worker refuses a schema newer than it).
        await asyncio.to_thread(
            subprocess.run, [jobgate, "db", "upgrade"], env=env, check=True, capture_output=True
        )
        workers = [
            subprocess.Popen(
                [jobgate, "worker", "--concurrency", str(concurrency)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            for _ in range(processes)
        ]
        try:
            deadline = time.perf_counter() + 60
            while True:
                async with db.read() as conn:
                    registered = int((await conn.execute(COUNT_WORKERS)).scalar_one())
                if registered == processes:
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"only {registered}/{processes} workers registered")
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # let their first (empty) claims pass
            await _freeze(workers, tmp / "jobgate.db" if database == "sqlite" else None)
            await insert_noop_jobs(db, Registry.from_paths([]), count)
            if broker:
                published = await _publish_backlog(db, broker, namespace)
            if database == "postgres":
                await analyze_postgres()
            started = time.perf_counter()
            for worker in workers:
                worker.send_signal(signal.SIGCONT)
            done = 0
            while done < count and time.perf_counter() - started < time_limit_s:
                await asyncio.sleep(POLL_S)
                done = await _count_done(db)
            elapsed = time.perf_counter() - started
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGCONT)
                worker.terminate()
            for worker in workers:
                try:
                    worker.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
            await db.aclose()
            if broker:
                await delete_namespace(broker, namespace)
        note = f"{done}/{count} in {elapsed:.1f} s"
        if broker:
            note += f", {published} tokens published before the clock"
        return done / elapsed, note


async def _publish_backlog(db: Database, broker: str, namespace: str) -> int:
    """Publish the outbox's tokens to `broker` under `namespace`; how many."""
    transport = from_url(BROKERS[broker], namespace=namespace)
    assert transport is not None, broker
    try:
        await transport.connect()
        return await OutboxRelay(db, transport, poll_s=60).drain()
    finally:
        await transport.aclose()


async def relay_once(broker: str, count: int) -> tuple[float, str]:
    """Tokens/s one outbox relay publishes to `broker`: the tokens of `count` ready
    tasks (written untimed, with their jobs) taken from the store, published with the
    broker's acknowledgement, and deleted, batch by batch, as a `jobgate serve` relays
    its submits. It bounds how fast accepted jobs can reach a broker's workers."""
    namespace = transport_namespace()
    db = Database(await fresh_postgres(), outbox=True)
    transport = from_url(BROKERS[broker], namespace=namespace)
    assert transport is not None, broker
    try:
        await db.create_all()
        await insert_noop_jobs(db, Registry.from_paths([]), count)
        await analyze_postgres()
        await transport.connect()
        relay = OutboxRelay(db, transport, poll_s=60)
        cpu, started = time.process_time(), time.perf_counter()
        published = await relay.drain()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await transport.aclose()
        await db.aclose()
        await delete_namespace(broker, namespace)
    note = f"{published}/{count} in {elapsed:.2f} s, {cpu / published * 1e6:.0f} µs of CPU a token"
    return published / elapsed, note


async def run_relay(brokers: list[str], *, count: int, runs: int) -> list[Result]:
    """Per broker, `runs` relays of `count` tokens each (`relay_once`)."""
    return [
        await _repeat(
            f"outbox relay, {count:,} tokens, {broker} transport",
            "postgres",
            runs,
            functools.partial(relay_once, broker, count),
            unit="tokens/s",
        )
        for broker in brokers
    ]


async def run_processes(
    databases: list[str],
    *,
    count: int,
    shapes: list[tuple[int, int]],
    broker_shapes: list[tuple[int, int]],
    brokers: list[str],
    time_limit_s: float,
    runs: int,
) -> list[Result]:
    """Per database and shape (processes, concurrency each): `runs` drains; then, on
    PostgreSQL, each shape of `broker_shapes` through each of `brokers`."""
    results: list[Result] = []
    for database in databases:
        for processes, concurrency in shapes:
            results.append(
                await _repeat(
                    f"drain noop, {processes} worker processes x{concurrency}",
                    database,
                    runs,
                    functools.partial(
                        drain_processes_once, database, count, processes, concurrency, time_limit_s
                    ),
                )
            )
    for broker in brokers if "postgres" in databases else []:
        for processes, concurrency in broker_shapes:
            results.append(
                await _repeat(
                    f"drain noop, {processes} worker processes x{concurrency}, {broker} transport",
                    "postgres",
                    runs,
                    functools.partial(
                        drain_processes_once,
                        "postgres",
                        count,
                        processes,
                        concurrency,
                        time_limit_s,
                        broker,
                    ),
                )
            )
    return results
