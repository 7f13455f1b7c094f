"""Helpers for the end-to-end tests: restarting `jobgate serve` on the same port and
database, and starting a worker process."""

from __future__ import annotations

import subprocess
import time
from dataclasses import replace

import httpx

from tests.e2e.conftest import JOBGATE, Server


def restart(server: Server, *, worker_concurrency: int = 0) -> Server:
    """Kill `jobgate serve` (SIGKILL, like a crash) and start it again on the same port,
    database and settings."""
    server.process.kill()
    server.process.wait(timeout=10)
    port = server.url.rsplit(":", 1)[1]
    process = subprocess.Popen(
        [*JOBGATE, "serve", "--port", port, "--worker-concurrency", str(worker_concurrency)],
        env=server.env,
        stdout=server.log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return replace(server, process=process)
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("jobgate serve did not restart:\n" + server.log.read_text())
        time.sleep(0.1)


def start_worker(server: Server, name: str) -> subprocess.Popen[bytes]:
    """A `jobgate worker` process for an API-only server."""
    return subprocess.Popen(
        [*JOBGATE, "worker", "--concurrency", "2", "--id", name],
        env=server.env,
        stdout=(server.log.parent / f"{name}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
