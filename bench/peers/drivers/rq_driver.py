"""RQ: two `rq worker` processes of the default `Worker` class (a forked work horse per job).

Run by path inside the rq venv. The workers load this file as their settings module
(`--config rq_driver`, which defines no RQ setting) so that it is imported once, before
the forks, as RQ's performance notes advise; otherwise every work horse would import it
again (~20 ms a job here). Results are kept (RQ's default `result_ttl`), and read back
for the latency test with `Job.latest_result(timeout=...)` (a blocking XREAD on the job's
result stream).
"""

from __future__ import annotations

import _harness as h
from redis import Redis
from rq import Queue, get_current_job

QUEUE = "bench_peers_rq"
FUNC = "rq_driver.noop"
WORKERS = 2


def noop() -> int:
    job = get_current_job()
    assert job is not None
    # The work horse's own connection (same database): no new connection per forked job.
    return int(job.connection.incr(h.COUNTER_KEY))


class RqDriver(h.Driver):
    dists = ("rq", "redis")
    bulk_api = "Queue.enqueue_many(Queue.prepare_data(...) ...), one pipeline per batch"

    def __init__(self, config: h.Config) -> None:
        super().__init__(config)
        self.queue = Queue(QUEUE, connection=Redis.from_url(config.redis_url))

    def worker_commands(self) -> list[list[str]]:
        return [
            [
                str(self.bin_dir / "rq"),
                "worker",
                "--url",
                self.config.redis_url,
                "--worker-class",
                "rq.Worker",
                "--config",
                "rq_driver",
                "--logging_level",
                "WARNING",
                "--name",
                f"bench-{i}",
                QUEUE,
            ]
            for i in range(WORKERS)
        ]

    def enqueue_single(self, n: int) -> None:
        for _ in range(n):
            self.queue.enqueue(FUNC)

    def enqueue_bulk(self, n: int, batch: int) -> None:
        for start in range(0, n, batch):
            size = min(batch, n - start)
            self.queue.enqueue_many([Queue.prepare_data(FUNC) for _ in range(size)])

    def latency(self, n: int, cap_s: float) -> list[float]:
        def one() -> None:
            result = self.queue.enqueue(FUNC).latest_result(timeout=30)
            if result is None or result.type != result.Type.SUCCESSFUL:
                raise RuntimeError(f"job did not succeed: {result!r}")

        return h.timed_loop(n, cap_s, one)


if __name__ == "__main__":
    h.main(RqDriver)
