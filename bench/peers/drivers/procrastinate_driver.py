"""Procrastinate on PostgreSQL: one `procrastinate worker`, concurrency 10, defaults otherwise.

Run by path inside the procrastinate venv; the worker imports this file as
`procrastinate_driver` (`procrastinate --app procrastinate_driver.app worker`). Jobs live
in the dedicated database `bench_procrastinate` (created when missing), whose `public`
schema is dropped and recreated, with procrastinate's schema applied, before every
measurement. The worker learns of new jobs by LISTEN/NOTIFY (its default). Procrastinate
keeps no return values: the latency test polls the job's status until it is `succeeded`
(every `client_poll_s`). Bulk enqueue: `Task.batch_defer_async()` (one INSERT per batch).
"""

from __future__ import annotations

from typing import Any

import _harness as h
import psycopg
from procrastinate import App, PsycopgConnector
from procrastinate.jobs import Status

CONFIG = h.Config.from_env()
QUEUE = "bench_peers"

app = App(connector=PsycopgConnector(conninfo=CONFIG.pg_dsn))
_counter = h.AsyncCounter(CONFIG.redis_url)


@app.task(name="bench.noop", queue=QUEUE)
async def noop() -> int:
    return await _counter.incr()


class ProcrastinateDriver(h.AsyncDriver):
    dists = ("procrastinate", "psycopg", "psycopg-binary", "psycopg-pool", "redis")
    bulk_api = "Task.batch_defer_async(*kwargs), one INSERT per batch"

    def __init__(self, config: h.Config) -> None:
        super().__init__(config)
        self.opened = False
        _ensure_database(config)

    def worker_commands(self) -> list[list[str]]:
        return [
            [
                str(self.bin_dir / "procrastinate"),
                "--app",
                "procrastinate_driver.app",
                "--log-level",
                "warning",
                "worker",
                "--concurrency",
                "10",
                "--queues",
                QUEUE,
            ]
        ]

    async def _open(self) -> None:
        if not self.opened:
            await app.open_async()
            self.opened = True

    def enqueue_single(self, n: int) -> None:
        async def go() -> None:
            await self._open()
            for _ in range(n):
                await noop.defer_async()

        self.run(go())

    def enqueue_bulk(self, n: int, batch: int) -> None:
        async def go() -> None:
            await self._open()
            for start in range(0, n, batch):
                await noop.batch_defer_async(*({} for _ in range(min(batch, n - start))))

        self.run(go())

    def latency(self, n: int, cap_s: float) -> list[float]:
        manager = app.job_manager

        async def one() -> None:
            job_id = await noop.defer_async()

            async def done() -> bool:
                status = await manager.get_job_status_async(job_id)
                if status in (Status.FAILED, Status.ABORTED, Status.CANCELLED):
                    raise RuntimeError(f"job {job_id} ended {status}")
                return status == Status.SUCCEEDED

            await h.poll_until(done, self.config.client_poll_s, timeout=30)

        async def go() -> list[float]:
            await self._open()
            return await h.atimed_loop(n, cap_s, one)

        return self.run(go())

    def purge(self) -> None:
        async def go() -> None:
            if self.opened:  # the pool's connections know the old schema's types
                await app.close_async()
                self.opened = False
            async with await psycopg.AsyncConnection.connect(
                CONFIG.pg_dsn, autocommit=True
            ) as conn:
                await conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
                await conn.execute("CREATE SCHEMA public")
            await self._open()
            await app.schema_manager.apply_schema_async()

        self.run(go())

    def servers(self) -> dict[str, str]:
        with psycopg.connect(CONFIG.pg_dsn) as conn:
            row: Any = conn.execute("SHOW server_version").fetchone()
            return {"postgresql": str(row[0])}

    def server_epoch(self) -> str:
        with psycopg.connect(CONFIG.pg_dsn) as conn:
            row: Any = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
            return str(row[0])

    def close(self) -> None:
        if self.opened:
            self.run(app.close_async())
        super().close()


def _ensure_database(config: h.Config) -> None:
    name = psycopg.conninfo.conninfo_to_dict(config.pg_dsn).get("dbname")
    with psycopg.connect(config.pg_admin_dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(
                psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(str(name)))
            )


if __name__ == "__main__":
    h.main(ProcrastinateDriver)
