"""Redis Streams transport: one stream per jobgate queue, read through a consumer group.

A token is a stream entry `{"q": <queue>}` in the stream `<namespace>:<queue>`; every
consumer reads through the group named `<namespace>`, so each entry goes to one
consumer at a time and stays in the group's pending list until it is settled.

What this backend guarantees:

- `publish` returns once Redis answered the call that appended each token. That is as
  durable as the server's persistence: with `appendfsync always` it survives a crash;
  without persistence a restart loses every token (the store still has the tasks).
- Each `consume` iterator is a consumer of its own (`host-pid-random`). It reads with
  `XREADGROUP` only while it holds fewer than `prefetch` tokens and never hands out
  more than `prefetch` unsettled ones. Reading several streams at once may reserve a
  few more, which wait in the iterator (and are given back when it closes).
- A live consumer refreshes its unsettled entries (`XCLAIM ... JUSTID`) every
  `claim_idle_s / 3`, so a token may stay unacknowledged for as long as its stage runs.
  Entries idle for `claim_idle_s` belong to a dead consumer, and any consumer with free
  room takes them over with `XAUTOCLAIM` and hands them out again.
- `ack` removes the entry (`XACK` + `XDEL`; the acks of one turn of the event loop in
  one transaction), so streams hold only unsettled tokens; `reject` replaces it by a
  fresh entry at the end of its stream, in one transaction.
- Consumers retry with backoff while Redis is unreachable, and re-create the group
  (`NOGROUP`) when a restart without persistence emptied the server.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from jobgate.transport.base import TransportError

log = structlog.get_logger("jobgate.transport")
T = TypeVar("T")

CONNECT_TIMEOUT_S = 5.0
PUBLISH_TIMEOUT_S = 10.0
SETTLE_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0
# Short enough that a consumer notices new room and closing soon; each empty read is
# one cheap round trip.
BLOCK_MS = 1000
# Longer than BLOCK_MS, or every blocked read would time out on the client side.
SOCKET_TIMEOUT_S = BLOCK_MS / 1000 + 10.0
RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0
DRIVER_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
FAILURES: tuple[type[BaseException], ...] = (*DRIVER_ERRORS, TransportError)

# Delete a consumer only if nothing is pending for it, atomically: `XGROUP DELCONSUMER`
# drops the consumer's pending entries from the group, which would lose those tokens.
_DELETE_IF_IDLE = """
for _, key in ipairs(KEYS) do
  local ok, pending = pcall(redis.call, 'XPENDING', key, ARGV[1], '-', '+', 1, ARGV[2])
  if ok and #pending == 0 then
    pcall(redis.call, 'XGROUP', 'DELCONSUMER', key, ARGV[1], ARGV[2])
  end
end
return 0
"""


# Append ARGV[2] tokens of queue ARGV[1] to the stream KEYS[1]. One call (and one reply)
# per queue instead of an `XADD` each: parsing a pipeline's thousand replies was most of
# a relay's CPU.
_APPEND = """
for _ = 1, tonumber(ARGV[2]) do
  redis.call('XADD', KEYS[1], '*', 'q', ARGV[1])
end
return 0
"""


class RedisStreamsTransport:
    """Wake-up tokens in Redis streams named `<namespace>:<queue>`.

    Args:
        url: a `redis://` or `rediss://` URL (database number included).
        namespace: prefix of the stream keys and name of the consumer group.
        claim_idle_s: how long an entry may sit unrefreshed in a consumer's pending
            list before other consumers take it over (its consumer is presumed dead).
    """

    name: str = "redis"

    def __init__(self, url: str, *, namespace: str = "jobgate", claim_idle_s: float = 15.0) -> None:
        if claim_idle_s <= 0:
            raise ValueError("claim_idle_s must be positive")
        self._url = url
        self.namespace = namespace
        self.claim_idle_s = claim_idle_s
        self._client: Redis | None = None
        self._append: AsyncScript | None = None
        self._consumers: set[RedisStreamsConsumer] = set()
        self._closed = False

    def stream_key(self, queue: str) -> str:
        """The Redis key of jobgate queue `queue`'s stream."""
        return f"{self.namespace}:{queue}"

    @property
    def client(self) -> Redis:
        """The shared client (a connection pool); no I/O until first used."""
        if self._client is None:
            if self._closed:
                raise TransportError("the Redis transport is closed")
            self._client = Redis.from_url(
                self._url,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=SOCKET_TIMEOUT_S,
                # One immediate retry replaces a pooled connection that a server restart
                # broke; longer waits are the caller's (or the consumer loop's) business.
                retry=Retry(NoBackoff(), 1),
            )
        return self._client

    async def connect(self) -> None:
        """Check that Redis answers.

        Raises:
            TransportError: Redis is unreachable.
        """
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S * 2):
                await self.client.ping()
        except DRIVER_ERRORS as exc:
            raise TransportError(f"cannot reach Redis: {_describe(exc)}") from exc

    async def ping(self) -> float:
        """`PING` Redis; see `Transport.ping`."""
        started = time.perf_counter()
        await self.connect()
        return (time.perf_counter() - started) * 1000

    async def publish(self, queues: Sequence[str]) -> None:
        """Append one entry per token (a script call per queue, all in one pipeline) and
        wait for Redis's replies.

        Raises:
            TransportError: Redis did not acknowledge every call.
        """
        if not queues:
            return
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                client = self.client
                if self._append is None:
                    self._append = client.register_script(_APPEND)
                async with client.pipeline(transaction=False) as pipe:
                    for queue, count in Counter(queues).items():
                        await self._append(
                            keys=[self.stream_key(queue)], args=[queue, count], client=pipe
                        )
                    await pipe.execute()
        except DRIVER_ERRORS as exc:
            raise TransportError(f"Redis publish failed: {_describe(exc)}") from exc

    def consume(
        self,
        queues: Sequence[str],
        *,
        prefetch: int,
        on_resume: Callable[[], None] | None = None,
    ) -> RedisStreamsConsumer:
        """Tokens of `queues`, at most `prefetch` unsettled; see `RedisStreamsConsumer`."""
        consumer = RedisStreamsConsumer(self, queues, prefetch=prefetch, on_resume=on_resume)
        if self._closed:
            consumer._closed = True
        else:
            self._consumers.add(consumer)
        return consumer

    async def aclose(self) -> None:
        """End every consumer (giving their unsettled tokens back) and disconnect."""
        self._closed = True
        await asyncio.gather(*(consumer.aclose() for consumer in list(self._consumers)))
        client, self._client = self._client, None
        self._append = None
        if client is not None:
            await client.aclose()


class RedisStreamsConsumer:
    """An async iterator of `RedisStreamsDelivery`, one consumer of the group.

    Its reader and keeper tasks start on the first `__anext__`. Both retry with backoff
    while Redis is unreachable; `on_resume` is called when a call succeeds again after
    failing, or after the group had to be made again (a restart without persistence
    lost every token).
    """

    def __init__(
        self,
        transport: RedisStreamsTransport,
        queues: Sequence[str],
        *,
        prefetch: int,
        on_resume: Callable[[], None] | None = None,
    ) -> None:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if not queues:
            raise ValueError("consume needs at least one queue")
        self._transport = transport
        self._group = transport.namespace
        self._queues = {transport.stream_key(q): q for q in dict.fromkeys(queues)}
        self._prefetch = prefetch
        self.name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._ready = asyncio.Condition()
        self._buffer: deque[RedisStreamsDelivery] = deque()
        self._out: set[RedisStreamsDelivery] = set()  # handed out, not settled
        self._tasks: list[asyncio.Task[None]] = []
        self._failure: BaseException | None = None
        self._closed = False
        # Acks waiting for the flush task scheduled with the first of them.
        self._acks: list[tuple[RedisStreamsDelivery, asyncio.Future[None]]] = []
        self._flushing: set[asyncio.Task[None]] = set()  # the loop keeps only weak refs
        self._on_resume = on_resume
        self._resumed_at = -RETRY_MAX_S

    def __aiter__(self) -> RedisStreamsConsumer:
        return self

    async def __anext__(self) -> RedisStreamsDelivery:
        if not self._tasks and not self._closed:
            self._tasks = [
                asyncio.create_task(self._guard(self._read()), name="jobgate-redis-read"),
                asyncio.create_task(self._guard(self._keep()), name="jobgate-redis-keep"),
            ]
        async with self._ready:
            await self._ready.wait_for(self._can_hand_out)
            if self._closed:
                raise StopAsyncIteration
            if self._failure is not None:
                raise TransportError(f"Redis consumer failed: {_describe(self._failure)}")
            delivery = self._buffer.popleft()
            self._out.add(delivery)
            return delivery

    async def aclose(self) -> None:
        """Stop reading and give every unsettled token back to its stream."""
        if self._closed:
            self._transport._consumers.discard(self)
            return
        self._closed = True
        async with self._ready:
            self._ready.notify_all()
        await _cancel(self._tasks)
        held = [*self._buffer, *self._out]
        self._buffer.clear()
        self._out.clear()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                results = await asyncio.gather(
                    *(delivery._give_back() for delivery in held), return_exceptions=True
                )
                if failed := next((r for r in results if isinstance(r, BaseException)), None):
                    raise failed
                client = self._transport.client
                keys = list(self._queues)
                await client.eval(_DELETE_IF_IDLE, len(keys), *keys, self._group, self.name)
        except FAILURES as exc:
            # Whatever stays pending is taken over by another consumer after claim_idle_s.
            log.info("transport_close_incomplete", transport="redis", error=_describe(exc))
        self._transport._consumers.discard(self)

    # -- internals ---------------------------------------------------------------------

    def _can_hand_out(self) -> bool:
        if self._closed or self._failure is not None:
            return True
        return bool(self._buffer) and len(self._out) < self._prefetch

    async def _guard(self, loop: Awaitable[None]) -> None:
        """Run a background loop; an error it does not retry fails the iterator."""
        try:
            await loop
        except Exception as exc:
            log.error("transport_consumer_failed", transport="redis", error=_describe(exc))
            async with self._ready:
                self._failure = exc
                self._ready.notify_all()

    def _room(self) -> int:
        """How many more entries this consumer may take from Redis now."""
        return self._prefetch - len(self._out) - len(self._buffer)

    async def _read(self) -> None:
        client = self._transport.client
        await self._retrying("read", self._create_groups)
        while not self._closed:
            async with self._ready:
                await self._ready.wait_for(lambda: self._room() > 0)
                room = self._room()
            streams: dict[Any, Any] = dict.fromkeys(self._queues, ">")
            read = partial(
                client.xreadgroup, self._group, self.name, streams, count=room, block=BLOCK_MS
            )
            reply = await self._retrying("read", read)
            await self._take(_entries(reply))

    async def _keep(self) -> None:
        interval = self._transport.claim_idle_s / 3
        while not self._closed:
            await asyncio.sleep(interval)
            await self._retrying("refresh", self._refresh)
            await self._retrying("claim", self._claim)
            await self._retrying("forget", self._forget_dead)

    async def _refresh(self) -> None:
        """Reset the idle time of held entries, so no other consumer takes them over."""
        held: dict[str, list[Any]] = {}
        for delivery in [*self._buffer, *self._out]:
            held.setdefault(delivery.key, []).append(delivery.entry_id)
        client = self._transport.client
        for key, ids in held.items():
            await client.xclaim(key, self._group, self.name, 0, ids, justid=True)

    async def _claim(self) -> None:
        """Take over entries that a dead consumer left idle for `claim_idle_s`."""
        client = self._transport.client
        min_idle_ms = int(self._transport.claim_idle_s * 1000)
        for key in self._queues:
            cursor: Any = "0-0"
            while (room := self._room()) > 0:
                reply = await client.xautoclaim(
                    key, self._group, self.name, min_idle_ms, cursor, count=room
                )
                cursor, claimed = reply[0], reply[1]
                await self._take((key, entry_id) for entry_id, _ in claimed)
                if cursor in (b"0-0", "0-0"):
                    break

    async def _forget_dead(self) -> None:
        """Delete the group's consumers quiet for twice `claim_idle_s` with nothing
        pending: a killed worker's (only a clean close deletes one's own), which would
        otherwise stay in the group for good. A live consumer deleted this way is made
        again by its next read, and nothing pending is ever dropped (`_DELETE_IF_IDLE`)."""
        client = self._transport.client
        quiet_ms = int(self._transport.claim_idle_s * 2000)
        for key in self._queues:
            for consumer in await client.xinfo_consumers(key, self._group):
                name = consumer["name"]
                name = name.decode() if isinstance(name, bytes) else str(name)
                if name != self.name and not consumer["pending"] and consumer["idle"] > quiet_ms:
                    await client.eval(_DELETE_IF_IDLE, 1, key, self._group, name)

    async def _take(self, entries: Any) -> None:
        async with self._ready:
            held = {(d.key, d.entry_id) for d in [*self._buffer, *self._out]}
            for key, entry_id in entries:
                stream = key.decode() if isinstance(key, bytes) else key
                if (stream, entry_id) not in held:  # a missed refresh lets us claim our own
                    self._buffer.append(
                        RedisStreamsDelivery(self, stream, self._queues[stream], entry_id)
                    )
            self._ready.notify_all()

    async def _create_groups(self) -> None:
        client = self._transport.client
        for key in self._queues:
            try:
                # From id 0: tokens published before the group existed are handed out.
                await client.xgroup_create(key, self._group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _retrying(self, action: str, call: Callable[[], Awaitable[T]]) -> T:
        """Await `call()` until it succeeds, with backoff; re-create groups on NOGROUP."""
        delay = RETRY_MIN_S
        interrupted = False
        while True:
            try:
                result = await call()
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    error: BaseException = exc
                else:
                    # A restart without persistence lost the group: make it again.
                    try:
                        await self._create_groups()
                        interrupted = True
                        continue
                    except DRIVER_ERRORS as again:
                        error = again
            except DRIVER_ERRORS as exc:
                error = exc
            else:
                if interrupted:
                    self._resumed()
                return result
            interrupted = True
            log.warning(
                "transport_consume_retry",
                transport="redis",
                action=action,
                error=_describe(error),
                retry_in_s=delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    def _resumed(self) -> None:
        # The reader and the keeper both find Redis back after an outage, a moment
        # apart: one resync is enough.
        at = time.monotonic()
        if at - self._resumed_at < RETRY_MAX_S:
            return
        self._resumed_at = at
        log.info("transport_consume_resumed", transport="redis")
        if self._on_resume is not None and not self._closed:
            self._on_resume()

    async def _settled(self, delivery: RedisStreamsDelivery) -> None:
        async with self._ready:
            self._out.discard(delivery)
            self._ready.notify_all()

    async def _ack(self, delivery: RedisStreamsDelivery) -> None:
        """`XACK` + `XDEL` `delivery`, in one transaction with every other ack made in
        the same turn of the event loop (a worker's finished stages are settled
        together): one round trip for the lot instead of one each. Raises what the
        transaction raised."""
        future = asyncio.get_running_loop().create_future()
        if not self._acks:  # else a flush is scheduled and has not taken its batch yet
            flush = asyncio.create_task(self._flush_acks())
            self._flushing.add(flush)
            flush.add_done_callback(self._flushing.discard)
        self._acks.append((delivery, future))
        await future

    async def _flush_acks(self) -> None:
        batch, self._acks = self._acks, []  # acks made from here on go to the next flush
        ids: dict[str, list[bytes]] = {}
        for delivery, _ in batch:
            ids.setdefault(delivery.key, []).append(delivery.entry_id)
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                async with self._transport.client.pipeline(transaction=True) as pipe:
                    for key, entry_ids in ids.items():
                        pipe.xack(key, self._group, *entry_ids)
                        pipe.xdel(key, *entry_ids)
                    await pipe.execute()
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for _, future in batch:
                if not future.done():
                    future.set_result(None)


class RedisStreamsDelivery:
    """One stream entry held by a `RedisStreamsConsumer`; settle it once."""

    __slots__ = ("_consumer", "_queue", "_settled", "entry_id", "key")

    def __init__(
        self, consumer: RedisStreamsConsumer, key: str, queue: str, entry_id: bytes
    ) -> None:
        self._consumer = consumer
        self.key = key
        self._queue = queue
        self.entry_id = entry_id
        self._settled = False

    @property
    def queue(self) -> str:
        """The jobgate queue name."""
        return self._queue

    async def ack(self) -> None:
        """Remove the entry (`XACK` + `XDEL`). Never raises."""
        await self._settle(requeue=False)

    async def reject(self) -> None:
        """Replace the entry by a fresh one at the end of its stream. Never raises."""
        await self._settle(requeue=True)

    async def _settle(self, *, requeue: bool) -> None:
        if self._settled:
            return
        self._settled = True
        try:
            if requeue:
                await self._requeue()
            else:
                await self._consumer._ack(self)
        except Exception as exc:
            # Unsettled in Redis: another consumer takes it over after claim_idle_s.
            log.warning(
                "transport_settle_failed",
                transport="redis",
                queue=self._queue,
                error=_describe(exc),
            )
        finally:
            await self._consumer._settled(self)

    async def _give_back(self) -> None:
        if not self._settled:
            self._settled = True
            await self._requeue()

    async def _requeue(self) -> None:
        """Replace the entry by a fresh one at the end of its stream, in one transaction."""
        group = self._consumer._group
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            async with self._consumer._transport.client.pipeline(transaction=True) as pipe:
                pipe.xack(self.key, group, self.entry_id)
                pipe.xdel(self.key, self.entry_id)
                pipe.xadd(self.key, {"q": self._queue})
                await pipe.execute()


def _entries(reply: Any) -> list[tuple[Any, bytes]]:
    """(stream key, entry id) pairs from an `XREADGROUP` reply (RESP2 or RESP3)."""
    streams = reply.items() if isinstance(reply, dict) else (reply or [])
    pairs: list[tuple[Any, bytes]] = []
    for key, entries in streams:
        if entries and isinstance(entries[0], list):  # RESP3 nests one more level
            entries = entries[0]
        pairs.extend((key, entry[0]) for entry in entries if entry[0] is not None)
    return pairs


async def _cancel(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel `tasks` and wait for them to end.

    Cancelling again until they do: on Python 3.11, `asyncio.wait_for` (which redis-py
    uses for socket writes) swallows a cancellation that lands as its inner call ends.
    """
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)
    await asyncio.gather(*tasks, return_exceptions=True)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = ["RedisStreamsConsumer", "RedisStreamsDelivery", "RedisStreamsTransport"]
