"""A broker restarts under an open consumer: the iterator goes on by itself.

Each test restarts the shared test server (RabbitMQ: `stop_app` / `start_app`, which
keeps quorum queues; Redis: `shutdown nosave` and a fresh `redis-server`, which keeps
nothing) and always brings it back before it ends.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable

import pytest

from jobgate.transport.base import Delivery, Transport, TransportError
from tests.conftest import TCP_SERVICES, require_exclusive
from tests.contract.test_transports import Broker

pytestmark = [pytest.mark.timeout(180), pytest.mark.disruptive]
OUTAGE_S = 60.0  # how long the transport may take to work again after the restart


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=90)


def _address(kind: str) -> tuple[str, int]:
    host, _, port = TCP_SERVICES[kind].rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1"):
        pytest.skip(f"{kind} at {host} is not a local server this test can restart")
    return host, int(port)


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _stop(kind: str) -> None:
    require_exclusive()
    host, port = _address(kind)
    if kind == "redis":
        # The connection drops as the server exits, so redis-cli's exit code means nothing.
        subprocess.run(
            ["redis-cli", "-h", host, "-p", str(port), "shutdown", "nosave"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    else:
        _run("rabbitmqctl", "stop_app")
    _wait(lambda: not _answers(host, port), 30, f"{kind} to stop")


def _start(kind: str) -> None:
    """Start the server if it is down, and wait until it answers."""
    host, port = _address(kind)
    if kind == "redis":
        if not _answers(host, port):
            _run(
                "redis-server", "--daemonize", "yes", "--bind", host, "--port", str(port),
                "--save", "", "--appendonly", "no",
            )  # fmt: skip
    else:
        _run("rabbitmqctl", "start_app")
        _run("rabbitmqctl", "await_startup")
    _wait(lambda: _answers(host, port), 60, f"{kind} to answer")


async def _publish_until_accepted(transport: Transport, queues: list[str]) -> None:
    """Publish, retrying while the broker is still coming back (as the relay does)."""
    deadline = time.monotonic() + OUTAGE_S
    while True:
        try:
            await transport.publish(queues)
            return
        except TransportError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _take(tokens: AsyncIterator[Delivery], n: int, within: float) -> list[Delivery]:
    async with asyncio.timeout(within):
        return [await anext(tokens) for _ in range(n)]


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("rabbitmq", marks=pytest.mark.service("rabbitmq")),
        pytest.param("redis", marks=pytest.mark.service("redis")),
    ],
)
async def test_an_open_consumer_survives_a_broker_restart(kind: str) -> None:
    """Across a restart: settling a token from before it never raises (nor settles
    another token), publishing works again once the broker is back, and the same
    iterator yields the new token. RabbitMQ also redelivers the token that was held
    unsettled; Redis, keeping nothing, has lost it."""
    broker = Broker(kind)
    try:
        transport = broker.transport()
        await transport.connect()
        tokens = transport.consume(["a"], prefetch=4)
        await transport.publish(["a", "a"])
        done, held = await _take(tokens, 2, within=10)
        await done.ack()

        try:
            await asyncio.to_thread(_stop, kind)
        finally:
            await asyncio.to_thread(_start, kind)

        await held.ack()  # its channel (or its stream) is gone: a logged no-op
        await _publish_until_accepted(transport, ["a"])
        expected = 2 if kind == "rabbitmq" else 1
        after = await _take(tokens, expected, within=OUTAGE_S)
        for delivery in after:
            assert delivery.queue == "a"
            await delivery.ack()
        with pytest.raises(TimeoutError):
            await _take(tokens, 1, within=1.0)
    finally:
        await asyncio.to_thread(_start, kind)
        await broker.aclose()
