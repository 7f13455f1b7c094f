"""Two real `jobgate serve` processes behind one Redis keep one submit limit between them."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from tests.conftest import TCP_SERVICES
from tests.e2e.conftest import start_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120), pytest.mark.service("redis")]

REDIS_URL = f"redis://{TCP_SERVICES['redis']}/0"
STEPS = {"pipeline": "steps", "params": {"steps": 1}}


def test_two_serve_processes_on_one_redis_accept_exactly_the_limit(tmp_path: Path) -> None:
    """Submits spread over two processes, in turn and then all at once: the accepted ones
    add up to `JOBGATE_RATE_LIMIT_SUBMIT`, and every refusal is a 429 with Retry-After."""
    namespace = f"jobgate-e2e-{uuid.uuid4().hex}"
    settings = {
        "JOBGATE_LIMITS_URL": REDIS_URL,
        "JOBGATE_LIMITS_NAMESPACE": namespace,
        "JOBGATE_RATE_LIMIT_SUBMIT": "4/hour",
    }
    # Separate data directories: the processes share nothing but Redis. Both admin keys
    # belong to the owner `e2e-admin`, so both count against one window.
    servers = [
        start_server(tmp_path / name, None, worker_concurrency=0, settings=settings)
        for name in ("a", "b")
    ]
    try:
        with servers[0].client() as first, servers[1].client() as second:
            clients = [first, second]
            in_turn = [clients[i % 2].post("/v1/jobs", json=STEPS) for i in range(6)]
            assert [r.status_code for r in in_turn] == [202, 202, 202, 202, 429, 429]
            assert all(int(r.headers["retry-after"]) >= 3599 for r in in_turn[4:])
            remaining = [r.headers["ratelimit-remaining"] for r in in_turn]
            assert remaining == ["3", "2", "1", "0", "0", "0"]

            with redis.Redis.from_url(REDIS_URL) as client:
                for key in client.scan_iter(f"{namespace}:*"):
                    client.delete(key)

            def post(i: int) -> int:
                return clients[i % 2].post("/v1/jobs", json=STEPS).status_code

            with ThreadPoolExecutor(12) as pool:
                at_once = list(pool.map(post, range(12)))
            assert sorted(at_once) == [202] * 4 + [429] * 8
    finally:
        for server in servers:
            assert server.stop() == 0, server.log.read_text()[-5000:]
        with redis.Redis.from_url(REDIS_URL) as client:
            keys = list(client.scan_iter(f"{namespace}:*"))
            if keys:
                client.delete(*keys)
