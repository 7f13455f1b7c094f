"""Streams across processes: two `jobgate serve` processes and a `jobgate worker`, with
the bus's server (Redis, or PostgreSQL itself) restarted mid-stream.

A stream on API process A follows a job submitted through API process B and run by the
worker. The client reconnects with `Last-Event-ID` whenever its connection drops, as
`EventSource` does; what it receives must be the job's stored log after the first
`state`, in order, with no gap and no duplicate, ending with `completed`.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TCP_SERVICES
from tests.contract.test_transport_restart import _start, _stop
from tests.e2e.conftest import JOBGATE, Server, start_server
from tests.engine.test_postgres_restart import _restart_postgres

pytestmark = pytest.mark.timeout(300)
REDIS_URL = f"redis://{TCP_SERVICES['redis']}/0"


class Follower(threading.Thread):
    """Reads one job's SSE stream to its end, reconnecting with `Last-Event-ID`."""

    def __init__(self, server: Server, job_id: str) -> None:
        super().__init__(daemon=True)
        self.server, self.job_id = server, job_id
        self.events: list[tuple[int, str]] = []
        self.first_state: int | None = None
        self.reconnects = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._follow()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _follow(self) -> None:
        deadline = time.monotonic() + 180
        last: int | None = None
        while time.monotonic() < deadline:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                with (
                    self.server.client() as client,
                    client.stream(
                        "GET", f"/v1/jobs/{self.job_id}/events", headers=headers, timeout=30
                    ) as response,
                ):
                    if response.status_code != 200:
                        raise httpx.TransportError(f"status {response.status_code}")
                    for kind, event_id in _events(response):
                        if kind == "state":
                            assert self.first_state is None, "a resumed stream sent state"
                            self.first_state = last = event_id
                        elif event_id is not None:
                            self.events.append((event_id, kind))
                            last = event_id
                            if kind in ("completed", "error", "cancelled"):
                                return
            except httpx.HTTPError:
                pass
            self.reconnects += 1
            time.sleep(0.5)
        raise AssertionError("the stream never reached the job's end")


def _events(response: httpx.Response) -> Any:
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if "event" in fields:
                raw = fields.get("id")
                yield fields["event"], int(raw) if raw is not None else None
            fields = {}
        else:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def _restart(bus: str) -> None:
    if bus == "redis":
        try:
            _stop("redis")
        finally:
            _start("redis")
    else:
        _restart_postgres()


@pytest.mark.service("postgres")
@pytest.mark.parametrize(
    "bus", ["postgres", pytest.param("redis", marks=pytest.mark.service("redis"))]
)
@pytest.mark.disruptive
def test_a_stream_on_one_api_follows_a_job_of_another_through_a_restart(
    bus: str, tmp_path: Path, fresh_postgres_url: str
) -> None:
    settings = {
        "JOBGATE_BUS_URL": "postgres" if bus == "postgres" else REDIS_URL,
        "JOBGATE_TRANSPORT_NAMESPACE": f"jg{uuid.uuid4().hex[:10]}",
        "JOBGATE_SSE_HEARTBEAT_S": "1",
        "JOBGATE_SSE_POLL_S": "2",
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = start_server(tmp_path / "a", fresh_postgres_url, worker_concurrency=0, settings=settings)
    b = start_server(tmp_path / "b", fresh_postgres_url, worker_concurrency=0, settings=settings)
    worker = subprocess.Popen(
        [*JOBGATE, "worker", "--concurrency", "2"],
        env=a.env,
        stdout=(tmp_path / "worker.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        with b.client() as client:
            params = {"steps": 60, "step_ms": 100, "message_every": 5}
            answer = client.post("/v1/jobs", json={"pipeline": "steps", "params": params})
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["id"]
        follower = Follower(a, job_id)
        follower.start()
        _wait_for(lambda: sum(k == "progress" for _, k in follower.events) >= 5, 60)
        before_restart = len(follower.events)
        _restart(bus)
        follower.join(timeout=200)
        assert not follower.is_alive(), "the stream did not end"
        if follower.error is not None:
            raise follower.error
        with b.client() as client:
            stored = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()
    finally:
        worker.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.wait(timeout=30)
        worker.kill()
        for server in (a, b):
            server.stop()
    expected = [(e["seq"], e["type"]) for e in stored["events"] if e["seq"] > follower.first_state]
    assert follower.events == expected, json.dumps(
        {"got": follower.events[-5:], "reconnects": follower.reconnects}
    )
    assert follower.events[-1][1] == "completed"
    # The restart came mid-job: most of it was streamed after.
    assert len(follower.events) - before_restart >= 10


def _wait_for(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)
