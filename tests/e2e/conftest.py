"""Real processes: `jobgate serve` started as a subprocess, driven over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

JOBGATE = [str(Path(sys.executable).parent / "jobgate")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """A running `jobgate serve` and an admin key for it."""

    process: subprocess.Popen[bytes]
    url: str
    key: str
    data_dir: Path
    log: Path
    env: dict[str, str]

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key or self.key}"},
            timeout=10,
        )

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                return self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode


def run_cli(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [*JOBGATE, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def start_server(
    tmp_path: Path,
    database_url: str | None,
    *,
    worker_concurrency: int = 4,
    settings: dict[str, str] | None = None,
) -> Server:
    """`jobgate serve` on a free port, with an admin key; `settings` are more env vars.

    A free port can be taken by another test process between our probe and the server's
    bind; then the server exits, and it starts again on another port. It counts as up
    once it answers with our key (not merely once the port answers: that could be the
    other process's server)."""
    for _ in range(5):
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("JOBGATE_")},
            "JOBGATE_DATA_DIR": str(tmp_path / "data"),
            "JOBGATE_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "JOBGATE_LOG_FORMAT": "json",
            "JOBGATE_WORKER_POLL_INTERVAL_S": "0.1",
            **(settings or {}),
        }
        if database_url:
            env["JOBGATE_DATABASE_URL"] = database_url
        run_cli("db", "upgrade", env=env)
        key_file = tmp_path / "e2e-admin-key"
        if not key_file.exists():
            created = run_cli("keys", "create", "--owner", "e2e-admin", "--role", "admin", env=env)
            key_file.write_text(created.strip().splitlines()[-1])
        key = key_file.read_text()
        log = tmp_path / "serve.log"
        process = subprocess.Popen(
            [
                *JOBGATE,
                *("serve", "--port", str(port), "--worker-concurrency", str(worker_concurrency)),
            ],
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        if _answers_as_ours(process, url, key):
            return Server(
                process=process, url=url, key=key, data_dir=tmp_path / "data", log=log, env=env
            )
        process.kill()
        process.wait()
        if "address already in use" not in log.read_text():
            break
    raise AssertionError("jobgate serve did not start:\n" + log.read_text())


def _answers_as_ours(process: subprocess.Popen[bytes], url: str, key: str) -> bool:
    """Whether the server at `url` comes up and knows `key`, within 30 s."""
    deadline = time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline:
        try:
            me = httpx.get(f"{url}/v1/me", headers={"Authorization": f"Bearer {key}"}, timeout=1)
            if me.status_code == 200 and process.poll() is None:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


DATABASES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.service("postgres")),
]


def _database(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("fresh_postgres_url")
    return url


@pytest.fixture(params=DATABASES)
def api_only(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """`jobgate serve --worker-concurrency 0`: stages run only in `jobgate worker` processes."""
    running = start_server(tmp_path, _database(request), worker_concurrency=0)
    try:
        yield running
    finally:
        code = running.stop()
        assert code == 0, running.log.read_text()[-5000:]


@pytest.fixture(params=DATABASES)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """`jobgate serve` with an in-process worker of concurrency 4."""
    running = start_server(tmp_path, _database(request))
    try:
        yield running
    finally:
        code = running.stop()
        assert code == 0, running.log.read_text()[-5000:]
