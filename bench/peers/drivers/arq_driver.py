"""arq: two `arq` worker processes with arq's default settings (max_jobs 10, poll_delay 0.5 s).

Run by path inside the arq venv; the workers import this file as `arq_driver`
(`arq arq_driver.WorkerSettings`). Results are kept (arq's default `keep_result`); the
latency test reads them with `Job.result()`, which polls (every `client_poll_s` here).
arq has no bulk enqueue API.
"""

from __future__ import annotations

from typing import Any, ClassVar

import _harness as h
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings

CONFIG = h.Config.from_env()
QUEUE = "bench_peers_arq"
WORKERS = 2
# arq's own log config, at WARNING: its default logs two lines per job at INFO.
LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler", "level": "WARNING"}},
    "loggers": {"arq": {"handlers": ["stderr"], "level": "WARNING"}},
}
_counter = h.AsyncCounter(CONFIG.redis_url)


async def noop(ctx: dict[str, Any]) -> int:
    return await _counter.incr()


class WorkerSettings:
    functions: ClassVar[list[Any]] = [noop]
    queue_name = QUEUE
    redis_settings = RedisSettings.from_dsn(CONFIG.redis_url)


class ArqDriver(h.AsyncDriver):
    dists = ("arq", "redis", "hiredis")

    def __init__(self, config: h.Config) -> None:
        super().__init__(config)
        self.pool: ArqRedis = self.run(
            create_pool(WorkerSettings.redis_settings, default_queue_name=QUEUE)
        )

    def worker_commands(self) -> list[list[str]]:
        command = [
            str(self.bin_dir / "arq"),
            "--custom-log-dict",
            "arq_driver.LOG_CONFIG",
            "arq_driver.WorkerSettings",
        ]
        return [command] * WORKERS

    def enqueue_single(self, n: int) -> None:
        async def go() -> None:
            for _ in range(n):
                await self.pool.enqueue_job("noop")

        self.run(go())

    def latency(self, n: int, cap_s: float) -> list[float]:
        async def one() -> None:
            job = await self.pool.enqueue_job("noop")
            assert job is not None
            await job.result(timeout=30, poll_delay=self.config.client_poll_s)

        return self.run(h.atimed_loop(n, cap_s, one))

    def close(self) -> None:
        self.run(self.pool.aclose())
        super().close()


if __name__ == "__main__":
    h.main(ArqDriver)
