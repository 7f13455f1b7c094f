"""Delivering "a stage task is ready" to workers. The store stays the truth.

The default transport is the database itself: workers claim from the `tasks` table.
On PostgreSQL, `LISTEN/NOTIFY` wakes them the moment a task is committed, instead of at
their next poll.

A fleet can carry the wake-ups over a broker instead (`base.Transport`): RabbitMQ
quorum queues (`rabbitmq.py`, aio-pika, publisher confirms) or Redis Streams
(`redis.py`, consumer groups, `XAUTOCLAIM`). The outbox relay publishes one token per
ready task; a worker claims from the store when a token arrives and acknowledges it
after committing the outcome. `from_url` picks the backend from
`JOBGATE_TRANSPORT_URL`.
"""

from __future__ import annotations

from jobgate.transport.base import Delivery, Transport, TransportError

BROKER_SCHEMES = ("amqp", "amqps", "redis", "rediss")


def from_url(url: str, *, namespace: str = "jobgate") -> Transport | None:
    """The broker transport a URL names, or None for the database transport.

    The broker's driver is imported only when its scheme is used.

    Args:
        url: `"database"` or `""` (the store carries the tasks itself),
            `amqp://` / `amqps://` (RabbitMQ) or `redis://` / `rediss://` (Redis).
        namespace: prefix of the broker's queue or stream names.

    Raises:
        ValueError: the URL names no known transport.
    """
    if url in ("", "database"):
        return None
    scheme, separator, _ = url.partition("://")
    scheme = scheme.lower()
    if separator and scheme in ("amqp", "amqps"):
        from jobgate.transport.rabbitmq import RabbitTransport

        return RabbitTransport(url, namespace=namespace)
    if separator and scheme in ("redis", "rediss"):
        from jobgate.transport.redis import RedisStreamsTransport

        return RedisStreamsTransport(url, namespace=namespace)
    raise ValueError(
        f"unknown transport URL {url!r}: use 'database', or a URL with scheme "
        + ", ".join(f"{s}://" for s in BROKER_SCHEMES)
    )


__all__ = ["BROKER_SCHEMES", "Delivery", "Transport", "TransportError", "from_url"]
