"""RabbitMQ transport: one durable quorum queue per jobgate queue, publisher confirms.

A token is a persistent message whose body is the jobgate queue name, published to
the default exchange with routing key `<namespace>.<queue>`, the name of its queue.

What this backend guarantees:

- `publish` returns only after the broker confirmed every message; a quorum queue
  confirms once a majority of its replicas stored it. A message the broker could not
  route (its queue was deleted) counts as a failure, not a silent drop.
- Each `consume` iterator has its own channel with `basic.qos(prefetch)` and manual
  acks. Quorum queues do not support channel-wide (global) QoS, so the limit applies
  to each queue's consumer: a worker of several queues may have up to `prefetch` tokens
  per queue reserved on the broker, but the iterator never hands out more than
  `prefetch` unsettled ones.
- Tokens of a closed channel, a dead connection or a closed consumer are requeued by
  the broker and go to another consumer. RabbitMQ's `consumer_timeout` (30 min by
  default) bounds how long a token may stay unacknowledged.
- The connection is aio-pika's robust one: after a broker restart it reconnects by
  itself and re-declares queues, QoS and consumers. Tokens handed out before the
  restart went back to their queue; settling them afterwards is a logged no-op.
- Connections ask for a `HEARTBEAT_S` heartbeat unless the URL sets `heartbeat`. A
  consumer cut off by a partition holds the tokens the broker sent its dead connection
  until the broker finds it dead: about 13 s at 5 s, 28 s at 10 s, and more than 90 s
  at RabbitMQ's default of 60 s (measured here).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, cast

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelInvalidStateError, PublishError

from jobgate.transport.base import TransportError

log = structlog.get_logger("jobgate.transport")

QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
CONNECT_TIMEOUT_S = 5.0
# A publish waits this long at most, including for a reconnect in progress.
PUBLISH_TIMEOUT_S = 10.0
SETTLE_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0
# The broker finds a silent peer dead after a few of these, and requeues its unsettled
# tokens; aiormq gives up on a silent broker after three. RabbitMQ advises 5 to 20 s:
# shorter ones raise false alarms.
HEARTBEAT_S = 5
RECONNECT_INTERVAL_S = 1.0
"""aio-pika's robust connection retries at a fixed interval: each process draws its own
between this and twice it, so a fleet's reconnects after an outage do not come in step."""
RETRY_MIN_S = 0.2
RETRY_MAX_S = 10.0
DRIVER_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_EXCEPTIONS, TimeoutError)
RETRYABLE: tuple[type[BaseException], ...] = (*DRIVER_ERRORS, TransportError)


class RabbitTransport:
    """Wake-up tokens in RabbitMQ quorum queues named `<namespace>.<queue>`.

    Args:
        url: an `amqp://` or `amqps://` URL.
        namespace: prefix of the broker's queue names, so several deployments (or
            test runs) can share one virtual host.
    """

    name: str = "rabbitmq"

    def __init__(self, url: str, *, namespace: str = "jobgate") -> None:
        self._url = url
        self._namespace = namespace
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._declared: set[str] = set()
        self._lock = asyncio.Lock()
        self._consumers: set[RabbitConsumer] = set()
        self._background: set[asyncio.Future[Any]] = set()
        self._closed = False

    def queue_name(self, queue: str) -> str:
        """The broker's queue name for jobgate queue `queue`."""
        return f"{self._namespace}.{queue}"

    async def connect(self) -> None:
        """Open the connection and the publishing channel (a no-op once open).

        Raises:
            TransportError: the broker is unreachable or refused the connection.
        """
        await self._publisher()

    async def publish(self, queues: Sequence[str]) -> None:
        """Publish one persistent token per entry and wait for every broker confirm.

        Raises:
            TransportError: a token was not confirmed (nacked, unroutable, connection
                lost, or no confirm within `PUBLISH_TIMEOUT_S`).
        """
        if not queues:
            return
        channel = await self._publisher()
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                for queue in dict.fromkeys(queues):
                    await self._declare(channel, queue)
                # The concrete channel: `basic_publish(wait=...)` is not on the ABC.
                underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
                results = await asyncio.gather(
                    *(self._publish_one(underlay, queue) for queue in queues),
                    return_exceptions=True,
                )
        except DRIVER_ERRORS as exc:
            raise TransportError(f"RabbitMQ publish failed: {_describe(exc)}") from exc
        failures = [r for r in results if isinstance(r, BaseException)]
        for queue, result in zip(queues, results, strict=True):
            if isinstance(result, PublishError):
                # Unroutable: the queue is gone, so declare it again next time.
                self._declared.discard(self.queue_name(queue))
        if failures:
            raise TransportError(
                f"RabbitMQ confirmed {len(queues) - len(failures)} of {len(queues)} tokens: "
                f"{_describe(failures[0])}"
            ) from failures[0]

    async def ping(self) -> float:
        """Open (or find open) the connection and its publishing channel, and make one
        round trip on it (`basic.qos`, which a publishing channel does not use); see
        `Transport.ping`. A robust connection that is reconnecting counts as down."""
        started = time.perf_counter()
        channel = await self._publisher()
        connection = self._connection
        if connection is None or not connection.connected.is_set() or channel.is_closed:
            raise TransportError("the connection to RabbitMQ is down (reconnecting)")
        try:
            await channel.set_qos(prefetch_count=0, timeout=CONNECT_TIMEOUT_S)
        except DRIVER_ERRORS as exc:
            raise TransportError(f"RabbitMQ did not answer: {_describe(exc)}") from exc
        return (time.perf_counter() - started) * 1000

    def consume(
        self,
        queues: Sequence[str],
        *,
        prefetch: int,
        on_resume: Callable[[], None] | None = None,
    ) -> RabbitConsumer:
        """Tokens of `queues`, at most `prefetch` unsettled; see `RabbitConsumer`."""
        consumer = RabbitConsumer(self, queues, prefetch=prefetch, on_resume=on_resume)
        if self._closed:
            consumer._closed = True
        else:
            self._consumers.add(consumer)
        return consumer

    async def aclose(self) -> None:
        """End every consumer (their unsettled tokens are requeued) and disconnect."""
        self._closed = True
        await asyncio.gather(*(consumer.aclose() for consumer in list(self._consumers)))
        async with self._lock:
            channel, self._channel = self._channel, None
            connection, self._connection = self._connection, None
        for resource in (channel, connection):
            if resource is not None:
                await _close_quietly(resource)

    # -- internals ---------------------------------------------------------------------

    async def _connected(self) -> AbstractRobustConnection:
        """The shared robust connection, opened on first use."""
        async with self._lock:
            if self._closed:
                raise TransportError("the RabbitMQ transport is closed")
            if self._connection is None:
                self._connection = await self._open_connection()
            return self._connection

    async def _open_connection(self) -> AbstractRobustConnection:
        attempt = asyncio.ensure_future(
            aio_pika.connect_robust(
                _with_heartbeat(self._url),
                timeout=CONNECT_TIMEOUT_S,
                reconnect_interval=RECONNECT_INTERVAL_S * (1 + random.random()),  # noqa: S311
                client_properties={
                    "connection_name": f"jobgate {socket.gethostname()}:{os.getpid()}"
                },
            )
        )
        try:
            # Shielded: a robust connection cancelled halfway keeps reconnecting in the
            # background, so a cancelled caller leaves it to `_close_orphan` instead.
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            self._keep(attempt).add_done_callback(self._close_orphan)
            raise
        except DRIVER_ERRORS as exc:
            raise TransportError(f"cannot connect to RabbitMQ: {_describe(exc)}") from exc

    def _close_orphan(self, attempt: asyncio.Future[AbstractRobustConnection]) -> None:
        if not attempt.cancelled() and attempt.exception() is None:
            self._keep(asyncio.ensure_future(_close_quietly(attempt.result())))

    def _keep(self, future: asyncio.Future[Any]) -> asyncio.Future[Any]:
        """Hold a reference to a background future until it is done."""
        self._background.add(future)
        future.add_done_callback(self._background.discard)
        return future

    async def _publisher(self) -> AbstractRobustChannel:
        connection = await self._connected()
        async with self._lock:
            if self._closed:
                raise TransportError("the RabbitMQ transport is closed")
            if self._channel is None:
                try:
                    channel = connection.channel(publisher_confirms=True, on_return_raises=True)
                    await channel.initialize(timeout=CONNECT_TIMEOUT_S)
                except DRIVER_ERRORS as exc:
                    reason = _describe(exc)
                    raise TransportError(f"cannot open a RabbitMQ channel: {reason}") from exc
                self._channel = channel
            return self._channel

    async def _declare(self, channel: AbstractRobustChannel, queue: str) -> None:
        name = self.queue_name(queue)
        if name not in self._declared:
            await channel.declare_queue(name, durable=True, arguments=QUORUM)
            self._declared.add(name)

    async def _publish_one(self, channel: aiormq.Channel, queue: str) -> None:
        # On aiormq's channel, as `Exchange.publish` does after building a `Message` and
        # its properties: without those layers a token costs about a fifth less CPU.
        # `wait=False` queues the frames without waiting for the socket to take them
        # while holding the channel's lock, so a batch's publishes pass the lock in one
        # turn of the event loop rather than a few turns each: in an API process at full
        # CPU, whose turns are slow, the relay published almost nothing before (it still
        # waits for every confirm). Unroutable messages still raise (the channel's
        # `on_return_raises`).
        await channel.basic_publish(
            queue.encode(),
            routing_key=self.queue_name(queue),
            # A fresh one each time: aiormq writes the message id into it.
            properties=aiormq.spec.Basic.Properties(
                content_type="text/plain", delivery_mode=PERSISTENT
            ),
            mandatory=True,
            wait=False,
        )


class RabbitConsumer:
    """An async iterator of `RabbitDelivery`, on a channel of its own.

    The channel opens on the first `__anext__` and is retried with backoff until the
    broker answers; from then on the robust connection restores it after outages, and
    `on_resume` is called each time it did.
    """

    def __init__(
        self,
        transport: RabbitTransport,
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
        self._queues = list(dict.fromkeys(queues))
        self._prefetch = prefetch
        self._ready = asyncio.Condition()
        self._buffer: deque[tuple[str, AbstractIncomingMessage]] = deque()
        self._unsettled = 0
        self._closed = False
        self._channel: AbstractRobustChannel | None = None
        self._opening: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._on_resume = on_resume

    def __aiter__(self) -> RabbitConsumer:
        return self

    async def __anext__(self) -> RabbitDelivery:
        if self._opening is None and not self._closed:
            self._opening = asyncio.create_task(self._open(), name="jobgate-rabbitmq-consume")
        async with self._ready:
            while True:
                await self._ready.wait_for(self._can_hand_out)
                if self._closed:
                    raise StopAsyncIteration
                if self._failure is not None:
                    reason = _describe(self._failure)
                    raise TransportError(f"RabbitMQ consumer failed: {reason}")
                queue, message = self._buffer.popleft()
                if _is_stale(message):
                    continue  # its channel died, so the broker has requeued it
                self._unsettled += 1
                return RabbitDelivery(self, queue, message)

    async def aclose(self) -> None:
        """Stop; the channel closes, so the broker requeues every unsettled token."""
        if self._closed:
            self._transport._consumers.discard(self)
            return
        self._closed = True
        async with self._ready:
            self._buffer.clear()
            self._ready.notify_all()
        if self._opening is not None:
            await _cancel(self._opening)
        if self._channel is not None:
            await _close_quietly(self._channel)
            self._channel = None
        self._transport._consumers.discard(self)

    def _can_hand_out(self) -> bool:
        if self._closed or self._failure is not None:
            return True
        return bool(self._buffer) and self._unsettled < self._prefetch

    async def _open(self) -> None:
        """Set the channel up, retrying; an error it does not retry fails the iterator."""
        try:
            await self._open_retrying()
        except Exception as exc:
            log.error("transport_consumer_failed", transport="rabbitmq", error=_describe(exc))
            async with self._ready:
                self._failure = exc
                self._ready.notify_all()

    async def _open_retrying(self) -> None:
        delay = RETRY_MIN_S
        while not self._closed:
            channel: AbstractRobustChannel | None = None
            try:
                connection = await self._transport._connected()
                channel = connection.channel(publisher_confirms=False)
                await channel.initialize(timeout=CONNECT_TIMEOUT_S)
                await channel.set_qos(prefetch_count=self._prefetch)
                for queue in self._queues:
                    declared = await channel.declare_queue(
                        self._transport.queue_name(queue), durable=True, arguments=QUORUM
                    )
                    await declared.consume(partial(self._on_message, queue))
            except RETRYABLE as exc:
                if channel is not None:
                    await _close_quietly(channel)
                log.warning(
                    "transport_consume_retry",
                    transport="rabbitmq",
                    error=_describe(exc),
                    retry_in_s=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if self._closed:  # a cancellation was lost (see `_cancel`)
                await _close_quietly(channel)
            else:
                self._channel = channel
                channel.reopen_callbacks.add(self._reopened)
            return

    def _reopened(self, _channel: object) -> None:
        """The robust connection restored the channel and its consumers."""
        log.info("transport_consume_resumed", transport="rabbitmq")
        if self._on_resume is not None and not self._closed:
            self._on_resume()

    async def _on_message(self, queue: str, message: AbstractIncomingMessage) -> None:
        async with self._ready:
            if not self._closed:  # else the closing channel requeues it
                self._buffer.append((queue, message))
                self._ready.notify_all()

    async def _settled(self) -> None:
        async with self._ready:
            self._unsettled -= 1
            self._ready.notify_all()


class RabbitDelivery:
    """One token from a `RabbitConsumer`; settle it once with `ack` or `reject`."""

    __slots__ = ("_consumer", "_message", "_queue", "_settled")

    def __init__(
        self, consumer: RabbitConsumer, queue: str, message: AbstractIncomingMessage
    ) -> None:
        self._consumer = consumer
        self._queue = queue
        self._message = message
        self._settled = False

    @property
    def queue(self) -> str:
        """The jobgate queue name."""
        return self._queue

    async def ack(self) -> None:
        """Remove the token from its queue. Never raises."""
        await self._settle(requeue=None)

    async def reject(self) -> None:
        """Requeue the token for any consumer. Never raises."""
        await self._settle(requeue=True)

    async def _settle(self, *, requeue: bool | None) -> None:
        if self._settled:
            return
        self._settled = True
        try:
            if not self._consumer._closed:
                async with asyncio.timeout(SETTLE_TIMEOUT_S):
                    if requeue is None:
                        await self._message.ack()
                    else:
                        await self._message.nack(requeue=requeue)
        except ChannelInvalidStateError:
            # The channel died since delivery; the broker has requeued the token.
            log.info("transport_settle_skipped", transport="rabbitmq", queue=self._queue)
        except Exception as exc:
            log.warning(
                "transport_settle_failed",
                transport="rabbitmq",
                queue=self._queue,
                error=_describe(exc),
            )
        finally:
            await self._consumer._settled()


def _is_stale(message: AbstractIncomingMessage) -> bool:
    try:
        message.channel  # noqa: B018 - raises once the delivering channel is closed
    except ChannelInvalidStateError:
        return True
    return False


async def _close_quietly(resource: AbstractRobustChannel | AbstractRobustConnection) -> None:
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await resource.close()
    except Exception as exc:
        log.info("transport_close_failed", transport="rabbitmq", error=_describe(exc))


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait for it to end.

    Cancelling again until it does: on Python 3.11, `asyncio.wait_for` swallows a
    cancellation that lands as its inner call ends.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.1)
    await asyncio.gather(task, return_exceptions=True)


def _with_heartbeat(url: str) -> str:
    """`url` asking for `HEARTBEAT_S`, unless it sets a heartbeat of its own."""
    parts = urllib.parse.urlsplit(url)
    if "heartbeat" in urllib.parse.parse_qs(parts.query, keep_blank_values=True):
        return url
    query = f"{parts.query}&" if parts.query else ""
    return urllib.parse.urlunsplit(parts._replace(query=f"{query}heartbeat={HEARTBEAT_S}"))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = ["RabbitConsumer", "RabbitDelivery", "RabbitTransport"]
