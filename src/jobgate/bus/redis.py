"""The Redis bus: `PUBLISH` and `SUBSCRIBE` on one channel per namespace."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from jobgate.bus.base import Changes, Listener, Listeners, decode, encode, merge, origin_of

log = structlog.get_logger("jobgate.bus")

TIMEOUT_S = 5.0


class RedisBus:
    """Publishes what `publish` gathered in one pipeline per round trip; with listeners,
    a subscriber connection delivers what every other process published (this process's
    own changes reach its listeners at once; the echo is skipped).

    After a lost connection the subscriber reconnects with backoff and tells listeners
    that anything may have changed (None). Changes published while Redis is away are
    sent once it is back.
    """

    def __init__(self, url: str, *, namespace: str = "jobgate") -> None:
        self.channel = f"{namespace}:events"
        self._client = Redis.from_url(
            url,
            socket_connect_timeout=TIMEOUT_S,
            socket_timeout=TIMEOUT_S,
            retry=Retry(NoBackoff(), 1),
        )
        # The subscriber blocks in reads for as long as nothing is published.
        self._subscriber = Redis.from_url(
            url, socket_connect_timeout=TIMEOUT_S, retry=Retry(NoBackoff(), 0)
        )
        self._listeners = Listeners()
        self._origin = uuid.uuid4().hex[:16]  # this process's mark on what it sends
        self._pending: dict[str, int] = {}
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()

    def publish(self, changes: Changes) -> None:
        merge(self._pending, changes)
        self._kick.set()
        self._listeners.soon(changes)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.add(listener)

    async def start(self) -> None:
        """Start sending (and listening); returns once subscribed, or after 5 s."""
        self._tasks.append(asyncio.create_task(self._send(), name="jobgate-bus-send"))
        if self._listeners:
            self._tasks.append(asyncio.create_task(self._listen(), name="jobgate-bus-listen"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TIMEOUT_S):
                    await self._subscribed.wait()

    async def ping(self) -> float:
        started = time.perf_counter()
        await self._client.ping()
        return (time.perf_counter() - started) * 1000

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self._client.aclose()
        await self._subscriber.aclose()

    async def _send(self) -> None:
        delay = 0.1
        while True:
            await self._kick.wait()
            self._kick.clear()
            if not self._pending:
                continue
            pending, self._pending = self._pending, {}
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for payload in encode(pending, self._origin):
                        pipe.publish(self.channel, payload)
                    await pipe.execute()
                delay = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                merge(self._pending, pending)
                log.warning("bus_publish_failed", backend="redis", error=type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                self._kick.set()

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            pubsub: PubSub | None = None
            try:
                pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                delay = 0.1
                self._listeners(None)  # whatever was announced while we were away
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None and message["type"] == "message":
                        data = message["data"]
                        text = data.decode() if isinstance(data, bytes) else str(data)
                        if origin_of(text) != self._origin:  # ours went out at once
                            self._listeners(decode(text))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("bus_connection_lost", backend="redis", error=type(exc).__name__)
            finally:
                self._subscribed.clear()
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
