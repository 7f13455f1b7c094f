"""Workers on RabbitMQ and Redis Streams: tokens through the outbox, outages survived.

Each test gives its workers a long idle poll, so jobs that finish in time were claimed
because a broker token arrived, not because a worker happened to look at the store.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import OperationalError

from jobgate.blobs import open_blob_store
from jobgate.config import Settings
from jobgate.ids import uuid7
from jobgate.pipelines import Pipeline, Registry
from jobgate.store import Database, pg
from jobgate.store.repositories import jobs as job_repo
from jobgate.store.tables import events, jobs, outbox
from jobgate.transport import from_url
from jobgate.transport import outbox as outbox_relay
from jobgate.transport.base import Transport, TransportError
from jobgate.transport.outbox import OutboxRelay
from jobgate.transport.rabbitmq import RabbitTransport
from jobgate.transport.redis import RedisStreamsTransport
from jobgate.worker import Worker
from tests.conftest import require_exclusive
from tests.engine import pipelines
from tests.engine.conftest import Engine
from tests.proxy import CuttableProxy

pytestmark = [pytest.mark.service("postgres"), pytest.mark.timeout(180)]

BROKERS = {
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    "redis": "redis://127.0.0.1:6379/0",
}


class BrokerEngine(Engine):
    """An engine whose workers each get their own connection to one broker."""

    transport_url: str = ""
    namespace: str = ""

    def transport(self) -> Transport:
        transport = from_url(self.transport_url, namespace=self.namespace)
        assert transport is not None
        return transport

    async def start_broker_worker(
        self, concurrency: int = 4, *, via: CuttableProxy | None = None
    ) -> Worker:
        """A worker with a transport of its own, connecting through `via` if given."""
        transport = self.transport()
        if via is not None:
            host = f"127.0.0.1:{via.port}"
            if isinstance(transport, RabbitTransport):
                url = f"amqp://guest:guest@{host}/"
                transport = RabbitTransport(url, namespace=self.namespace)
            else:
                url = f"redis://{host}/0"
                transport = RedisStreamsTransport(url, namespace=self.namespace)
        return await self.start_worker(concurrency, transport=transport)


@pytest.fixture(
    params=[
        pytest.param("rabbitmq", marks=pytest.mark.service("rabbitmq")),
        pytest.param("redis", marks=pytest.mark.service("redis")),
    ]
)
def broker(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def broker_engine(
    broker: str, postgres_db_url: str, tmp_path: Path
) -> AsyncIterator[BrokerEngine]:
    namespace = f"jgtest{time.monotonic_ns()}"
    settings = Settings(
        data_dir=tmp_path,
        database_url=postgres_db_url,
        transport_url=BROKERS[broker],
        transport_namespace=namespace,
        lease_s=2.0,
        worker_poll_interval_s=0.05,
        worker_idle_poll_s=60.0,
        cancel_grace_s=0.5,
        shutdown_grace_s=2.0,
        sweep_interval_s=0.5,
    )
    db = Database(postgres_db_url, outbox=True)
    blobs = open_blob_store((tmp_path / "blobs").as_uri())
    registry = Registry.from_paths([])
    for pipeline in pipelines.ALL:
        registry.add(pipeline)
    engine = BrokerEngine(settings=settings, db=db, blobs=blobs, registry=registry)
    engine.transport_url = BROKERS[broker]
    engine.namespace = namespace
    try:
        yield engine
    finally:
        for worker in engine.workers:
            await worker.stop(grace_s=0)
        await blobs.aclose()
        await db.aclose()
        await _delete_broker_queues(broker, namespace)


async def _delete_broker_queues(broker: str, namespace: str) -> None:
    if broker == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(BROKERS["redis"])
        try:
            keys = [key async for key in client.scan_iter(match=f"{namespace}:*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
        return
    import aio_pika

    connection = await aio_pika.connect(BROKERS["rabbitmq"])
    try:
        channel = await connection.channel()
        for queue in ("default", "gpu"):
            await channel.queue_delete(f"{namespace}.{queue}")
    finally:
        await connection.close()


def _without_caps(engine: Engine, *extra: Pipeline) -> None:
    """Give `engine` the built-in pipelines (and `extra`) only. With a concurrency cap
    anywhere, a worker claims without a token after each of its stages, which would
    hide what the tokens do."""
    registry = Registry.from_paths([])
    for pipeline in extra:
        registry.add(pipeline)
    engine.registry = registry


async def _statuses(engine: Engine) -> dict[str, int]:
    async with engine.db.read() as conn:
        rows = await conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status))
        return {status: int(n) for status, n in rows}


async def _outbox_size(engine: Engine) -> int:
    async with engine.db.read() as conn:
        return int(await conn.scalar(select(func.count()).select_from(outbox)) or 0)


async def _until(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def _outbox_drains(engine: Engine) -> None:
    """The outbox empties soon after the last job ends. Not at once: a token claims the
    best ready task of its queue, not its own, so a job may end before the relay has
    published (and deleted) the token written for its last stage; that token is then one
    spare wake-up. Soon, not at the relay's 60 s poll: every commit wakes the relay."""

    async def empty() -> bool:
        return await _outbox_size(engine) == 0

    await _until(empty, timeout=10, what="the relay to publish every token left")


async def _terminal_events_per_job(engine: Engine) -> dict[str, int]:
    async with engine.db.read() as conn:
        rows = await conn.execute(
            select(events.c.job_id, func.count())
            .where(events.c.type.in_(["completed", "error", "cancelled"]))
            .group_by(events.c.job_id)
        )
        return {job_id: int(n) for job_id, n in rows}


async def test_jobs_run_on_broker_tokens(broker_engine: BrokerEngine) -> None:
    """Multi-stage jobs (a diamond DAG and timed steps) run to the end on two workers
    woken only by tokens; the outbox ends empty."""
    await broker_engine.start_broker_worker(concurrency=4)
    await broker_engine.start_broker_worker(concurrency=4)
    ids = [await broker_engine.submit("diamond") for _ in range(10)]
    ids += [await broker_engine.submit("steps", {"steps": 3, "step_ms": 5}) for _ in range(10)]
    for job_id in ids:
        snapshot = await broker_engine.wait(job_id, timeout=30)
        assert snapshot.job["status"] == "succeeded"
    await _outbox_drains(broker_engine)
    assert await _terminal_events_per_job(broker_engine) == dict.fromkeys(ids, 1)


async def test_retries_are_published_when_due(broker_engine: BrokerEngine) -> None:
    """A stage that fails once is retried after its backoff, through a token published
    when the retry is due (not at once, not at the 60 s poll)."""
    await broker_engine.start_broker_worker(concurrency=2)
    job_id = await broker_engine.submit(
        "steps", {"steps": 2, "step_ms": 1, "fail_at": 1, "fail_attempts": 1}
    )
    snapshot = await broker_engine.wait(job_id, timeout=30)
    assert snapshot.job["status"] == "succeeded"
    assert broker_engine.stage(snapshot, "work")["attempt"] == 2


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=60)


def _stop_broker(broker: str) -> None:
    require_exclusive()
    if broker == "rabbitmq":
        _run("rabbitmqctl", "stop_app")
    else:
        _run("redis-cli", "shutdown", "nosave")


def _start_broker(broker: str) -> None:
    if broker == "rabbitmq":
        _run("rabbitmqctl", "start_app")
        _run("rabbitmqctl", "await_startup")
    else:
        _run(
            "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
            "--save", "", "--appendonly", "no",
        )  # fmt: skip


@pytest.mark.disruptive
async def test_submits_during_a_broker_outage_run_when_it_returns(
    broker: str, broker_engine: BrokerEngine
) -> None:
    """With the broker down, jobs are accepted and wait in the outbox; none is lost or
    run twice, and all run once the broker is back."""
    await broker_engine.start_broker_worker(concurrency=4)
    await asyncio.to_thread(_stop_broker, broker)
    try:
        ids = [await broker_engine.submit("steps", {"steps": 2, "step_ms": 1}) for _ in range(30)]
        await asyncio.sleep(1.5)
        assert await _statuses(broker_engine) == {"queued": 30}
        assert await _outbox_size(broker_engine) == 30
    finally:
        await asyncio.to_thread(_start_broker, broker)

    async def all_done() -> bool:
        return await _statuses(broker_engine) == {"succeeded": 30}

    await _until(all_done, timeout=90, what="every job to succeed after the outage")
    await _outbox_drains(broker_engine)
    assert await _terminal_events_per_job(broker_engine) == dict.fromkeys(ids, 1)


@pytest.mark.disruptive
async def test_a_broker_restart_under_1000_jobs_loses_none(
    broker: str, broker_engine: BrokerEngine
) -> None:
    """Restart the broker while 1,000 jobs run: every job succeeds exactly once, and the
    run goes on at once after the restart.

    Each job sleeps 2 x 40 ms, so the 1,000 take several seconds on 16 slots and the
    broker goes down with most of them still to run.

    Redis keeps nothing on disk here, so tokens it held are gone after the restart: the
    workers, told their consumers are back, claim from the store until it has nothing
    ready, rather than wait for their idle poll (60 s).
    """
    _without_caps(broker_engine)
    await broker_engine.start_broker_worker(concurrency=8)
    await broker_engine.start_broker_worker(concurrency=8)
    total = 1000
    async with broker_engine.db.write() as conn:
        pipeline = broker_engine.registry.get("steps")
        new = [
            job_repo.NewJob(
                id=uuid7(),
                pipeline=pipeline,
                owner="owner-1",
                params=pipeline.validate_params({"steps": 2, "step_ms": 40}),
                files=[],
                priority=0,
                budget_usd=1.0,
                estimated_usd=0.0,
            )
            for _ in range(total)
        ]
        await job_repo.create(conn, new, at=time.time())
    for worker in broker_engine.workers:
        worker.wake()

    async def some_done() -> bool:
        return (await _statuses(broker_engine)).get("succeeded", 0) >= 50

    await _until(some_done, timeout=60, what="the run to get going")
    done_before = (await _statuses(broker_engine)).get("succeeded", 0)
    await asyncio.to_thread(_stop_broker, broker)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(_start_broker, broker)
    assert done_before < total / 2  # the broker went down mid-run

    async def all_done() -> bool:
        return await _statuses(broker_engine) == {"succeeded": total}

    # About 5 s of work was left; well under the idle poll.
    await _until(all_done, timeout=40, what="all 1,000 jobs to succeed after the restart")
    terminal = await _terminal_events_per_job(broker_engine)
    assert len(terminal) == total
    assert set(terminal.values()) == {1}


async def test_a_partitioned_worker_s_tokens_go_to_another_worker(
    broker: str, broker_engine: BrokerEngine
) -> None:
    """A worker cut off from its broker by a partition (packets dropped, connections left
    open) holds the tokens handed to its dead connection; they reach a live worker well
    before the 60 s idle poll. RabbitMQ gives them on once it finds the connection dead
    (its default 60 s heartbeat took over 90 s); Redis lets another consumer take over
    entries idle for `claim_idle_s` (it was 30 s, checked every 10 s)."""
    _without_caps(broker_engine, pipelines.napper)
    proxy = CuttableProxy(5672 if broker == "rabbitmq" else 6379)
    try:
        await broker_engine.start_broker_worker(concurrency=4, via=proxy)
        await broker_engine.start_broker_worker(concurrency=4)
        warm_up = await broker_engine.submit("nap")
        await broker_engine.wait(warm_up, timeout=30)

        proxy.blackhole()
        started = time.monotonic()
        ids = [await broker_engine.submit("nap") for _ in range(8)]
        for job_id in ids:
            snapshot = await broker_engine.wait(job_id, timeout=30)
            assert snapshot.job["status"] == "succeeded"
        # About 15 s here. RabbitMQ finds the dead connection in ~13 s (a 5 s heartbeat);
        # Redis hands entries idle for 15 s on; the cut-off worker's relay held a token
        # for its publish's timeout (10 s).
        assert time.monotonic() - started < 30
    finally:
        proxy.heal()
        proxy.close()
    assert await _terminal_events_per_job(broker_engine) == dict.fromkeys([warm_up, *ids], 1)


async def test_a_relay_woken_as_it_closes_stops_at_once(broker_engine: BrokerEngine) -> None:
    """`aclose` ends the relay at once even when a wake-up and the cancellation reach its
    wait in the same turn of the event loop. (Python 3.11's `asyncio.wait_for` swallowed
    such a cancellation, and the relay went on to its next poll, a minute away.)"""
    transport = broker_engine.transport()
    relay = OutboxRelay(broker_engine.db, transport, poll_s=60)
    try:
        await relay.start()
        await _until(lambda: _idle(relay), timeout=10, what="the relay to wait")
        relay.wake()
        started = time.monotonic()
        await relay.aclose()
        assert time.monotonic() - started < 2
    finally:
        await transport.aclose()


async def test_two_relays_publish_each_token_once(broker_engine: BrokerEngine) -> None:
    """Relays of several processes share the outbox: a token one relay took is not
    another's to take, so 2,500 tokens drained by two relays at once are published 2,500
    times in all, and the outbox ends empty."""
    total = 2500
    async with broker_engine.db.write() as conn:
        await conn.execute(
            insert(outbox), [{"queue": "default", "available_at": time.time()}] * total
        )
    transports = [broker_engine.transport(), broker_engine.transport()]
    relays = [OutboxRelay(broker_engine.db, t, poll_s=60) for t in transports]
    try:
        for transport in transports:
            await transport.connect()
        drained = await asyncio.gather(*(relay.drain() for relay in relays))
    finally:
        for transport in transports:
            await transport.aclose()
    assert sum(drained) == total
    assert all(drained), f"one relay published everything: {drained}"
    assert await _outbox_size(broker_engine) == 0


async def test_tokens_a_dead_relay_took_are_published_when_its_hold_ends(
    broker_engine: BrokerEngine,
) -> None:
    """A relay that took tokens and died before publishing them (no put-back, no
    delete) holds them for the time its take set (`TAKEN_FOR_S`; 1.5 s here): no other
    relay publishes them before, and another relay publishes each once after."""
    hold_s = 1.5
    async with broker_engine.db.write() as conn:
        await conn.execute(insert(outbox), [{"queue": "default", "available_at": time.time()}] * 3)
    at = time.time()
    async with broker_engine.db.autocommit() as conn:  # the dead relay's last act
        taken = await pg.records(conn, outbox_relay._TAKE, at, at + hold_s, outbox_relay.BATCH)
    assert len(taken) == 3
    relay_transport, consumer_transport = broker_engine.transport(), broker_engine.transport()
    relay = OutboxRelay(broker_engine.db, relay_transport, poll_s=60)
    received: list[float] = []

    async def consume() -> None:
        async for token in consumer_transport.consume(["default"], prefetch=10):
            received.append(time.time())
            await token.ack()

    consumer = asyncio.create_task(consume())
    try:
        await relay.start()
        relay.wake()
        await _until(lambda: len(received) == 3, timeout=10, what="the held tokens")
        await asyncio.sleep(0.3)  # and no more
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await relay.aclose()
        await relay_transport.aclose()
        await consumer_transport.aclose()
    assert len(received) == 3
    assert min(received) >= at + hold_s
    assert await _outbox_size(broker_engine) == 0


async def test_tokens_a_failed_publish_took_are_due_again_at_once(
    broker: str, broker_engine: BrokerEngine
) -> None:
    """A relay whose publish fails (here: nothing listens on the broker's port) puts the
    tokens it took back, due at once, for the next try; they are not held."""
    async with broker_engine.db.write() as conn:
        await conn.execute(insert(outbox), [{"queue": "default", "available_at": time.time()}] * 2)
    unreachable = from_url(BROKERS[broker].replace(":5672", ":1").replace(":6379", ":1"))
    assert unreachable is not None
    relay = OutboxRelay(broker_engine.db, unreachable, poll_s=60)
    try:
        with pytest.raises(TransportError):
            await relay.drain()
    finally:
        await unreachable.aclose()
    async with broker_engine.db.read() as conn:
        due = (await conn.execute(select(outbox.c.available_at))).scalars().all()
    assert len(due) == 2
    assert max(due) <= time.time()


async def test_a_store_error_between_rounds_does_not_end_the_relay(
    broker_engine: BrokerEngine,
) -> None:
    """A relay whose look for the next due token fails (the database restarting, its
    connection dropped) logs it and goes on: a token committed afterwards is published,
    and the relay closes cleanly. The error used to end the relay's task for good and
    silently: the process published no token again, and closing it raised. (A probe
    hit it by terminating the server's connections; the failure is injected here, at
    the one place it did harm.)"""
    transport, consumer_transport = broker_engine.transport(), broker_engine.transport()
    relay = OutboxRelay(broker_engine.db, transport, poll_s=60)
    look = relay._next_due
    failed = asyncio.Event()

    async def look_failing_once() -> float:
        if not failed.is_set():
            failed.set()
            raise OperationalError(
                "SELECT min(outbox.available_at) FROM outbox",
                {},
                ConnectionResetError("connection was closed in the middle of operation"),
            )
        return await look()

    relay._next_due = look_failing_once  # type: ignore[method-assign]
    tokens = consumer_transport.consume(["default"], prefetch=10)
    try:
        await relay.start()
        await asyncio.wait_for(failed.wait(), 10)
        async with broker_engine.db.write() as conn:
            await conn.execute(insert(outbox), [{"queue": "default", "available_at": time.time()}])
        relay.wake()
        token = await asyncio.wait_for(anext(tokens), 10)
        await token.ack()
        await _outbox_drains(broker_engine)  # deleted once confirmed
    finally:
        await relay.aclose()
        await transport.aclose()
        await consumer_transport.aclose()


async def _idle(relay: OutboxRelay) -> bool:
    """Whether the relay has connected and is waiting for a wake-up."""
    await asyncio.sleep(0.05)
    return relay._connected and not relay._wakeup.is_set()
