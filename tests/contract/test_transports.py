"""The `Transport` contract, run against every broker backend (RabbitMQ, Redis Streams)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

import aio_pika
import pytest
import redis.asyncio as aioredis

from jobgate.transport import from_url
from jobgate.transport.base import Delivery, Transport, TransportError
from jobgate.transport.rabbitmq import RabbitTransport
from jobgate.transport.redis import RedisStreamsTransport
from tests.conftest import TCP_SERVICES
from tests.proxy import CuttableProxy

RABBITMQ_URL = f"amqp://guest:guest@{TCP_SERVICES['rabbitmq']}/"
REDIS_URL = f"redis://{TCP_SERVICES['redis']}/0"
QUEUES = ("a", "b")
CLAIM_IDLE_S = 0.5  # Redis: how soon a dead consumer's tokens are taken over
QUIET_S = 0.6  # how long "nothing arrives" is watched for
ARRIVAL_S = 10.0  # how long a token may take to arrive


class Broker:
    """Transports of one backend in a namespace of their own, removed afterwards."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.namespace = f"jgtest{uuid.uuid4().hex[:12]}"
        self._made: list[Transport] = []

    def transport(self, *, via: CuttableProxy | None = None) -> Transport:
        """A new transport (a process of its own, as far as the broker can tell),
        connecting through `via` if given."""
        made: Transport
        if self.kind == "rabbitmq":
            url = RABBITMQ_URL if via is None else f"amqp://guest:guest@127.0.0.1:{via.port}/"
            made = RabbitTransport(url, namespace=self.namespace)
        else:
            url = REDIS_URL if via is None else f"redis://127.0.0.1:{via.port}/0"
            made = RedisStreamsTransport(url, namespace=self.namespace, claim_idle_s=CLAIM_IDLE_S)
        self._made.append(made)
        return made

    async def aclose(self) -> None:
        for made in self._made:
            await made.aclose()
        await delete_namespace(self.kind, self.namespace)


async def delete_namespace(kind: str, namespace: str) -> None:
    """Remove the queues (RabbitMQ) or streams (Redis) of a test's namespace."""
    if kind == "rabbitmq":
        connection = await aio_pika.connect(RABBITMQ_URL)
        try:
            channel = await connection.channel()
            for queue in QUEUES:
                await channel.queue_delete(f"{namespace}.{queue}")
        finally:
            await connection.close()
    else:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [key async for key in client.scan_iter(match=f"{namespace}:*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


@pytest.fixture(
    params=[
        pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.service("rabbitmq")),
        pytest.param("redis", id="redis", marks=pytest.mark.service("redis")),
    ]
)
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    """Each backend, with a namespace of its own for this test."""
    made = Broker(str(request.param))
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture
async def transport(broker: Broker) -> Transport:
    """A connected transport of each backend."""
    made = broker.transport()
    await made.connect()
    return made


async def take(tokens: AsyncIterator[Delivery], n: int) -> list[Delivery]:
    """The next `n` deliveries, failing if they take longer than `ARRIVAL_S`."""
    async with asyncio.timeout(ARRIVAL_S):
        return [await anext(tokens) for _ in range(n)]


async def nothing_arrives(tokens: AsyncIterator[Delivery], within: float = QUIET_S) -> bool:
    """Whether no delivery arrives for `within` seconds."""
    try:
        async with asyncio.timeout(within):
            await anext(tokens)
    except TimeoutError:
        return True
    return False


def queues_of(deliveries: Sequence[Delivery]) -> list[str]:
    return sorted(delivery.queue for delivery in deliveries)


# -- publish and consume ----------------------------------------------------------------


async def test_each_published_token_is_delivered_once(transport: Transport) -> None:
    """N tokens published are N deliveries, each naming its jobgate queue."""
    await transport.publish(["a", "b", "a", "a"])
    tokens = transport.consume(["a", "b"], prefetch=10)

    deliveries = await take(tokens, 4)

    assert queues_of(deliveries) == ["a", "a", "a", "b"]
    assert await nothing_arrives(tokens)


async def test_a_consumer_started_first_gets_later_tokens(transport: Transport) -> None:
    """A consumer waiting on queues nobody has published to yet gets the first token."""
    tokens = transport.consume(["a"], prefetch=1)
    assert await nothing_arrives(tokens)

    await transport.publish(["a"])

    assert queues_of(await take(tokens, 1)) == ["a"]


async def test_a_consumer_gets_only_its_queues(broker: Broker, transport: Transport) -> None:
    """Tokens of queue b stay for b's consumers."""
    await transport.publish(["a", "b", "a", "b"])
    only_a = transport.consume(["a"], prefetch=10)

    assert queues_of(await take(only_a, 2)) == ["a", "a"]
    assert await nothing_arrives(only_a)

    only_b = broker.transport().consume(["b"], prefetch=10)
    assert queues_of(await take(only_b, 2)) == ["b", "b"]


async def test_publishing_nothing_is_a_no_op(transport: Transport) -> None:
    """An empty batch publishes nothing and does not fail."""
    await transport.publish([])


async def test_a_large_batch_is_confirmed_whole(transport: Transport) -> None:
    """A relay-sized batch (1,000 tokens) is published and every token delivered."""
    await transport.publish(["a"] * 600 + ["b"] * 400)
    tokens = transport.consume(["a", "b"], prefetch=50)
    seen: list[str] = []
    async with asyncio.timeout(30):
        while len(seen) < 1000:
            delivery = await anext(tokens)
            seen.append(delivery.queue)
            await delivery.ack()
    assert (seen.count("a"), seen.count("b")) == (600, 400)
    assert await nothing_arrives(tokens)


# -- prefetch and settling --------------------------------------------------------------


async def test_at_most_prefetch_tokens_are_unsettled(transport: Transport) -> None:
    """With prefetch 2, a third token waits until one of the first two is settled."""
    await transport.publish(["a"] * 5)
    tokens = transport.consume(["a"], prefetch=2)
    first, second = await take(tokens, 2)
    assert await nothing_arrives(tokens)

    await first.ack()
    (third,) = await take(tokens, 1)
    assert await nothing_arrives(tokens)

    await second.reject()
    await third.ack()
    assert len(await take(tokens, 2)) == 2


async def test_acked_tokens_are_not_delivered_again(broker: Broker, transport: Transport) -> None:
    """Once acked, a token is gone: a later consumer (after the first closed) gets none."""
    await transport.publish(["a", "a", "b"])
    tokens = transport.consume(["a", "b"], prefetch=5)
    for delivery in await take(tokens, 3):
        await delivery.ack()
    await transport.aclose()

    later = broker.transport().consume(["a", "b"], prefetch=5)
    assert await nothing_arrives(later, within=max(QUIET_S, 3 * CLAIM_IDLE_S))


async def test_unsettled_tokens_of_a_closed_consumer_go_to_another(
    broker: Broker, transport: Transport
) -> None:
    """Tokens a consumer held unsettled when it closed are delivered to another consumer."""
    await transport.publish(["a", "b", "a"])
    first = transport.consume(["a", "b"], prefetch=5)
    held = await take(first, 3)
    await transport.aclose()

    second = broker.transport().consume(["a", "b"], prefetch=5)
    assert queues_of(held) == queues_of(await take(second, 3))
    assert await nothing_arrives(second)


async def test_a_held_token_is_not_handed_to_another_consumer(
    broker: Broker, transport: Transport
) -> None:
    """A token a live consumer holds stays its own for as long as it is held (here
    several times Redis's `claim_idle_s`), and is gone once acked."""
    await transport.publish(["a"])
    (held,) = await take(transport.consume(["a"], prefetch=1), 1)

    other = broker.transport().consume(["a"], prefetch=1)
    assert await nothing_arrives(other, within=5 * CLAIM_IDLE_S)

    await held.ack()
    assert await nothing_arrives(other, within=3 * CLAIM_IDLE_S)


async def test_a_rejected_token_is_delivered_again(transport: Transport) -> None:
    """`reject()` hands the token back; it arrives again, and once acked it is gone."""
    await transport.publish(["b"])
    tokens = transport.consume(["a", "b"], prefetch=1)
    (first,) = await take(tokens, 1)

    await first.reject()
    (again,) = await take(tokens, 1)
    await again.ack()

    assert again.queue == "b"
    assert await nothing_arrives(tokens)


async def test_settling_twice_or_after_close_does_not_raise(transport: Transport) -> None:
    """ack and reject never raise: not when repeated, not once the transport is closed."""
    await transport.publish(["a", "a"])
    one, two = await take(transport.consume(["a"], prefetch=2), 2)
    await one.ack()
    await one.ack()
    await one.reject()
    await transport.aclose()

    await two.ack()
    await two.reject()


async def test_aclose_ends_open_iterators(transport: Transport) -> None:
    """A consumer waiting for a token stops (StopAsyncIteration) when the transport closes."""
    tokens = transport.consume(["a"], prefetch=1)
    waiting = asyncio.ensure_future(anext(tokens))
    await asyncio.sleep(0.3)

    await transport.aclose()

    async with asyncio.timeout(5):
        with pytest.raises(StopAsyncIteration):
            await waiting


# -- failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("amqp://guest:guest@127.0.0.1:1/", id="rabbitmq"),
        pytest.param("redis://127.0.0.1:1/0", id="redis"),
    ],
)
async def test_publishing_to_an_unreachable_broker_raises(url: str) -> None:
    """Nothing listens on port 1: publish raises TransportError within seconds."""
    transport = from_url(url, namespace="jgtest-unreachable")
    assert transport is not None
    try:
        async with asyncio.timeout(8):
            with pytest.raises(TransportError):
                await transport.publish(["a"])
            with pytest.raises(TransportError):
                await transport.connect()
            with pytest.raises(TransportError):
                await transport.ping()
    finally:
        await transport.aclose()


async def test_a_reachable_broker_answers_a_ping(broker: Broker) -> None:
    """What readiness (`/readyz`, `/v1/health`) asks a broker transport: it answers, timed,
    before anything was published and after."""
    transport = broker.transport()
    assert await transport.ping() >= 0
    await transport.publish(["a"])
    assert await transport.ping() >= 0


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("amqp://guest:guest@127.0.0.1:1/", id="rabbitmq"),
        pytest.param("redis://127.0.0.1:1/0", id="redis"),
    ],
)
async def test_a_consumer_waits_out_an_unreachable_broker(url: str) -> None:
    """A consumer whose broker is down yields nothing, raises nothing (it retries),
    and still ends cleanly when the transport closes."""
    transport = from_url(url, namespace="jgtest-unreachable")
    assert transport is not None
    tokens = transport.consume(["a"], prefetch=1)
    try:
        assert await nothing_arrives(tokens, within=1.0)
    finally:
        async with asyncio.timeout(5):
            await transport.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(tokens)


async def test_a_consumer_back_after_losing_the_broker_says_so(broker: Broker) -> None:
    """`on_resume` is called once a consumer that lost its broker (connections dropped,
    new ones refused) is back, and not when it first connects; tokens published after
    the outage arrive."""
    host, port = TCP_SERVICES[broker.kind].rsplit(":", 1)
    proxy = CuttableProxy(int(port), host=host)
    resumed = asyncio.Event()
    try:
        tokens = broker.transport(via=proxy).consume(["a"], prefetch=5, on_resume=resumed.set)
        publisher = broker.transport()
        await publisher.publish(["a"])
        (first,) = await take(tokens, 1)
        await first.ack()
        assert not resumed.is_set()

        proxy.down()
        await asyncio.sleep(1.5)
        assert not resumed.is_set()
        proxy.up()

        async with asyncio.timeout(ARRIVAL_S):
            await resumed.wait()
        await publisher.publish(["a"])
        (second,) = await take(tokens, 1)
        await second.ack()
    finally:
        proxy.close()


@pytest.mark.parametrize("url", ["amqp://127.0.0.1:1/", "redis://127.0.0.1:1/0"])
@pytest.mark.parametrize("prefetch", [0, -1])
async def test_consume_needs_a_positive_prefetch(url: str, prefetch: int) -> None:
    """prefetch < 1 would never hand out a token: refused at once."""
    transport = from_url(url)
    assert transport is not None
    with pytest.raises(ValueError, match="prefetch"):
        transport.consume(["a"], prefetch=prefetch)
    await transport.aclose()


@pytest.mark.service("redis")
async def test_redis_takes_over_tokens_of_a_dead_consumer() -> None:
    """Entries a consumer read but never settled (it died) are handed out again after
    `claim_idle_s` by a live consumer (`XAUTOCLAIM`)."""
    namespace = f"jgtest{uuid.uuid4().hex[:12]}"
    transport = RedisStreamsTransport(REDIS_URL, namespace=namespace, claim_idle_s=CLAIM_IDLE_S)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await transport.publish(["a", "a"])
        key = transport.stream_key("a")
        await client.xgroup_create(key, namespace, id="0", mkstream=True)
        await client.xreadgroup(namespace, "dead-consumer", {key: ">"}, count=2)
        assert (await client.xpending(key, namespace))["pending"] == 2

        tokens = transport.consume(["a"], prefetch=5)
        deliveries = await take(tokens, 2)

        assert queues_of(deliveries) == ["a", "a"]
        for delivery in deliveries:
            await delivery.ack()
        assert await client.xlen(key) == 0
    finally:
        await transport.aclose()
        await client.aclose()
        await delete_namespace("redis", namespace)


@pytest.mark.service("redis")
async def test_redis_acks_made_together_leave_nothing_in_the_stream() -> None:
    """Acks made in one turn of the event loop (written in one transaction) each take:
    the stream is empty and nothing is pending, across two streams."""
    namespace = f"jgtest{uuid.uuid4().hex[:12]}"
    transport = RedisStreamsTransport(REDIS_URL, namespace=namespace, claim_idle_s=CLAIM_IDLE_S)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await transport.publish(["a"] * 30 + ["b"] * 20)
        deliveries = await take(transport.consume(["a", "b"], prefetch=50), 50)

        await asyncio.gather(*(delivery.ack() for delivery in deliveries))

        for queue in ("a", "b"):
            key = transport.stream_key(queue)
            assert await client.xlen(key) == 0
            assert (await client.xpending(key, namespace))["pending"] == 0
    finally:
        await transport.aclose()
        await client.aclose()
        await delete_namespace("redis", namespace)


@pytest.mark.service("rabbitmq")
async def test_rabbitmq_a_token_for_a_deleted_queue_fails_and_the_next_publish_succeeds() -> None:
    """A queue deleted behind the transport's back makes the publish fail loudly (the
    broker returns the unroutable message) instead of dropping the token; the next
    publish declares the queue again and its token is delivered."""
    namespace = f"jgtest{uuid.uuid4().hex[:12]}"
    transport = RabbitTransport(RABBITMQ_URL, namespace=namespace)
    try:
        await transport.publish(["a"])
        await delete_namespace("rabbitmq", namespace)

        with pytest.raises(TransportError, match="confirmed 0 of 2"):
            await transport.publish(["a", "a"])
        await transport.publish(["a"])

        assert queues_of(await take(transport.consume(["a"], prefetch=5), 1)) == ["a"]
        assert await nothing_arrives(transport.consume(["a"], prefetch=5))
    finally:
        await transport.aclose()
        await delete_namespace("rabbitmq", namespace)


# -- choosing a transport ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("", None),
        ("database", None),
        ("amqp://guest:guest@localhost:5672/", RabbitTransport),
        ("amqps://user:secret@broker.example:5671/vhost", RabbitTransport),
        ("redis://localhost:6379/0", RedisStreamsTransport),
        ("rediss://:secret@cache.example:6380/1", RedisStreamsTransport),
        ("AMQP://localhost/", RabbitTransport),
    ],
)
def test_from_url_picks_the_backend(url: str, expected: type | None) -> None:
    """The URL's scheme picks the backend; `database` or nothing means the store's own."""
    transport = from_url(url, namespace="ns")
    if expected is None:
        assert transport is None
    else:
        assert isinstance(transport, expected)


@pytest.mark.parametrize(
    "url", ["postgresql://localhost/jobgate", "kafka://localhost:9092", "memory", "redis:/x"]
)
def test_from_url_refuses_unknown_transports(url: str) -> None:
    """Anything else is a configuration error that names the accepted schemes."""
    with pytest.raises(ValueError, match="amqp://"):
        from_url(url)


@pytest.mark.service("redis")
async def test_redis_forgets_the_consumers_of_killed_workers() -> None:
    """A worker killed (SIGKILL) never deletes its consumer from the group: the live
    consumers delete those quiet for twice `claim_idle_s`, once nothing is pending for
    them (their entries are first taken over). Regression: one more consumer in the
    group for good after every killed worker."""
    broker = Broker("redis")
    try:
        transport = broker.transport()
        key = f"{broker.namespace}:a"
        live = transport.consume(["a"], prefetch=4)
        await transport.publish(["a"])
        first = await asyncio.wait_for(anext(live), ARRIVAL_S)
        await first.ack()
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            await client.xgroup_createconsumer(key, broker.namespace, "killed-idle")
            await transport.publish(["a"])
            # A killed worker's consumer that had read a token it never acknowledged.
            await client.xreadgroup(broker.namespace, "killed-busy", {key: ">"}, count=1)
            names: set[str] = set()
            deadline = asyncio.get_running_loop().time() + 15
            while asyncio.get_running_loop().time() < deadline:
                consumers = await client.xinfo_consumers(key, broker.namespace)
                names = {c["name"].decode() for c in consumers}
                if not names & {"killed-idle", "killed-busy"}:
                    break
                await asyncio.sleep(0.2)
            assert names == {live.name}, names
            # The busy one's token was taken over before it went, not dropped.
            taken = await asyncio.wait_for(anext(live), ARRIVAL_S)
            await taken.ack()
        finally:
            await client.aclose()
        await live.aclose()
    finally:
        await broker.aclose()
