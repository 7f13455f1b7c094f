"""What one rate-limit take costs the API process, with no server and no HTTP around it.

    python -m bench.limit_takes [--requests 50000]

Throughput ratios (`bench/auth.py`) and CPU shares (`bench/auth_profile.py`) measure a
whole server; this measures the limit code alone, as the submit route and the IP
middleware call it, on memory and on Redis storage (`JOBGATE_BENCH_REDIS_URL`, default
`redis://127.0.0.1:6379/0`): the per-IP take of every `/v1` request (`admitted_now`,
else `admit_ip`) from one address, and the per-user submit take (`take_submits`) spread
over 100 users. Limits are 1,000,000/minute, as in `bench/auth.py`, so nothing is
refused. The figure is wall time per take, the median of 3 passes, after a warm-up pass
(the first takes fetch the blocks taken ahead from Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

from jobgate.api.limits import RateLimits
from jobgate.config import Settings

LIMIT = "1000000/minute"
USERS = 100
REDIS_URL = os.environ.get("JOBGATE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SCOPE = {"type": "http", "path": "/v1/jobs", "client": ("203.0.113.7", 50000), "headers": []}


async def _ip_pass(limits: RateLimits, requests: int) -> float:
    started = time.perf_counter()
    for _ in range(requests):
        if not limits.admitted_now(SCOPE) and await limits.admit_ip(SCOPE) is not None:
            raise RuntimeError("an IP take was refused: the limit is too small for the run")
    return (time.perf_counter() - started) / requests


async def _submit_pass(limits: RateLimits, requests: int) -> float:
    started = time.perf_counter()
    for i in range(requests):
        taken, _ = await limits.take_submits(f"user-{i % USERS}", 1)
        if not taken:
            raise RuntimeError("a submit take was refused: the limit is too small for the run")
    return (time.perf_counter() - started) / requests


async def measure(url: str, requests: int) -> dict[str, float]:
    """Median µs per take of each kind on the storage at `url`."""
    settings = Settings(
        rate_limit_ip=LIMIT,
        rate_limit_submit=LIMIT,
        limits_url=url,
        limits_namespace=f"bench-takes-{uuid.uuid4().hex[:8]}",
    )
    limits = RateLimits.from_settings(settings)
    try:
        figures: dict[str, float] = {}
        for name, one_pass in (("IP take", _ip_pass), ("submit take", _submit_pass)):
            await one_pass(limits, requests // 10)  # warm-up
            passes = [await one_pass(limits, requests) for _ in range(3)]
            figures[name] = statistics.median(passes) * 1e6
        return figures
    finally:
        await limits.aclose()


async def main(requests: int) -> None:
    print("| storage | IP take (µs) | submit take (µs) |")
    print("| --- | ---: | ---: |")
    for label, url in (("memory", "memory://"), ("Redis", REDIS_URL)):
        figures = await measure(url, requests)
        print(f"| {label} | {figures['IP take']:.2f} | {figures['submit take']:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    asyncio.run(main(parser.parse_args().requests))
