"""The `EventBus` contract, run against every backend: in-process, PostgreSQL, Redis.

A bus wakes streams; it carries only "job X's log reached seq N". What every backend
must do: deliver each publication to every subscriber (as the change itself, or as a
None that says "anything may have changed"), keep each job's highest seq, split large
publications under the size limit, and never block or raise in `publish`, even with its
server gone.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import asyncpg  # type: ignore[import-untyped]
import pytest

from jobgate.bus import Changes, EventBus
from jobgate.bus.base import MAX_PAYLOAD_BYTES, decode, encode, origin_of
from jobgate.bus.memory import MemoryBus
from jobgate.bus.postgres import LISTENERS_TTL_S, PostgresBus
from jobgate.bus.redis import RedisBus
from tests.conftest import TCP_SERVICES

REDIS_URL = f"redis://{TCP_SERVICES['redis']}/0"
ARRIVAL_S = 10.0

BusFactory = Callable[[], EventBus]


class Received:
    """What one subscriber was told: merged changes, and how many "anything" wake-ups."""

    def __init__(self) -> None:
        self.changes: dict[str, int] = {}
        self.resyncs = 0
        self.updated = asyncio.Event()

    def __call__(self, changes: Changes | None) -> None:
        if changes is None:
            self.resyncs += 1
        else:
            for job_id, seq in changes.items():
                self.changes[job_id] = max(seq, self.changes.get(job_id, 0))
        self.updated.set()

    async def until(self, expected: dict[str, int]) -> None:
        async with asyncio.timeout(ARRIVAL_S):
            while any(self.changes.get(k, 0) < v for k, v in expected.items()):
                self.updated.clear()
                await self.updated.wait()


@pytest.fixture(
    params=[
        pytest.param("memory"),
        pytest.param("postgres", marks=pytest.mark.service("postgres")),
        pytest.param("redis", marks=pytest.mark.service("redis")),
    ]
)
async def buses(request: pytest.FixtureRequest) -> AsyncIterator[BusFactory]:
    """Make buses of one backend that share a channel (one process each, but for the
    in-process bus, which is one bus in one process)."""
    kind = request.param
    channel = f"jgtest_{uuid.uuid4().hex[:12]}"
    memory = MemoryBus()
    url = request.getfixturevalue("postgres_db_url") if kind == "postgres" else ""
    async with AsyncExitStack() as stack:

        def make() -> EventBus:
            bus: EventBus
            if kind == "memory":
                return memory
            if kind == "postgres":
                bus = PostgresBus(url, channel=channel)
            else:
                bus = RedisBus(REDIS_URL, namespace=channel)
            stack.push_async_callback(bus.aclose)
            return bus

        yield make


async def test_every_subscriber_hears_every_publication(buses: BusFactory) -> None:
    publisher = buses()
    one, two = Received(), Received()
    first, second = buses(), buses()
    first.subscribe(one)
    second.subscribe(two)
    for bus in {id(b): b for b in (publisher, first, second)}.values():
        await bus.start()
    publisher.publish({"job-a": 3, "job-b": 1})
    publisher.publish({"job-a": 5})
    for received in (one, two):
        await received.until({"job-a": 5, "job-b": 1})
    assert one.changes == {"job-a": 5, "job-b": 1}


async def test_a_process_hears_its_own_publication_once(buses: BusFactory) -> None:
    """The publishing bus's own subscribers hear a publication at once (no round trip
    through the server) and once: the server's echo of it is skipped."""
    publisher, other = buses(), buses()
    own, theirs = Received(), Received()
    calls: list[Changes | None] = []
    publisher.subscribe(own)
    publisher.subscribe(calls.append)
    if other is not publisher:
        other.subscribe(theirs)
        await other.start()
    await publisher.start()
    calls.clear()  # a (re)connection's "anything may have changed"
    publisher.publish({"job-a": 2})
    await asyncio.sleep(0)  # delivered on the loop, right after the publisher's call
    assert calls == [{"job-a": 2}]
    if other is not publisher:
        await theirs.until({"job-a": 2})  # the server has sent it round
        await asyncio.sleep(0.2)
    assert calls == [{"job-a": 2}]


async def test_a_large_publication_arrives_whole(buses: BusFactory) -> None:
    publisher, listener = buses(), buses()
    received = Received()
    listener.subscribe(received)
    await listener.start()
    await publisher.start()
    expected = {f"{uuid.uuid4()}": n for n in range(1, 3001)}
    publisher.publish(expected)
    await received.until(expected)
    assert received.changes == expected


async def test_publish_neither_blocks_nor_raises_with_the_server_gone() -> None:
    """Buses pointed at nothing: publishing returns at once; closing works."""
    for bus in (
        PostgresBus("postgresql+asyncpg://postgres@127.0.0.1:1/none"),
        RedisBus("redis://127.0.0.1:1/0"),
    ):
        received = Received()
        bus.subscribe(received)
        async with asyncio.timeout(8):
            await bus.start()  # gives up waiting after a while, keeps trying
        loop = asyncio.get_running_loop()
        started = loop.time()
        for n in range(1000):
            bus.publish({"job": n})
        assert loop.time() - started < 0.5
        with pytest.raises(Exception):  # noqa: B017, PT011 - any error: it is down
            await bus.ping()
        await bus.aclose()
        # This process's own streams still hear of its changes: they need no server.
        assert received.changes == {"job": 999}


def test_payloads_stay_under_the_limit_and_decode_to_the_same_changes() -> None:
    changes = {f"{uuid.uuid4()}": n for n in range(1, 1001)}
    payloads = encode(changes)
    assert len(payloads) > 1
    assert all(len(p.encode()) <= MAX_PAYLOAD_BYTES for p in payloads)
    merged: dict[str, int] = {}
    for payload in payloads:
        merged.update(decode(payload))
    assert merged == changes
    assert decode("garbage,:,job:x,job-1:7") == {"job-1": 7}


def test_a_payloads_origin_is_readable_and_skipped_by_decoding() -> None:
    changes = {f"{uuid.uuid4()}": n for n in range(1, 1001)}
    payloads = encode(changes, "proc-1")
    assert all(len(p.encode()) <= MAX_PAYLOAD_BYTES for p in payloads)
    assert {origin_of(p) for p in payloads} == {"proc-1"}
    merged: dict[str, int] = {}
    for payload in payloads:
        merged.update(decode(payload))
    assert merged == changes
    assert origin_of(encode({"job": 1})[0]) is None


class Overheard:
    """A plain `LISTEN` on a channel (not a bus): the changes PostgreSQL delivered."""

    def __init__(self) -> None:
        self.changes: list[dict[str, int]] = []

    def __call__(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if decoded := decode(payload):
            self.changes.append(decoded)

    async def some(self) -> list[dict[str, int]]:
        """What was heard, once something was (its own connection may lag a bus's)."""
        async with asyncio.timeout(ARRIVAL_S):
            while not self.changes:
                await asyncio.sleep(0.01)
        return self.changes


class Channel:
    """A fresh channel with a plain listener on it, and PostgreSQL buses to start on it
    (each a process of its own; closed with the channel)."""

    def __init__(self, url: str, stack: AsyncExitStack) -> None:
        self.url, self.stack = url, stack
        self.name = f"jgtest_{uuid.uuid4().hex[:12]}"
        self.overheard = Overheard()

    async def bus(self, listener: Received | None = None) -> PostgresBus:
        """A started bus; with `listener`, one that listens (an API process's)."""
        bus = PostgresBus(self.url, channel=self.name)
        if listener is not None:
            bus.subscribe(listener)
        self.stack.push_async_callback(bus.aclose)
        await bus.start()
        return bus


@pytest.fixture
async def channel(postgres_db_url: str) -> AsyncIterator[Channel]:
    raw = await asyncpg.connect(postgres_db_url.replace("postgresql+asyncpg", "postgresql"))
    async with AsyncExitStack() as stack:
        stack.push_async_callback(raw.close)
        made = Channel(postgres_db_url, stack)
        await raw.add_listener(made.name, made.overheard)
        yield made


@pytest.mark.service("postgres")
async def test_a_lone_postgres_bus_sends_nothing_until_another_process_listens(
    channel: Channel,
) -> None:
    """A bus with no other listening bus on its channel keeps its changes to its own
    process (a plain listener hears none of them); a bus that starts listening says so,
    and from then on the first one sends at once, not after its next look."""
    own, theirs = Received(), Received()
    first = await channel.bus(own)
    first.publish({"job-a": 1})
    await own.until({"job-a": 1})
    await asyncio.sleep(0.3)
    assert channel.overheard.changes == []
    await channel.bus(theirs)
    await asyncio.sleep(0.05)  # its word reaches the first bus
    first.publish({"job-a": 2})
    async with asyncio.timeout(LISTENERS_TTL_S / 2):
        await theirs.until({"job-a": 2})
    assert await channel.overheard.some() == [{"job-a": 2}]


@pytest.mark.service("postgres")
async def test_a_sender_that_does_not_listen_finds_a_listener_that_came_later(
    channel: Channel,
) -> None:
    """A worker's bus (it sends, it does not listen) sends nothing while no bus listens,
    and reaches one that started after it within `LISTENERS_TTL_S`."""
    received = Received()
    sender = await channel.bus()
    sender.publish({"job-a": 1})
    await asyncio.sleep(0.3)
    assert channel.overheard.changes == []
    await channel.bus(received)
    await asyncio.sleep(LISTENERS_TTL_S)
    sender.publish({"job-a": 2})
    await received.until({"job-a": 2})
    assert await channel.overheard.some() == [{"job-a": 2}]


@pytest.mark.service("postgres")
async def test_a_bus_whose_connection_name_was_rewritten_keeps_sending(
    channel: Channel,
) -> None:
    """Behind a proxy that rewrites `application_name`, no bus can find the others by
    name: a bus whose own name did not survive sends, as if others listened."""
    bus = await channel.bus(Received())
    await bus._conn.execute("SET application_name = 'rewritten-by-a-proxy'")
    bus.publish({"job-a": 1})
    assert await channel.overheard.some() == [{"job-a": 1}]
