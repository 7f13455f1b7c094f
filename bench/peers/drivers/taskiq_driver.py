"""taskiq with taskiq-redis: the Redis Streams broker, `taskiq worker` with 2 processes.

Run by path inside the taskiq venv; the workers import this file as `taskiq_driver`
(`taskiq worker taskiq_driver:broker`), with taskiq's defaults otherwise (100 async tasks
per process, ack when the result is saved). Every result is saved in the Redis result
backend; the latency test waits for it with `wait_result()`, which polls (every
`client_poll_s` here). taskiq has no bulk enqueue API.
"""

from __future__ import annotations

import _harness as h
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

CONFIG = h.Config.from_env()
QUEUE = "bench_peers_taskiq"
WORKERS = 2

# socket_timeout=None instead of redis-py 8's 5 s: the drain test freezes the workers
# (SIGSTOP) for a few seconds, and an XREADGROUP that was waiting then times out on the
# client at SIGCONT although its answer has arrived; its messages would sit unacked
# until XAUTOCLAIM (10 min). Unfrozen, nothing changes: XREADGROUP blocks 2 s at most.
broker = RedisStreamBroker(
    url=CONFIG.redis_url, queue_name=QUEUE, socket_timeout=None
).with_result_backend(RedisAsyncResultBackend(redis_url=CONFIG.redis_url))
_counter = h.AsyncCounter(CONFIG.redis_url)


@broker.task(task_name="bench.noop")
async def noop() -> int:
    return await _counter.incr()


class TaskiqDriver(h.AsyncDriver):
    dists = ("taskiq", "taskiq-redis", "redis")

    def __init__(self, config: h.Config) -> None:
        super().__init__(config)
        self.started = False

    def worker_commands(self) -> list[list[str]]:
        return [
            [
                str(self.bin_dir / "taskiq"),
                "worker",
                "taskiq_driver:broker",
                "--workers",
                str(WORKERS),
                "--log-level",
                "WARNING",
            ]
        ]

    async def _startup(self) -> None:
        # After every purge: the stream's consumer group goes with the flushed database.
        await broker.startup()
        self.started = True

    def enqueue_single(self, n: int) -> None:
        async def go() -> None:
            if not self.started:
                await self._startup()
            for _ in range(n):
                await noop.kiq()

        self.run(go())

    def latency(self, n: int, cap_s: float) -> list[float]:
        async def one() -> None:
            task = await noop.kiq()
            result = await task.wait_result(check_interval=self.config.client_poll_s, timeout=30)
            if result.is_err:
                raise RuntimeError(f"task failed: {result.error!r}")

        return self.run(h.atimed_loop(n, cap_s, one))

    def purge(self) -> None:
        if self.started:
            self.run(broker.shutdown())
            self.started = False

    def close(self) -> None:
        self.purge()
        super().close()


if __name__ == "__main__":
    h.main(TaskiqDriver)
