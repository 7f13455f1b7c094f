"""Celery: prefork pool, concurrency 2, defaults otherwise; Redis or RabbitMQ broker.

Run by path inside the celery venv (`BENCH_BROKER=redis|rabbitmq`); the workers import
this file as the module `celery_driver` (`celery -A celery_driver worker`).
Results go to the Redis result backend (needed by the latency test; kept for every job,
Celery's default once a backend is configured).
"""

from __future__ import annotations

from typing import Any

import _harness as h
from celery import Celery

CONFIG = h.Config.from_env()
QUEUE = f"bench_peers_celery_{CONFIG.broker}"
BROKER_URL = CONFIG.amqp_url if CONFIG.broker == "rabbitmq" else CONFIG.redis_url

app = Celery("bench_peers", broker=BROKER_URL, backend=CONFIG.redis_url)
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
)
_counter = h.SyncCounter(CONFIG.redis_url)


@app.task(name="bench.noop")
def noop() -> int:
    return _counter.incr()


class CeleryDriver(h.Driver):
    dists = ("celery", "kombu", "billiard", "redis", "amqp")
    bulk_api = None  # group().apply_async() still publishes one message per job

    def __init__(self, config: h.Config) -> None:
        super().__init__(config)
        self.sentinel: Any = None
        self.generation = 0

    def worker_commands(self) -> list[list[str]]:
        return [
            [
                str(self.bin_dir / "celery"),
                "-A",
                "celery_driver",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                "2",
                "--queues",
                QUEUE,
                "--loglevel",
                "WARNING",
                "--hostname",
                f"bench-{CONFIG.broker}@%h",
            ]
        ]

    def enqueue_single(self, n: int) -> None:
        for _ in range(n):
            noop.delay()

    def latency(self, n: int, cap_s: float) -> list[float]:
        return h.timed_loop(n, cap_s, lambda: noop.delay().get(timeout=30))

    def purge(self) -> None:
        if CONFIG.broker == "rabbitmq":
            with app.connection_for_write() as conn:
                queue = app.amqp.queues[QUEUE](conn.default_channel)
                queue.declare()
                queue.purge()

    def server_epoch(self) -> str:
        """A RabbitMQ restart closes this idle connection: the next channel open fails."""
        if CONFIG.broker != "rabbitmq":
            return ""
        if self.sentinel is not None:
            try:
                self.sentinel.channel().close()
                return str(self.generation)
            except Exception:
                self.sentinel = None
        self.generation += 1
        self.sentinel = app.connection_for_write()
        self.sentinel.connect()
        return str(self.generation)

    def servers(self) -> dict[str, str]:
        if CONFIG.broker != "rabbitmq":
            return {}
        with app.connection_for_write() as conn:
            conn.connect()
            props = conn.connection.server_properties
            return {"rabbitmq": _text(props.get("version", "?"))}

    def close(self) -> None:
        if self.sentinel is not None:
            self.sentinel.release()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


if __name__ == "__main__":
    h.main(CeleryDriver)
