"""End to end: a worker cut off from PostgreSQL by a partition (RELIABILITY.md, scenario 9).

The worker's every connection goes through a proxy that blackholes (packets dropped, no
reset, connections left open, as with `iptables -j DROP`) and later heals, delivering
what it held back. PostgreSQL still sees the cut-off worker's sessions, its leader lock
included: only its silence can give it away.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from jobgate.transport.wakeups import asyncpg_dsn
from tests.conftest import POSTGRES_DSN
from tests.e2e.conftest import JOBGATE, Server, start_server
from tests.e2e.test_serve import wait_for, wait_for_stage
from tests.proxy import CuttableProxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

LOST_AFTER_S = 3.0
# A follower misses a silent leader's beacon for 7 s (one beacon interval of two 2 s
# checks, one check and a second) + up to 0.5 s of jitter, asks it to beacon, and
# deposes it after LOST_AFTER more (docs/liveness.md).
BEACON_PATIENCE_S = 2 * 2 + 2 + 1 + 0.5
# Lost window + sweep + run + margin, as for a SIGKILLed worker (test_serve.py).
TAKEOVER_S = LOST_AFTER_S + 2 + 2 + 5


@pytest.fixture
def proxy() -> Iterator[CuttableProxy]:
    """A blackholing proxy in front of the test PostgreSQL server."""
    target = make_url(POSTGRES_DSN)
    running = CuttableProxy(target.port or 5432, host=target.host or "127.0.0.1")
    try:
        yield running
    finally:
        running.close()


def _worker(
    server: Server, log: Path, name: str, database_url: str, queues: str = "default"
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*JOBGATE, "worker", "--concurrency", "2", "--id", name, "--queues", queues],
        env={**server.env, "JOBGATE_DATABASE_URL": database_url},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def _logged_at(log: Path, event: str, timeout: float = 10) -> float:
    """When (epoch seconds) `event` was first logged in the JSON log `log`."""
    deadline = time.monotonic() + timeout
    while True:
        for line in log.read_text().splitlines():
            if line.startswith("{") and (entry := json.loads(line))["event"] == event:
                return datetime.fromisoformat(entry["timestamp"]).timestamp()
        assert time.monotonic() < deadline, f"no {event} in {log.name}:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)


def _stop(worker: subprocess.Popen[bytes], log: Path, timeout: float = 15) -> None:
    """SIGTERM: the worker exits 0 within `timeout`."""
    worker.send_signal(signal.SIGTERM)
    try:
        code = worker.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        tail = log.read_text()[-4000:]
        raise AssertionError(f"no exit {timeout} s after SIGTERM:\n{tail}") from None
    assert code == 0, log.read_text()[-4000:]


def _rows_left(database_url: str, job_id: str) -> tuple[int, int]:
    """The job's task rows, and its stages still running, straight from the store."""

    async def count() -> tuple[int, int]:
        conn = await asyncpg.connect(asyncpg_dsn(database_url), timeout=10)
        try:
            tasks = await conn.fetchval("SELECT count(*) FROM tasks WHERE job_id = $1", job_id)
            running = await conn.fetchval(
                "SELECT count(*) FROM stages WHERE job_id = $1 AND status = 'running'", job_id
            )
            return int(tasks), int(running)
        finally:
            await conn.close()

    return asyncio.run(count())


@pytest.mark.service("postgres")
@pytest.mark.parametrize("role", ["leader", "follower"])
def test_a_blackholed_worker_loses_its_stage_and_is_fenced_after_the_heal(
    role: str, fresh_postgres_url: str, proxy: CuttableProxy, tmp_path: Path
) -> None:
    """Blackhole a worker's database traffic mid-stage: another worker takes the stage
    over within the lost-worker window (the 120 s lease has not expired; a cut-off
    leader is first deposed), and the job completes once. After the heal the cut-off
    worker's late outcome is fenced, its pools recover (it runs the next job) and it
    drains on SIGTERM. No task row is left, nothing runs twice."""
    settings = {
        "JOBGATE_PIPELINES": "tests.e2e.pipelines:dozer",
        "PYTHONPATH": str(Path(__file__).parents[2]),
        "JOBGATE_WORKER_LOST_AFTER_S": str(LOST_AFTER_S),
        "JOBGATE_LEASE_S": "120",
    }
    api = start_server(tmp_path, fresh_postgres_url, worker_concurrency=0, settings=settings)
    through_proxy = make_url(fresh_postgres_url).set(host="127.0.0.1", port=proxy.port)
    logs = {name: tmp_path / f"{name}.log" for name in ("leader", "cut-off", "survivor")}
    workers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        if role == "follower":  # a leader that claims nothing of ours is up first
            workers["leader"] = _worker(
                api, logs["leader"], "leader", fresh_postgres_url, queues="elsewhere"
            )
            _logged_at(logs["leader"], "leader_elected")
        workers["cut-off"] = cut_off = _worker(
            api, logs["cut-off"], "cut-off", through_proxy.render_as_string(hide_password=False)
        )
        with api.client() as client:
            job_id = client.post("/v1/jobs", json={"pipeline": "dozer", "params": {}}).json()["id"]
            wait_for_stage(client, job_id, "sleep", "running")
            proxy.blackhole()
            cut_at = time.time()
            workers["survivor"] = survivor = _worker(
                api, logs["survivor"], "survivor", fresh_postgres_url
            )
            budget = TAKEOVER_S + (BEACON_PATIENCE_S if role == "leader" else 0)
            job = wait_for(client, job_id, {"succeeded", "failed"}, timeout=budget + 10)
            # From the cut, or from when the survivor was up if it took longer to start
            # (a loaded machine's imports): in production it is running already.
            survivor_up = _logged_at(logs["survivor"], "worker_started")
            recovered_in = time.time() - max(cut_at, survivor_up)
            assert job["status"] == "succeeded", job
            assert job["result"] == {"attempt": 2}  # the survivor's run, not the cut-off one's
            if role == "leader":  # deposed LOST_AFTER after the beacon it missed
                deposed_in = _logged_at(logs["survivor"], "leader_deposed") - _logged_at(
                    logs["survivor"], "worker_started"
                )
                assert deposed_in < BEACON_PATIENCE_S + LOST_AFTER_S + 0.5
            assert recovered_in < budget
            assert cut_off.poll() is None  # it knows nothing yet

            proxy.heal()
            # Its stale outcome reaches the store now, and is refused.
            _logged_at(logs["cut-off"], "outcome_dropped_lease_lost")
            _stop(survivor, logs["survivor"])
            # The cut-off worker, the only one left for the queue, runs the next job.
            after = client.post("/v1/jobs", json={"pipeline": "noop", "params": {}}).json()
            done = wait_for(client, after["id"], {"succeeded", "failed"}, timeout=15)
            assert done["status"] == "succeeded", done
            _stop(cut_off, logs["cut-off"])

            # Nothing it held back changed the job; one end, nothing left behind.
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert (job["status"], job["result"]) == ("succeeded", {"attempt": 2})
            assert job["stages"][0]["attempt"] == 2
            events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()[
                "events"
            ]
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            types = [e["type"] for e in events]
            assert types.count("completed") == 1
            assert types[-1] == "completed"
            lost = [
                e
                for e in events
                if e["type"] == "stage_update"
                and (e["data"].get("error") or {}).get("type") == "lost"
            ]
            assert len(lost) == 1, events
            assert _rows_left(fresh_postgres_url, job_id) == (0, 0)
            alive = [w["id"] for w in client.get("/v1/workers").json()["workers"]]
            assert alive == ([] if role == "leader" else ["leader"])
    finally:
        proxy.heal()
        for process in workers.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        assert api.stop() == 0


@pytest.mark.service("postgres")
def test_a_blackholed_worker_still_stops_on_sigterm(
    fresh_postgres_url: str, proxy: CuttableProxy, tmp_path: Path
) -> None:
    """SIGTERM while the worker's database is out of reach: it cannot hand its stage
    back, but it still exits 0 soon after its grace (the lease or the sweep returns the
    stage), rather than waiting for the partition to heal."""
    settings = {
        "JOBGATE_PIPELINES": "tests.e2e.pipelines:dozer",
        "PYTHONPATH": str(Path(__file__).parents[2]),
        "JOBGATE_SHUTDOWN_GRACE_S": "1",
    }
    api = start_server(tmp_path, fresh_postgres_url, worker_concurrency=0, settings=settings)
    through_proxy = make_url(fresh_postgres_url).set(host="127.0.0.1", port=proxy.port)
    log = tmp_path / "cut-off.log"
    worker = _worker(api, log, "cut-off", through_proxy.render_as_string(hide_password=False))
    try:
        with api.client() as client:
            job_id = client.post("/v1/jobs", json={"pipeline": "dozer", "params": {}}).json()["id"]
            wait_for_stage(client, job_id, "sleep", "running")
        proxy.blackhole()
        _stop(worker, log, timeout=1 + 15)  # grace + the bound of a stop out of reach
    finally:
        proxy.heal()
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        assert api.stop() == 0
