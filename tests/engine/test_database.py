"""`Database` and the fast path on the real PostgreSQL: the pool outlives dead
connections; plain-SQL inserts store what SQLAlchemy stores, in the same transaction."""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError

from jobgate.errors import NotFound
from jobgate.pipelines import Registry
from jobgate.store import database as database_module
from jobgate.store import pg
from jobgate.store.database import Database
from jobgate.store.repositories import events as event_repo
from jobgate.store.repositories import jobs as job_repo
from jobgate.store.repositories import outcomes
from jobgate.store.tables import events, jobs, outbox, owner_clocks, tasks

pytestmark = pytest.mark.service("postgres")
POOLED = 3


async def _on_held(db: Database, count: int, query: str) -> set[Any]:
    """Hold `count` pooled connections at once; what `query` answers on each."""
    answers: set[Any] = set()
    entered = asyncio.Barrier(count)

    async def one() -> None:
        async with db.write() as conn:
            answers.add(await conn.scalar(text(query)))
            await entered.wait()

    await asyncio.gather(*(one() for _ in range(count)))
    return answers


async def _backend_pids(db: Database, count: int) -> set[int]:
    """Hold `count` pooled connections at once; their server pids."""
    return {int(pid) for pid in await _on_held(db, count, "SELECT pg_backend_pid()")}


async def _terminate(url: str, pids: set[int]) -> None:
    parsed = make_url(url)
    admin = await asyncpg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, database=parsed.database
    )
    try:
        for pid in pids:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


async def test_idle_pooled_connections_killed_by_the_server_are_replaced(
    postgres_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server drops every pooled connection (a restart, an idle timeout, an admin):
    the next transactions after a pause all succeed, on new connections."""
    monkeypatch.setattr(database_module, "IDLE_PING_S", 0.05)
    db = Database(postgres_db_url)
    try:
        killed = await _backend_pids(db, POOLED)
        assert len(killed) == POOLED
        await _terminate(postgres_db_url, killed)
        await asyncio.sleep(0.1)
        fresh = await _backend_pids(db, POOLED)
        assert fresh.isdisjoint(killed)
    finally:
        await db.aclose()


async def test_a_session_stopped_inside_a_transaction_is_ended_and_frees_its_locks(
    postgres_db_url: str,
) -> None:
    """A process that stops mid-transaction (frozen, or cut off by a partition) holding
    a row lock: the server ends its session after the idle-in-transaction timeout, so
    another writer gets the row in seconds, not when TCP gives up hours later."""
    holder = Database(postgres_db_url, idle_in_transaction_s=0.5)
    other = Database(postgres_db_url)
    try:
        async with other.write() as conn:
            await conn.execute(insert(jobs).values(_job_row("idle-lock-job")))
        waited: list[float] = []

        async def lock_then_stop() -> None:
            async with holder.write() as conn:
                await conn.execute(
                    select(jobs.c.id).where(jobs.c.id == "idle-lock-job").with_for_update()
                )
                started = asyncio.get_running_loop().time()
                async with other.write() as waiting:
                    await waiting.execute(text("SET LOCAL lock_timeout = '10s'"))
                    await waiting.execute(update_job_status("idle-lock-job", "running"))
                waited.append(asyncio.get_running_loop().time() - started)
                await conn.execute(text("SELECT 1"))  # the session is gone

        with pytest.raises(DBAPIError):
            await lock_then_stop()
        assert 0.3 < waited[0] < 5
        async with other.read() as conn:
            status = await conn.scalar(select(jobs.c.status).where(jobs.c.id == "idle-lock-job"))
        assert status == "running"
    finally:
        async with other.write() as conn:
            await conn.execute(jobs.delete().where(jobs.c.id == "idle-lock-job"))
        await holder.aclose()
        await other.aclose()


def update_job_status(job_id: str, status: str) -> Any:
    return jobs.update().where(jobs.c.id == job_id).values(status=status)


def _job_row(job_id: str, **changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": job_id,
        "pipeline": "noop",
        "pipeline_version": "1",
        "owner": "alice",
        "status": "queued",
        "cancel_requested": False,
        "priority": 0,
        "params": {"n": 1, "nested": {"xs": [1.5, None, "é"]}},
        "files": [],
        "correlation_id": None,
        "webhook": None,
        "estimated_usd": 0.0,
        "actual_usd": 0.0,
        "budget_usd": 1.0,
        "progress": 0.0,
        "records_expected": 0,
        "records_succeeded": 0,
        "records_failed": 0,
        "last_seq": 1,
        "fair_key": 100.0,
        "created_at": 100.0,
    }
    row.update(changes)
    return row


async def test_fast_path_inserts_store_what_sqlalchemy_stores(postgres_db_url: str) -> None:
    """The same rows through `pg.insert_many` and through SQLAlchemy read back equal,
    JSON None (stored as JSON null) and SQL NULLs included, constant columns or not."""
    db = Database(postgres_db_url)
    varied = [
        _job_row("pg-1", priority=5, correlation_id="c"),
        _job_row("pg-2", params={}, webhook={"url": "https://x.test"}, cancel_requested=True),
        _job_row(
            "pg-3",
            fair_key=7.25,
            budget_usd=0.1,
            correlation_id='a "quote", a\nnewline\t\\ é ✓ \u2028',
            params={"big": 10**30, "tiny": 5e-324, "huge": 1.7976931348623157e308},
        ),
    ]
    try:
        async with db.write() as conn:
            await conn.execute(insert(jobs), [{**r, "id": "sa" + r["id"][2:]} for r in varied])
            await pg.insert_many(
                conn, [(jobs, varied), (outbox, [{"queue": "q", "available_at": 1.0}] * 3)]
            )
        async with db.read() as conn:
            stored = {r["id"]: dict(r) for r in (await conn.execute(select(jobs))).mappings()}
            null_kinds = (
                await conn.execute(
                    text(
                        "SELECT left(id, 2), webhook IS NULL, count(*) FROM jobs"
                        " WHERE webhook IS NULL OR webhook = 'null'::jsonb GROUP BY 1, 2"
                    )
                )
            ).all()
            tokens = (await conn.execute(select(outbox.c.queue))).scalars().all()
    finally:
        await db.aclose()
    for n in (1, 2, 3):
        assert {**stored[f"pg-{n}"], "id": None} == {**stored[f"sa-{n}"], "id": None}
    assert stored["pg-2"]["webhook"] == {"url": "https://x.test"}
    # None is stored the way SQLAlchemy stores it (JSON null or SQL NULL alike)
    assert sorted(tuple(r)[1:] for r in null_kinds if r[0] == "pg") == sorted(
        tuple(r)[1:] for r in null_kinds if r[0] == "sa"
    )
    assert sum(r[2] for r in null_kinds) == 4
    assert tokens == ["q", "q", "q"]  # every column constant: still one row each


async def test_fast_path_keeps_equal_values_of_other_types_apart(postgres_db_url: str) -> None:
    """`1 == 1.0 == True` in Python, yet each is its own value: a column holding them
    is not sent as one constant, and each row reads back with its own."""
    db = Database(postgres_db_url)
    kinds: list[Any] = [1, 1.0, True]
    try:
        async with db.write() as conn:
            await pg.insert_many(
                conn,
                [(jobs, [_job_row(f"k-{i}", params={"x": v}) for i, v in enumerate(kinds)])],
            )
        async with db.read() as conn:
            params = dict((await conn.execute(select(jobs.c.id, jobs.c.params))).all())
    finally:
        await db.aclose()
    for i, v in enumerate(kinds):
        stored = params[f"k-{i}"]["x"]
        assert (stored, type(stored)) == (v, type(v))


async def test_fast_path_sends_one_nan_throughout_as_a_constant(postgres_db_url: str) -> None:
    """A float column holding the same NaN in every row is one constant parameter (as
    `list.count` sees it, `nan is nan`): JSON has no NaN, so as an array it would fail."""
    db = Database(postgres_db_url)
    nan = float("nan")
    try:
        async with db.write() as conn:
            await pg.insert_many(
                conn, [(jobs, [_job_row(f"nan-{i}", estimated_usd=nan) for i in range(3)])]
            )
        async with db.read() as conn:
            stored = (await conn.execute(select(jobs.c.estimated_usd))).scalars().all()
    finally:
        await db.aclose()
    assert len(stored) == 3
    assert all(math.isnan(value) for value in stored), stored


async def test_fast_path_inserts_return_the_ids_of_keyed_rows(postgres_db_url: str) -> None:
    """`keyed` tables give back the id of each row by its key (rows without one are
    left out), one mapping per table asked, whichever columns are constant."""
    db = Database(postgres_db_url)
    event_rows = [
        {"job_id": job_id, "seq": seq, "type": "message", "data": {}, "created_at": 1.0}
        for job_id in ("k-a", "k-b")
        for seq in (1, 2)
    ]
    try:
        async with db.write() as conn:
            inserted = await pg.insert_many(
                conn,
                [
                    (jobs, [_job_row("k-a", last_seq=2), _job_row("k-b", last_seq=2)]),
                    (events, event_rows),
                    (outbox, [{"queue": q, "available_at": 1.0} for q in ("x", "y", "z")]),
                ],
                keyed=[(events, "job_id || '/' || seq"), (outbox, "nullif(queue, 'y')")],
            )
        async with db.read() as conn:
            stored_events = {
                f"{row.job_id}/{row.seq}": row.id
                for row in await conn.execute(select(events.c.id, events.c.job_id, events.c.seq))
            }
            stored_tokens = {
                row.queue: row.id
                for row in await conn.execute(select(outbox.c.id, outbox.c.queue))
                if row.queue != "y"
            }
    finally:
        await db.aclose()
    assert inserted.ids == [stored_events, stored_tokens]
    assert len(stored_events) == 4


class Abandoned(Exception):
    """Raised to roll a transaction back."""


async def test_fast_path_inserts_commit_and_roll_back_with_the_transaction(
    postgres_db_url: str,
) -> None:
    db = Database(postgres_db_url)
    try:
        seen_inside = None
        with contextlib.suppress(Abandoned):
            async with db.write() as conn:
                await pg.insert_many(conn, [(jobs, [_job_row("gone")])])
                # SQLAlchemy's next statement sees the row: one transaction
                seen_inside = await conn.scalar(select(func.count()).select_from(jobs))
                raise Abandoned
        assert seen_inside == 1
        async with db.write() as conn:
            await conn.execute(insert(jobs), [_job_row("kept-sa")])
            await pg.insert_many(conn, [(jobs, [_job_row("kept-pg")])])
        async with db.read() as conn:
            ids = set((await conn.execute(select(jobs.c.id))).scalars())
    finally:
        await db.aclose()
    assert ids == {"kept-sa", "kept-pg"}


async def test_a_one_statement_submit_on_autocommit_is_all_or_nothing(
    postgres_db_url: str,
) -> None:
    """On an autocommit connection a submit is one statement: when any of its rows is
    refused, none is stored and the owner's fair-share clock does not move."""
    db = Database(postgres_db_url)
    registry = Registry.from_paths([])
    noop = registry.get("noop")

    def job(job_id: str) -> job_repo.NewJob:
        return job_repo.NewJob(
            id=job_id,
            pipeline=noop,
            owner="alice",
            params=noop.validate_params({}),
            files=[],
            priority=0,
            budget_usd=1.0,
            estimated_usd=0.0,
        )

    async def counts() -> tuple[float, int, int, int]:
        async with db.read() as conn:
            clock = await conn.scalar(select(owner_clocks.c.clock))
            return (
                float(clock),
                await conn.scalar(select(func.count()).select_from(jobs)),
                await conn.scalar(select(func.count()).select_from(tasks)),
                await conn.scalar(select(func.count()).select_from(events)),
            )

    try:
        assert not job_repo.needs_transaction([job("a"), job("b")])
        async with db.autocommit() as conn:
            await job_repo.create(conn, [job("first")], at=100.0)
        before = await counts()
        with pytest.raises(IntegrityError):  # SQLAlchemy's, as for its own statements
            async with db.autocommit() as conn:
                await job_repo.create(conn, [job("second"), job("first")], at=200.0)
        assert await counts() == before
        async with db.autocommit() as conn:
            (snapshot,) = await job_repo.create(conn, [job("third")], at=300.0)
        async with db.read() as conn:
            stored = await conn.scalar(select(jobs.c.fair_key).where(jobs.c.id == "third"))
        assert snapshot.job["fair_key"] == stored == 300.0  # the clock started at now
    finally:
        await db.aclose()


async def test_a_fast_path_statement_on_a_dead_connection_retires_the_pool(
    postgres_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no idle ping in the way, a plain-SQL statement that finds its connection dead
    fails once, and makes SQLAlchemy drop the pool: the next writes get new connections
    (a dead one handed out again would fail every autocommit write it is given)."""
    monkeypatch.setattr(database_module, "IDLE_PING_S", 3600.0)
    db = Database(postgres_db_url)
    try:
        killed = await _backend_pids(db, POOLED)
        await _terminate(postgres_db_url, killed)
        await asyncio.sleep(0.1)
        failures = 0
        for n in range(POOLED + 2):
            try:
                async with db.autocommit() as conn:
                    await pg.insert_many(conn, [(jobs, [_job_row(f"after-{n}")])])
            except (OSError, asyncpg.InterfaceError, asyncpg.PostgresError):
                failures += 1
        async with db.read() as conn:
            stored = (await conn.execute(select(jobs.c.id))).scalars().all()
    finally:
        await db.aclose()
    assert failures == 1
    assert len(stored) == POOLED + 1


async def _autocommit_pid(db: Database) -> int:
    async with db.autocommit() as conn:
        return int(await pg.value(conn, "SELECT pg_backend_pid()"))


async def test_autocommit_connections_stay_set_up_between_uses(
    postgres_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One statement at a time reuses one connection; a burst keeps at most a quarter of
    the pool aside; a kept connection the server killed is replaced after a pause, not
    failed on; closing the database closes the kept ones."""
    monkeypatch.setattr(database_module, "IDLE_PING_S", 0.05)
    db = Database(postgres_db_url, pool_size=8)
    try:
        first = await _autocommit_pid(db)
        assert {await _autocommit_pid(db) for _ in range(5)} == {first}
        assert db.engine.pool.checkedout() == 1  # kept, not handed back

        started = asyncio.Barrier(6)

        async def busy() -> int:
            async with db.autocommit() as conn:
                await started.wait()
                return int(await pg.value(conn, "SELECT pg_backend_pid()"))

        assert len(set(await asyncio.gather(*(busy() for _ in range(6))))) == 6
        assert db.engine.pool.checkedout() == 2  # 8 // 4 kept, the rest handed back

        kept = await _autocommit_pid(db)
        await _terminate(postgres_db_url, {kept})
        await asyncio.sleep(0.1)
        assert await _autocommit_pid(db) != kept
        last = await _autocommit_pid(db)
    finally:
        await db.aclose()
    assert db.engine.pool.checkedout() == 0
    admin = await asyncpg.connect(postgres_db_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        for _ in range(40):
            alive = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", last
            )
            if not alive:
                break
            await asyncio.sleep(0.05)
        assert not alive
    finally:
        await admin.close()


async def test_autocommit_connections_use_generic_plans_and_hand_none_back_to_the_pool(
    postgres_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept autocommit connections run their prebuilt statements on generic plans; a
    connection they hand back to the pool (a burst's extra, one whose statement failed,
    one idle past the ping) is as the pool lent it, so other statements keep theirs."""
    monkeypatch.setattr(database_module, "IDLE_PING_S", 3600.0)
    db = Database(postgres_db_url, pool_size=4)  # a pool of 4 + 4, 1 kept aside
    try:
        started = asyncio.Barrier(4)

        async def busy() -> str:
            async with db.autocommit() as conn:
                await started.wait()
                return str(await pg.value(conn, "SHOW plan_cache_mode"))

        assert await asyncio.gather(*(busy() for _ in range(4))) == ["force_generic_plan"] * 4
        assert db.engine.pool.checkedout() == 1  # 3 handed back
        with pytest.raises(asyncpg.DivisionByZeroError):
            async with db.autocommit() as conn:
                await pg.value(conn, "SELECT 1 / 0")
        assert db.engine.pool.checkedout() == 0
        monkeypatch.setattr(database_module, "IDLE_PING_S", 0.0)
        async with db.autocommit() as conn:
            await pg.value(conn, "SELECT 1")
        await asyncio.sleep(0.01)
        async with db.autocommit() as conn:  # the kept one is idle past the ping: back
            await pg.value(conn, "SELECT 1")
        assert db.engine.pool.checkedout() == 1
        assert await _on_held(db, 7, "SHOW plan_cache_mode") == {"auto"}
    finally:
        await db.aclose()


async def test_a_kept_connection_the_server_closed_is_not_handed_out(
    postgres_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no idle ping in the way, a kept autocommit connection that the server ended
    while it sat idle is dropped when next taken: the statement runs on a new one."""
    monkeypatch.setattr(database_module, "IDLE_PING_S", 3600.0)
    db = Database(postgres_db_url)
    try:
        killed = await _autocommit_pid(db)
        await _terminate(postgres_db_url, {killed})
        await asyncio.sleep(0.2)  # the end of stream reaches the client
        assert await _autocommit_pid(db) != killed
    finally:
        await db.aclose()


def _fatal_error_message() -> bytes:
    """A server's `ErrorResponse` as sent to a connection a shutdown terminates."""
    fields = b"".join(
        kind + text + b"\0"
        for kind, text in (
            (b"S", b"FATAL"),
            (b"V", b"FATAL"),
            (b"C", b"57P01"),
            (b"M", b"terminating connection due to administrator command"),
        )
    )
    body = fields + b"\0"
    return b"E" + (len(body) + 4).to_bytes(4, "big") + body


async def test_a_statement_caught_between_a_shutdown_message_and_its_end_is_an_outage(
    postgres_db_url: str,
) -> None:
    """A restart's "terminating connection" reaches an idle connection a moment before
    its end of stream; a statement sent in between is refused by the driver. That is a
    lost connection (an outage: 503 and retry), never a 500, and it is not used again."""
    db = Database(postgres_db_url)
    try:
        async with db.autocommit() as conn:
            raw = await pg.driver(conn)
            server_pid = int(await raw.fetchval("SELECT pg_backend_pid()"))
        # What the server sends before it exits; its end of stream follows right after.
        raw._protocol.data_received(_fatal_error_message())
        asyncio.get_running_loop().call_soon(raw._transport.abort)
        with pytest.raises(ConnectionResetError) as lost:
            async with db.autocommit() as conn:
                await pg.value(conn, "SELECT 1")
        assert database_module.is_outage(lost.value)
        assert await _autocommit_pid(db) != server_pid
    finally:
        await db.aclose()


@pytest.mark.parametrize("use", ["read", "write"])
async def test_a_sqlalchemy_statement_caught_after_a_shutdown_message_is_an_outage(
    postgres_db_url: str, use: str
) -> None:
    """The same race on a pooled connection, for statements SQLAlchemy runs: the driver
    refuses the statement while the connection does not look closed yet (its end of
    stream has not arrived). SQLAlchemy must still see a lost connection: an outage
    (503), and the connection is dropped, not handed out again."""
    db = Database(postgres_db_url)
    try:
        async with getattr(db, use)() as conn:
            raw = await pg.driver(conn)
            server_pid = int(await raw.fetchval("SELECT pg_backend_pid()"))
        raw._protocol.data_received(_fatal_error_message())
        with pytest.raises(DBAPIError) as lost:
            async with getattr(db, use)() as conn:
                await conn.execute(text("SELECT 1"))
        assert database_module.is_outage(lost.value), repr(lost.value)
        async with db.read() as conn:
            assert int(await conn.scalar(text("SELECT pg_backend_pid()"))) != server_pid
    finally:
        await db.aclose()


async def test_autocommit_announces_only_what_its_own_use_appended(postgres_db_url: str) -> None:
    """A kept connection carries no changes from one use to the next: a use that fails
    announces nothing, and the next announces only its own."""
    db = Database(postgres_db_url)
    announced: list[dict[str, int]] = []
    db.on_changes = lambda changes: announced.append(dict(changes))
    try:
        with contextlib.suppress(RuntimeError):
            async with db.autocommit() as conn:
                event_repo.note(conn, "failed-job", 3)
                raise RuntimeError("the use fails after noting a change")
        async with db.autocommit() as conn:
            event_repo.note(conn, "next-job", 1)
        async with db.autocommit() as conn:
            await pg.value(conn, "SELECT 1")
    finally:
        await db.aclose()
    assert announced == [{"next-job": 1}]


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
async def test_counting_active_jobs_reads_only_active_ones(database: Database) -> None:
    """The active-jobs cap counts with the partial index of queued and running jobs, so
    an owner's thousands of finished jobs cost the count nothing."""
    columns = (
        "id, pipeline, pipeline_version, owner, status, cancel_requested, priority, params, "
        "files, estimated_usd, actual_usd, budget_usd, progress, records_expected, "
        "records_succeeded, records_failed, last_seq, fair_key, created_at"
    )
    finished = 5000 if not database.is_sqlite else 2000
    async with database.write() as conn:
        for n in range(finished + 3):
            status = "succeeded" if n < finished else ("queued", "running", "queued")[n - finished]
            await conn.execute(
                text(
                    f"INSERT INTO jobs ({columns}) VALUES (:id, 'noop', '1', 'busy', :status, "
                    "false, 0, '{}', '[]', 0, 0, 1, 0, 0, 0, 0, 0, 0, 0)"
                ),
                {"id": f"job-{n:05d}", "status": status},
            )
    async with database.write() as conn:
        await conn.execute(text("ANALYZE jobs"))
        assert await job_repo.count_active(conn, "busy") == 3
        assert await job_repo.count_active(conn, "nobody") == 0
        query = job_repo._COUNT_ACTIVE.params(owner="busy")
        sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
        explain = "EXPLAIN QUERY PLAN " if database.is_sqlite else "EXPLAIN "
        plan = " ".join(str(row[-1]) for row in await conn.execute(text(explain + sql)))
    assert "ix_jobs_owner_active" in plan


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
async def test_the_sweep_reads_only_leased_tasks(database: Database) -> None:
    """The lease-expiry index holds leased tasks alone (migration 0008): the sweep finds
    the lapsed lease and the lost worker's task through it, not by reading the
    thousands of tasks waiting for a worker."""
    waiting = 5000 if not database.is_sqlite else 2000

    def task(n: int, **lease: Any) -> dict[str, Any]:
        return {
            "job_id": f"job-{n:05d}", "stage": "run", "item_index": None, "queue": "default",
            "owner": "o", "pipeline": "noop", "sort_key": float(n), "available_at": 0.0,
            "attempt": 0, "deliveries": 0, "created_at": 0.0, "leased_by": None,
            "lease_token": None, "lease_expires_at": None, **lease,
        }  # fmt: skip

    def leased(n: int, worker: str, expires_at: float) -> dict[str, Any]:
        return task(n, leased_by=worker, lease_token=f"t-{n}", lease_expires_at=expires_at)

    rows = [task(n) for n in range(waiting)] + [
        leased(waiting, "w-alive", 50.0),  # lapsed at 100
        leased(waiting + 1, "w-lost", 500.0),  # live, but its worker was lost
        leased(waiting + 2, "w-alive", 500.0),  # live
    ]
    async with database.write() as conn:
        await conn.execute(insert(tasks), rows)
    query = outcomes.lapsed_leases(100.0, ["w-lost"], 100)
    async with database.write() as conn:
        await conn.execute(text("ANALYZE tasks"))
        found = [row["job_id"] for row in (await conn.execute(query)).mappings()]
        sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
        explain = "EXPLAIN QUERY PLAN " if database.is_sqlite else "EXPLAIN "
        plan = " ".join(str(row[-1]) for row in await conn.execute(text(explain + sql)))
    assert found == [f"job-{waiting:05d}", f"job-{waiting + 1:05d}"]
    assert "ix_tasks_lease_expires_at" in plan, plan
    assert "Seq Scan" not in plan, plan


async def test_statements_moving_the_same_clocks_in_any_order_do_not_deadlock(
    postgres_db_url: str,
) -> None:
    """Two owners' jobs written together, in either order, by many statements at once:
    the owners' clock rows are locked in one order, so none waits on another in a
    cycle, and each clock moves one stride per job."""
    db = Database(postgres_db_url, pool_size=8)
    noop = Registry.from_paths([]).get("noop")

    def job(owner: str, n: int) -> job_repo.NewJob:
        return job_repo.NewJob(
            id=f"{owner}-{n}", pipeline=noop, owner=owner, params={}, files=[],
            priority=0, budget_usd=1.0, estimated_usd=0.0,
        )  # fmt: skip

    async def write(n: int) -> None:
        owners = ("x", "y") if n % 2 else ("y", "x")
        async with db.autocommit() as conn:
            await job_repo.create(conn, [job(o, n) for o in owners], at=100.0, stride_s=1.0)

    try:
        await asyncio.gather(*(write(n) for n in range(40)))
        async with db.read() as conn:
            clocks = {row.owner: row.clock for row in await conn.execute(select(owner_clocks))}
            keys = (await conn.execute(select(jobs.c.owner, jobs.c.fair_key))).all()
    finally:
        await db.aclose()
    assert clocks == {"x": 140.0, "y": 140.0}
    for owner in ("x", "y"):
        assert sorted(key for who, key in keys if who == owner) == [100.0 + i for i in range(40)]


async def test_events_for_a_job_that_does_not_exist_are_refused_and_not_written(
    database: Database,
) -> None:
    """Events name their job without a foreign key (migration 0007); the append takes
    its numbers from the job's row, so without the row it fails and writes nothing."""
    with pytest.raises(NotFound):
        async with database.write() as conn:
            await event_repo.append(conn, "no-such-job", [("log", {"message": "x"})], at=1.0)
    async with database.read() as conn:
        assert (await conn.execute(select(func.count()).select_from(events))).scalar_one() == 0
