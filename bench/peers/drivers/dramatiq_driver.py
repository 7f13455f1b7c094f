"""Dramatiq: the `dramatiq` CLI, 2 processes x 8 threads, default middleware; RabbitMQ or Redis.

Run by path inside the dramatiq venv (`BENCH_BROKER=redis|rabbitmq`); the workers import
this file as the broker module (`dramatiq dramatiq_driver`). The Results middleware
(Redis backend) stores every job's result (`store_results=True` on the actor); the
latency test blocks on it with `Message.get_result(block=True)` (BRPOPLPUSH).
Dramatiq has no bulk enqueue API (`group(...).run()` sends one message per job).
"""

from __future__ import annotations

import _harness as h
import dramatiq
import pika
import pika.exceptions
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

CONFIG = h.Config.from_env()
QUEUE = f"bench_peers_dramatiq_{CONFIG.broker}"

broker: dramatiq.Broker
if CONFIG.broker == "rabbitmq":
    broker = RabbitmqBroker(url=CONFIG.amqp_url)
else:
    broker = RedisBroker(url=CONFIG.redis_url)
broker.add_middleware(Results(backend=RedisBackend(url=CONFIG.redis_url)))
dramatiq.set_broker(broker)
_counter = h.SyncCounter(CONFIG.redis_url)


@dramatiq.actor(actor_name="bench_noop", queue_name=QUEUE, store_results=True)
def noop() -> int:
    return _counter.incr()


class DramatiqDriver(h.Driver):
    dists = ("dramatiq", "pika", "redis")

    def __init__(self, config: h.Config) -> None:
        super().__init__(config)
        self.sentinel: pika.BlockingConnection | None = None
        self.generation = 0

    def worker_commands(self) -> list[list[str]]:
        return [
            [
                str(self.bin_dir / "dramatiq"),
                "dramatiq_driver",
                "--processes",
                "2",
                "--threads",
                "8",
                "--queues",
                QUEUE,
            ]
        ]

    def enqueue_single(self, n: int) -> None:
        for _ in range(n):
            noop.send()

    def latency(self, n: int, cap_s: float) -> list[float]:
        return h.timed_loop(n, cap_s, lambda: noop.send().get_result(block=True, timeout=30_000))

    def purge(self) -> None:
        if isinstance(broker, RabbitmqBroker):
            broker.declare_queue(QUEUE, ensure=True)
            broker.flush_all()

    def server_epoch(self) -> str:
        """A RabbitMQ restart closes this idle connection: the next channel open fails."""
        if not isinstance(broker, RabbitmqBroker):
            return ""
        if self.sentinel is not None:
            try:
                self.sentinel.channel().close()
                return str(self.generation)
            except pika.exceptions.AMQPError:
                self.sentinel = None
        self.generation += 1
        self.sentinel = pika.BlockingConnection(pika.URLParameters(CONFIG.amqp_url))
        return str(self.generation)

    def servers(self) -> dict[str, str]:
        if not isinstance(broker, RabbitmqBroker):
            return {}
        props = broker.connection._impl.server_properties
        version = props.get("version", "?")
        return {"rabbitmq": version.decode() if isinstance(version, bytes) else str(version)}

    def close(self) -> None:
        if self.sentinel is not None and self.sentinel.is_open:
            self.sentinel.close()
        broker.close()


if __name__ == "__main__":
    h.main(DramatiqDriver)
