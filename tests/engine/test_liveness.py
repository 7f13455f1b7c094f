"""Liveness and sweeping on PostgreSQL (docs/liveness.md): one elected leader sweeps,
each worker's LISTEN connection vouches for it, and an idle fleet barely touches the
database."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import make_url

from jobgate.blobs import open_blob_store
from jobgate.blobs.base import BlobStore
from jobgate.config import Settings
from jobgate.ids import now, uuid7
from jobgate.pipelines import Registry
from jobgate.store import Database
from jobgate.store.repositories import jobs
from jobgate.store.repositories import tasks as task_repo
from jobgate.store.repositories import workers as worker_repo
from jobgate.store.tables import events, tasks, workers
from jobgate.store.tables import jobs as jobs_table
from jobgate.transport import wakeups as wakeups_module
from jobgate.transport.wakeups import asyncpg_dsn
from jobgate.webhooks import WebhookSender
from jobgate.worker import Worker
from tests.conftest import POSTGRES_DSN

pytestmark = pytest.mark.service("postgres")

JOBGATE = str(Path(sys.executable).parent / "jobgate")
SETTLE_S = 3.0
WINDOW_S = 125.0  # past two minutes: every poller of an idle worker comes in it
LOST_AFTER_S = Settings.model_fields["worker_lost_after_s"].default


@pytest.fixture
async def admin() -> AsyncIterator[Any]:
    """A connection to another database, so that its own statements are not counted."""
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def blobs(tmp_path: Path) -> AsyncIterator[BlobStore]:
    store = open_blob_store((tmp_path / "blobs").as_uri())
    try:
        yield store
    finally:
        await store.aclose()


async def _leaders(admin: Any, database: str) -> list[str]:
    """The application_name of each session holding an advisory lock in `database`."""
    rows = await admin.fetch(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND a.datname = $1",
        database,
    )
    return [row[0] for row in rows]


class StatementCounter:
    """A TCP proxy in front of PostgreSQL that counts, per client `application_name`,
    the statements clients run (simple queries and executions of prepared ones,
    `BEGIN` and `COMMIT` included), the transactions the server ends (`ReadyForQuery`
    back to idle), and the notifications it delivers (each one costs the listening
    backend a transaction of its own).

    The server's own counters cannot be trusted on a shared server: an idle backend
    also commits a transaction each time DDL anywhere in the cluster makes it catch up
    on cache invalidations, and it reports statements that touch no table only later.
    """

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.statements: Counter[str] = Counter()
        self.transactions: Counter[str] = Counter()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        server, to_server = await asyncio.open_connection(*self.upstream)
        try:
            while True:  # the startup packet, after refusing SSL or GSS encryption
                head = await client.readexactly(8)
                length, code = struct.unpack("!ii", head)
                body = await client.readexactly(length - 8)
                if code in (80877103, 80877104):
                    to_client.write(b"N")
                    continue
                to_server.write(head + body)
                break
            fields = body.split(b"\0")
            options = dict(zip(fields[::2], fields[1::2], strict=False))
            name = options.get(b"application_name", b"").decode()
            await asyncio.gather(
                self._pump(client, to_server, name, from_client=True),
                self._pump(server, to_client, name, from_client=False),
            )
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            to_server.close()
            to_client.close()

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        name: str,
        *,
        from_client: bool,
    ) -> None:
        ready = 0
        try:
            while True:
                head = await source.readexactly(5)
                body = await source.readexactly(struct.unpack("!i", head[1:])[0] - 4)
                kind = head[:1]
                if from_client and kind in (b"Q", b"E"):
                    self.statements[name] += 1
                elif not from_client and kind == b"A":
                    self.transactions[name] += 1
                elif not from_client and kind == b"Z" and body == b"I":
                    ready += 1
                    if ready > 1:  # the first one only says the connection is ready
                        self.transactions[name] += 1
                sink.write(head + body)
                await sink.drain()
        finally:
            sink.close()


@pytest.mark.timeout(200)
async def test_ten_idle_workers_make_less_than_one_transaction_a_second(
    postgres_db_url: str, tmp_path: Path, admin: Any, blobs: BlobStore
) -> None:
    """Ten idle workers, each with its own pool and webhook sender as ten `jobgate
    worker` processes would have, with the default settings, over a window of more
    than two minutes (it holds the heartbeats and claim polls, once a minute, and the
    senders' polls, every two): under one transaction a second, and no follower's
    connection sends anything but its heartbeat (docs/liveness.md)."""
    url = make_url(postgres_db_url)
    assert url.database is not None
    counter = StatementCounter(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=await counter.start())
    proxied_url = proxied.render_as_string(hide_password=False)
    settings = Settings(data_dir=tmp_path, database_url=proxied_url)
    pools = [Database(proxied_url) for _ in range(10)]
    fleet = [_one_slot_worker(settings, db, blobs) for db in pools]
    senders = [WebhookSender(db, settings) for db in pools]
    try:
        for worker, sender in zip(fleet, senders, strict=True):
            await worker.start()
            await sender.start()
        await asyncio.sleep(SETTLE_S)
        assert counter.transactions.total() > 10  # it does see the workers start
        statements = counter.statements.copy()
        transactions = counter.transactions.total()
        started = time.monotonic()
        await asyncio.sleep(WINDOW_S)
        elapsed = time.monotonic() - started
        per_second = (counter.transactions.total() - transactions) / elapsed
        sent = (counter.statements.total() - statements.total()) / elapsed
        print(f"10 idle workers: {per_second:.2f} transactions/s, {sent:.2f} statements/s")
        [leader] = await _leaders(admin, url.database)
        # A follower's LISTEN connection sends its once-a-minute heartbeat, nothing more.
        heartbeats = math.ceil(WINDOW_S / settings.worker_heartbeat_s)
        busy_followers = {
            name: count - statements[name]
            for name, count in counter.statements.items()
            if name.startswith("jobgate-worker:")
            and name != leader
            and count - statements[name] > heartbeats
        }
        assert busy_followers == {}
        assert per_second < 1.0
    finally:
        for sender in senders:
            await sender.aclose()
        for worker in fleet:
            await worker.stop(grace_s=0)
        for db in pools:
            await db.aclose()
        await counter.aclose()


async def _submit(db: Database, pipeline: str, params: dict[str, Any]) -> str:
    chosen = Registry.from_paths([]).get(pipeline)
    job = jobs.NewJob(
        id=uuid7(),
        pipeline=chosen,
        owner="o",
        params=chosen.validate_params(params),
        files=[],
        priority=0,
        budget_usd=1,
        estimated_usd=0,
    )
    async with db.write() as conn:
        await jobs.create(conn, [job], at=now())
    return job.id


def _start_process_worker(
    url: str, tmp_path: Path, name: str, **settings: str
) -> subprocess.Popen[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("JOBGATE_")},
        "JOBGATE_DATABASE_URL": url,
        "JOBGATE_DATA_DIR": str(tmp_path / "data"),
        "JOBGATE_LOG_FORMAT": "json",
        **{f"JOBGATE_{key.upper()}": value for key, value in settings.items()},
    }
    return subprocess.Popen(
        [JOBGATE, "worker", "--concurrency", "1", "--id", name],
        env=env,
        stdout=(tmp_path / f"{name}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )


async def _until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found:
            return found
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("killed", ["follower", "leader"])
async def test_a_sigkilled_workers_stage_is_requeued_within_lost_after(
    postgres_db_url: str, tmp_path: Path, admin: Any, blobs: BlobStore, killed: str
) -> None:
    """SIGKILL a worker process mid-stage (default settings, 30 s lease): another worker
    requeues the stage within `JOBGATE_WORKER_LOST_AFTER_S`, whether it already led or
    had to take the lead over from the killed worker."""
    database = make_url(postgres_db_url).database
    assert database is not None
    db = Database(postgres_db_url)
    settings = Settings(data_dir=tmp_path, database_url=postgres_db_url)
    # It takes nothing from the default queue: only the killed worker runs the stage.
    survivor = _one_slot_worker(settings, db, blobs, "survivor", queues=["elsewhere"])
    doomed = None
    try:
        if killed == "follower":
            await survivor.start()
        doomed = _start_process_worker(postgres_db_url, tmp_path, "doomed")
        if killed == "leader":
            doomed_name = worker_repo.application_name("doomed")

            async def doomed_leads() -> bool:
                return await _leaders(admin, database) == [doomed_name]

            await _until(doomed_leads, 20, "the doomed worker never led")
            await survivor.start()
        survivor_name = worker_repo.application_name("survivor")
        expected_leader = survivor_name if killed == "follower" else doomed_name
        assert await _leaders(admin, database) == [expected_leader]
        job_id = await _submit(db, "steps", {"steps": 600, "step_ms": 100})

        await _until(
            lambda: _work_leased_to(db, job_id, "doomed"),
            20,
            "the doomed worker never claimed the stage",
        )
        await asyncio.sleep(1.0)  # mid-stage
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)
        killed_at = time.monotonic()

        async def requeued() -> bool:
            async with db.read() as conn:
                token = await conn.scalar(
                    select(tasks.c.lease_token).where(tasks.c.job_id == job_id)
                )
            return token is None

        await _until(requeued, LOST_AFTER_S + 5, "the stage was never requeued")
        recovered_in = time.monotonic() - killed_at
        print(f"{killed} killed: its stage was requeued {recovered_in:.1f} s later")
        assert recovered_in < LOST_AFTER_S
        assert await _leaders(admin, database) == [survivor_name]
        async with db.read() as conn:
            data = [row[0] for row in await conn.execute(select(events.c.data))]
            left = [row[0] for row in await conn.execute(select(workers.c.id))]
        lost = [d for d in data if (d.get("error") or {}).get("type") == "lost"]
        assert len(lost) == 1
        assert left == ["survivor"]
    finally:
        if doomed is not None and doomed.poll() is None:
            doomed.kill()
            doomed.wait()
        await survivor.stop(grace_s=0)
        await db.aclose()


async def test_application_names_match_in_python_and_sql(postgres_db_url: str) -> None:
    """The name a worker's connection carries is the one the sweeper looks for, even for
    ids PostgreSQL would cut short or mangle."""
    db = Database(postgres_db_url)
    ids = ["w-1", "host.example-123-abcdef", "x" * 48, "x" * 49, "héllo", "tab\there"]
    try:
        for worker_id in ids:
            conn = await asyncpg.connect(
                asyncpg_dsn(postgres_db_url),
                server_settings={"application_name": worker_repo.application_name(worker_id)},
            )
            try:
                async with db.write() as sa:
                    await worker_repo.register(sa, _row(worker_id, last_seen_at=now() - 3600))
                async with db.read() as sa:
                    found = await sa.scalar(
                        select(workers.c.id).where(
                            workers.c.id == worker_id, worker_repo.connected()
                        )
                    )
                assert found == worker_id
                assert len(conn.get_settings().application_name.encode()) <= 63
            finally:
                await conn.close()
    finally:
        await db.aclose()


def _row(worker_id: str, *, last_seen_at: float) -> dict[str, Any]:
    return {
        "id": worker_id,
        "host": "h",
        "pid": 1,
        "queues": ["default"],
        "pipelines": ["noop"],
        "concurrency": 1,
        "running": 0,
        "version": "0",
        "started_at": last_seen_at,
        "last_seen_at": last_seen_at,
    }


async def test_a_connected_worker_is_live_between_rare_heartbeats(
    postgres_db_url: str, tmp_path: Path, blobs: BlobStore
) -> None:
    """`GET /v1/workers` lists a worker whose last heartbeat is older than the lost
    window while its connection is open, and no longer once it is gone."""
    db = Database(postgres_db_url)
    settings = Settings(data_dir=tmp_path, database_url=postgres_db_url)
    worker = _one_slot_worker(settings, db, blobs)

    async def listed() -> list[str]:
        alive = worker_repo.is_live(
            dialect="postgresql",
            at=now(),
            lost_after_s=settings.worker_lost_after_s,
            heartbeat_s=settings.worker_heartbeat_s,
        )
        async with db.read() as conn:
            return [row[0] for row in await conn.execute(select(workers.c.id).where(alive))]

    try:
        await worker.start()
        async with db.write() as conn:
            await conn.execute(
                update(workers).values(last_seen_at=now() - settings.worker_lost_after_s - 5)
            )
        assert await listed() == [worker.id]
        await worker.stop(grace_s=0)
        async with db.write() as conn:  # as if it had been killed: its row stays
            await worker_repo.register(
                conn, _row(worker.id, last_seen_at=now() - settings.worker_lost_after_s - 5)
            )
        assert await listed() == []
    finally:
        await worker.stop(grace_s=0)
        await db.aclose()


async def test_a_worker_cut_off_from_listen_but_heartbeating_is_not_lost(
    postgres_db_url: str, tmp_path: Path, admin: Any, blobs: BlobStore
) -> None:
    """A worker whose LISTEN connection is gone for good, but that still reaches the
    database, heartbeats every 5 s instead: for longer than the lost window the leader
    leaves its running stage alone."""
    database = make_url(postgres_db_url).database
    db = Database(postgres_db_url)
    settings = Settings(data_dir=tmp_path, database_url=postgres_db_url)
    leader = _one_slot_worker(settings, db, blobs, "leader", ["elsewhere"])
    cut = _one_slot_worker(settings, db, blobs, "cut")
    try:
        await leader.start()
        await cut.start()
        job_id = await _submit(db, "steps", {"steps": 300, "step_ms": 100})

        async def lease() -> str | None:
            async with db.read() as conn:
                row = (
                    await conn.execute(
                        select(tasks.c.leased_by, tasks.c.lease_token).where(
                            tasks.c.job_id == job_id, tasks.c.stage == "work"
                        )
                    )
                ).first()
            return row.lease_token if row is not None and row.leased_by == "cut" else None

        # The long stage: its short first stage may still hold a lease of its own.
        token = await _until(lease, 20, "the stage never started")
        assert cut._wakeups is not None
        cut._wakeups._dsn = "postgresql://postgres@127.0.0.1:1/nowhere"  # no reconnecting
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND application_name = $2",
            database,
            worker_repo.application_name("cut"),
        )
        assert killed == 1
        await asyncio.sleep(LOST_AFTER_S + 2)
        assert await lease() == token
        async with db.read() as conn:
            assert "cut" in [row[0] for row in await conn.execute(select(workers.c.id))]
    finally:
        await cut.stop(grace_s=0)
        await leader.stop(grace_s=0)
        await db.aclose()


async def test_a_stopping_leader_hands_over_at_once(
    postgres_db_url: str, tmp_path: Path, admin: Any, blobs: BlobStore
) -> None:
    """A leader that stops unlocks and says so: a follower leads within a second."""
    database = make_url(postgres_db_url).database
    db = Database(postgres_db_url)
    settings = Settings(data_dir=tmp_path, database_url=postgres_db_url)
    first, second = (_one_slot_worker(settings, db, blobs, name) for name in ("first", "second"))
    try:
        await first.start()
        await second.start()
        assert await _leaders(admin, database) == [worker_repo.application_name("first")]
        await first.stop()
        stopped = time.monotonic()

        async def second_leads() -> bool:
            return await _leaders(admin, database) == [worker_repo.application_name("second")]

        await _until(second_leads, 5, "nobody took the lead over")
        assert time.monotonic() - stopped < 1.5
    finally:
        await first.stop(grace_s=0)
        await second.stop(grace_s=0)
        await db.aclose()


async def test_the_sweep_check_runs_through_the_pool_too(postgres_db_url: str) -> None:
    """The check a leader runs on its own connection also runs through SQLAlchemy (a
    worker cut off from LISTEN sweeps that way): expired leases and absent workers."""
    db = Database(postgres_db_url)
    try:
        job_id = await _submit(db, "noop", {})
        async with db.write() as conn:
            await worker_repo.register(conn, _row("ghost", last_seen_at=now() - 100))
            await conn.execute(
                update(tasks)
                .where(tasks.c.job_id == job_id)
                .values(leased_by="ghost", lease_token="t", lease_expires_at=now() - 1)
            )
        check = worker_repo.sweep_check(
            at=now(),
            silent_before=now() - 75,
            busy_silent_before=now() - 10,
            busy_every_s=2,
            idle_every_s=30,
        )
        async with db.read() as conn:
            found = worker_repo.SweepCheck.from_row((await conn.execute(check)).mappings().one())
        assert (found.busy, found.expired, found.next_check_s) == (True, True, 2.0)
        assert [(s.id, s.connected, s.busy) for s in found.suspects] == [("ghost", False, True)]
    finally:
        await db.aclose()


@pytest.mark.timeout(120)
async def test_a_stopped_leader_is_deposed_and_its_zombie_stage_cannot_commit(
    postgres_db_url: str, tmp_path: Path, admin: Any, blobs: BlobStore
) -> None:
    """SIGSTOP the leading worker mid-stage: its connection, and so its lock, live on.
    Another worker deposes it after `JOBGATE_WORKER_LOST_AFTER_S` of silence, sweeps
    its expired lease and runs the stage. After SIGCONT the zombie writes nothing: the
    job has one `completed` event, from the second attempt."""
    database = make_url(postgres_db_url).database
    assert database is not None
    db = Database(postgres_db_url)
    lost_after_s = 5.0
    settings = Settings(
        data_dir=tmp_path, database_url=postgres_db_url, worker_lost_after_s=lost_after_s
    )
    survivor = _one_slot_worker(settings, db, blobs, "survivor")
    zombie = _start_process_worker(postgres_db_url, tmp_path, "zombie", lease_s="3")
    zombie_name = worker_repo.application_name("zombie")
    try:

        async def zombie_leads() -> bool:
            return await _leaders(admin, database) == [zombie_name]

        await _until(zombie_leads, 20, "the zombie never led")
        job_id = await _submit(db, "steps", {"steps": 40, "step_ms": 100})

        await _until(
            lambda: _work_leased_to(db, job_id, "zombie"), 20, "the zombie never claimed the stage"
        )
        await asyncio.sleep(0.5)  # mid-stage
        zombie.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        await survivor.start()

        async def finished() -> bool:
            async with db.read() as conn:
                status = await conn.scalar(
                    select(jobs_table.c.status).where(jobs_table.c.id == job_id)
                )
            return status == "succeeded"

        await _until(finished, 60, "the job never finished")
        print(f"finished {time.monotonic() - stopped_at:.1f} s after the SIGSTOP")
        assert await _leaders(admin, database) == [worker_repo.application_name("survivor")]
        before = await _events_of(db, job_id)
        zombie.send_signal(signal.SIGCONT)
        await asyncio.sleep(4.0)  # the zombie's stage runs on and tries to finish
        after = await _events_of(db, job_id)
        assert after == before, "the zombie wrote to a job it had lost"
        assert [kind for kind, _ in after].count("completed") == 1
        attempts = {
            data.get("attempt")
            for kind, data in after
            if kind == "stage_update"
            and data.get("stage") == "work"
            and data["status"] == "running"
        }
        assert attempts == {1, 2}
    finally:
        if zombie.poll() is None:
            zombie.send_signal(signal.SIGCONT)
            zombie.kill()
            zombie.wait()
        await survivor.stop(grace_s=0)
        await db.aclose()


async def _events_of(db: Database, job_id: str) -> list[tuple[str, Any]]:
    async with db.read() as conn:
        rows = await conn.execute(
            select(events.c.type, events.c.data)
            .where(events.c.job_id == job_id)
            .order_by(events.c.seq)
        )
        return [(row.type, row.data) for row in rows]


@pytest.mark.timeout(120)
async def test_a_follower_asks_an_idle_leader_to_beacon_rather_than_depose_it(
    postgres_db_url: str,
    tmp_path: Path,
    admin: Any,
    blobs: BlobStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A leader that said "idle" checks every 30 s; a task that no notification
    announced (not due yet) leaves it silent that long. A follower that finds tasks and
    hears nothing asks it to beacon, and leaves a live leader in place."""
    monkeypatch.setattr(wakeups_module, "_IDLE_PATIENCE_S", 2.0)
    database = make_url(postgres_db_url).database
    assert database is not None
    db = Database(postgres_db_url)
    settings = Settings(data_dir=tmp_path, database_url=postgres_db_url, worker_lost_after_s=3.0)

    # On another queue: the task below stays waiting.
    leader, follower = (
        _one_slot_worker(settings, db, blobs, name, queues=["elsewhere"])
        for name in ("leader", "follower")
    )
    try:
        await leader.start()
        await follower.start()
        await asyncio.sleep(3.0)  # the leader's first check says "idle"
        session = await _leader_session(admin, database)
        with monkeypatch.context() as unannounced:  # as for a task not due yet
            unannounced.setattr(task_repo, "ready_tokens", lambda *_a, **_k: ([], False))
            await _submit(db, "noop", {})
        # Unasked, the follower would depose it after 2 + 3 s (+ 7 s of patience).
        await asyncio.sleep(15.0)
        assert await _leaders(admin, database) == [worker_repo.application_name("leader")]
        assert await _leader_session(admin, database) == session, "the leader was deposed"
    finally:
        await follower.stop(grace_s=0)
        await leader.stop(grace_s=0)
        await db.aclose()


async def _leader_session(admin: Any, database: str) -> int:
    """The backend pid of the session holding the leader's lock."""
    pid: int = await admin.fetchval(
        "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND a.datname = $1",
        database,
    )
    return pid


async def _work_leased_to(db: Database, job_id: str, worker: str) -> bool:
    """Whether `worker` holds the lease of the job's `work` stage."""
    async with db.read() as conn:
        leased = await conn.scalar(
            select(tasks.c.leased_by).where(tasks.c.job_id == job_id, tasks.c.stage == "work")
        )
    return bool(leased == worker)


def _one_slot_worker(
    settings: Settings,
    db: Database,
    blobs: BlobStore,
    name: str | None = None,
    queues: list[str] | None = None,
) -> Worker:
    """An in-process worker of the built-in pipelines, one stage at a time."""
    return Worker(
        settings=settings,
        db=db,
        blobs=blobs,
        registry=Registry.from_paths([]),
        concurrency=1,
        queues=queues,
        worker_id=name,
    )
