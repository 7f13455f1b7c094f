"""End to end: `jobgate serve` in its own process, driven over HTTP like a client would."""

from __future__ import annotations

import csv
import io
import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import JOBGATE, Server, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def wait_for(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def wait_for_stage(
    client: httpx.Client, job_id: str, stage: str, status: str, timeout: float = 30
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if next(s for s in job["stages"] if s["name"] == stage)["status"] == status:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_steps_job_runs_to_completion(server: Server) -> None:
    with server.client() as client:
        answer = client.post(
            "/v1/jobs",
            json={"pipeline": "steps", "params": {"steps": 3, "step_ms": 10, "cost_per_step": 0.5}},
        )
        assert answer.status_code == 202, answer.text
        assert answer.headers["location"] == f"/v1/jobs/{answer.json()['id']}"
        job = wait_for(client, answer.json()["id"], {"succeeded", "failed"})
        assert job["status"] == "succeeded"
        assert job["result"] == {"steps": 3, "cost_usd": 1.5}
        assert job["cost"]["actual_usd"] == pytest.approx(1.5)
        events = client.get(f"/v1/jobs/{job['id']}/events").json()["events"]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["type"] == "completed"


def test_text_stats_with_files_records_partial_failure_and_signed_download(server: Server) -> None:
    files = [
        ("files", ("one.txt", b"the cat\nthe dog\n", "text/plain")),
        ("files", ("latin.txt", b"caf\xe9\n", "text/plain")),
        ("files", ("two.md", b"# the end\n", "text/markdown")),
    ]
    with server.client() as client:
        answer = client.post(
            "/v1/jobs",
            data={"pipeline": "text-stats", "params": json.dumps({"top": 3})},
            files=files,
        )
        assert answer.status_code == 202, answer.text
        job = wait_for(client, answer.json()["id"], {"succeeded", "failed"})
        assert job["status"] == "succeeded", job["error"]
        assert job["records"] == {"succeeded": 2, "failed": 1, "expected": 3}
        assert job["result"]["files"] == 2
        assert job["result"]["top_words"][0] == ["the", 3]
        failed = client.get(f"/v1/jobs/{job['id']}/records", params={"status": "failed"}).json()
        assert [r["key"] for r in failed["records"]] == ["latin.txt"]
        table = client.get(f"/v1/jobs/{job['id']}/records", params={"format": "csv"})
        assert table.status_code == 200
        assert len(list(csv.reader(io.StringIO(table.text)))) == 4  # header + 3 records
        link = client.get(f"/v1/jobs/{job['id']}/download").json()
        assert link["filename"] == "report.json"
        assert link["download_url"].startswith(server.url + "/")
    # The signed URL works with no credentials at all, and serves byte ranges.
    report = httpx.get(link["download_url"], timeout=10)
    assert report.status_code == 200
    assert json.loads(report.content) == job["result"]
    part = httpx.get(link["download_url"], headers={"Range": "bytes=0-9"}, timeout=10)
    assert part.status_code == 206
    assert part.content == report.content[:10]
    tampered = link["download_url"].replace("sig=", "sig=x")
    assert httpx.get(tampered, timeout=10).status_code == 403


def test_cancel_a_running_job(server: Server) -> None:
    with server.client() as client:
        job_id = client.post(
            "/v1/jobs", json={"pipeline": "steps", "params": {"steps": 500, "step_ms": 20}}
        ).json()["id"]
        wait_for(client, job_id, {"running"})
        answer = client.post(f"/v1/jobs/{job_id}/cancel")
        assert answer.status_code in (200, 202)
        job = wait_for(client, job_id, {"cancelled", "succeeded", "failed"}, timeout=5)
        assert job["status"] == "cancelled"
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 409


def test_failed_job_is_retried_from_the_failed_stage(server: Server) -> None:
    with server.client() as client:
        params = {"steps": 2, "step_ms": 0, "fail_at": 1, "fail_attempts": 3}
        job_id = client.post("/v1/jobs", json={"pipeline": "steps", "params": params}).json()["id"]
        failed = wait_for(client, job_id, {"failed", "succeeded"})
        assert failed["status"] == "failed"
        assert failed["error"]["message"] == "planned failure at step 1"
        answer = client.post(f"/v1/jobs/{job_id}/retry")
        assert answer.status_code == 202
        assert answer.json()["status"] == "queued"
        job = wait_for(client, job_id, {"succeeded", "failed"})
        assert job["status"] == "succeeded"
        attempts = {s["name"]: s["attempt"] for s in job["stages"]}
        assert attempts == {"prepare": 1, "work": 4, "finish": 1}


def test_separate_worker_processes_run_jobs_and_drain_on_sigterm(
    api_only: Server, tmp_path: Path
) -> None:
    """With the API alone, jobs wait; a `jobgate worker` runs them; SIGTERM drains it (exit 0)."""
    with api_only.client() as client:
        job_id = client.post(
            "/v1/jobs", json={"pipeline": "steps", "params": {"steps": 20, "step_ms": 50}}
        ).json()["id"]
        time.sleep(0.5)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [*JOBGATE, "worker", "--concurrency", "2", "--id", "e2e-worker"],
            env=api_only.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            # `work`, not the short `prepare` before it: the job is running from then on.
            wait_for_stage(client, job_id, "work", "running")
            workers = client.get("/v1/workers").json()["workers"]
            assert [w["id"] for w in workers] == ["e2e-worker"]
            # SIGTERM while `work` runs: the stage finishes within the grace, then exit 0.
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
        job = client.get(f"/v1/jobs/{job_id}").json()
        stages = {s["name"]: s for s in job["stages"]}
        assert stages["work"]["status"] == "succeeded"
        assert stages["work"]["attempt"] == 1
        assert stages["finish"]["status"] == "queued"  # left for the next worker
        assert client.get("/v1/workers").json()["workers"] == []


def test_sigterm_stops_a_worker_whose_sync_stage_ignores_its_cancel(tmp_path: Path) -> None:
    """A thread stage that never checks its cancel: SIGTERM still ends the worker (exit 0)
    soon after the grace, with the stage handed back for the next worker."""
    settings = {
        "JOBGATE_PIPELINES": "tests.e2e.pipelines:stubborn",
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }
    api = start_server(tmp_path, None, worker_concurrency=0, settings=settings)
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [*JOBGATE, "worker", "--id", "stubborn-host"],
        env={**api.env, "JOBGATE_SHUTDOWN_GRACE_S": "1"},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        with api.client() as client:
            job_id = client.post("/v1/jobs", json={"pipeline": "stubborn"}).json()["id"]
            wait_for_stage(client, job_id, "block", "running")
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=20) == 0, log.read_text()[-3000:]
            job = client.get(f"/v1/jobs/{job_id}").json()
            block = job["stages"][0]
            assert (block["status"], block["attempt"]) == ("queued", 0)
            assert client.get("/v1/workers").json()["workers"] == []
        assert "stage_threads_abandoned" in log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        assert api.stop() == 0


def _start_worker(server: Server, tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*JOBGATE, "worker", "--concurrency", "2", "--id", name],
        env={**server.env, "JOBGATE_WORKER_LOST_AFTER_S": "3", "JOBGATE_LEASE_S": "120"},
        stdout=(tmp_path / f"{name}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )


def _completed_once_after_one_loss(client: httpx.Client, job_id: str) -> None:
    """The job's events hold one `completed` and one attempt lost with its worker."""
    events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["events"]
    assert [e["type"] for e in events].count("completed") == 1
    lost = [
        e
        for e in events
        if e["type"] == "stage_update" and (e["data"].get("error") or {}).get("type") == "lost"
    ]
    assert len(lost) == 1


def test_sigkilled_worker_is_declared_lost_and_its_stage_finishes_elsewhere(
    api_only: Server, tmp_path: Path
) -> None:
    """SIGKILL mid-stage: within the lost-worker window another worker takes the stage
    over (its 120 s lease has not expired), the attempt is counted, and the job completes
    exactly once."""
    doomed = _start_worker(api_only, tmp_path, "doomed")
    survivor = None
    try:
        with api_only.client() as client:
            params = {"steps": 40, "step_ms": 50}
            job_id = client.post("/v1/jobs", json={"pipeline": "steps", "params": params}).json()[
                "id"
            ]
            wait_for_stage(client, job_id, "work", "running")
            doomed.kill()
            doomed.wait(timeout=10)
            killed_at = time.monotonic()
            survivor = _start_worker(api_only, tmp_path, "survivor")
            job = wait_for(client, job_id, {"succeeded", "failed"}, timeout=30)
            recovered_in = time.monotonic() - killed_at
            assert job["status"] == "succeeded"
            assert recovered_in < 3 + 2 + 2 + 5  # lost window + sweep + run + margin
            work = next(s for s in job["stages"] if s["name"] == "work")
            assert work["attempt"] == 2
            _completed_once_after_one_loss(client, job_id)
            workers = [w["id"] for w in client.get("/v1/workers").json()["workers"]]
            assert workers == ["survivor"]
    finally:
        for process in (doomed, survivor):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.service("postgres")
def test_a_job_its_submit_started_survives_a_sigkill_of_that_server(
    fresh_postgres_url: str, tmp_path: Path
) -> None:
    """An idle `serve` starts a job in the submit's own statement (the 202 says running),
    leased to its in-process worker. SIGKILL the server mid-stage: a worker elsewhere
    takes the stage over within the lost-worker window, the attempt is counted, and the
    job completes exactly once."""
    settings = {
        "JOBGATE_PIPELINES": "tests.e2e.pipelines:dozer",
        "PYTHONPATH": str(Path(__file__).parents[2]),
        "JOBGATE_WORKER_LOST_AFTER_S": "3",
        "JOBGATE_LEASE_S": "120",
    }
    (tmp_path / "doomed").mkdir()
    doomed = start_server(tmp_path / "doomed", fresh_postgres_url, settings=settings)
    api = survivor = None
    try:
        # The API to watch from is up first: its start-up is no part of the recovery.
        (tmp_path / "api").mkdir()
        api = start_server(
            tmp_path / "api", fresh_postgres_url, worker_concurrency=0, settings=settings
        )
        with doomed.client() as client:
            # Once a first job is done, the worker's last claim found nothing: it is idle.
            first = client.post("/v1/jobs", json={"pipeline": "noop", "params": {}}).json()
            wait_for(client, first["id"], {"succeeded"})
            time.sleep(0.2)
            answer = client.post("/v1/jobs", json={"pipeline": "dozer", "params": {}})
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["id"]
            assert answer.json()["status"] == "running"
        doomed.process.kill()
        doomed.process.wait(timeout=10)
        killed_at = time.monotonic()
        survivor = _start_worker(api, tmp_path, "survivor")
        with api.client() as client:
            job = wait_for(client, job_id, {"succeeded", "failed"}, timeout=30)
            recovered_in = time.monotonic() - killed_at
            assert job["status"] == "succeeded"
            assert job["result"] == {"attempt": 2}
            assert recovered_in < 3 + 2 + 2 + 5  # lost window + sweep + run + margin
            _completed_once_after_one_loss(client, job_id)
    finally:
        for process in (doomed.process, survivor):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        if api is not None:
            api.stop()


def test_cli_submits_watches_and_lists_over_http(server: Server, tmp_path: Path) -> None:
    """`jobgate submit`, `jobs get`, `jobs list` and `workers` speak to a live server."""
    env = {**server.env, "JOBGATE_URL": server.url, "JOBGATE_API_KEY": server.key}

    def cli(*args: str) -> Any:
        done = subprocess.run(
            [*JOBGATE, *args, "--json"], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    note = tmp_path / "note.txt"
    note.write_text("one two two\n")
    job = cli("submit", "text-stats", "--param", "top=1", "--file", str(note))
    assert job["status"] == "queued"
    with server.client() as client:
        wait_for(client, job["id"], {"succeeded"})
    shown = cli("jobs", "get", job["id"])
    assert shown["result"]["top_words"] == [["two", 2]]
    assert job["id"] in [j["id"] for j in cli("jobs", "list")["jobs"]]
    assert len(cli("workers")["workers"]) == 1


def test_a_second_sigterm_cuts_the_drain_short(api_only: Server, tmp_path: Path) -> None:
    """SIGTERM twice: the worker stops at once, hands its stage back, and exits 0."""
    worker = subprocess.Popen(
        [*JOBGATE, "worker", "--id", "impatient"],
        env={**api_only.env, "JOBGATE_SHUTDOWN_GRACE_S": "60"},
        stdout=(tmp_path / "worker.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        with api_only.client() as client:
            job_id = client.post(
                "/v1/jobs", json={"pipeline": "steps", "params": {"steps": 600, "step_ms": 50}}
            ).json()["id"]
            wait_for_stage(client, job_id, "work", "running")
            worker.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert worker.poll() is None  # draining: the stage has 60 s to finish
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=10) == 0
            job = client.get(f"/v1/jobs/{job_id}").json()
            work = next(s for s in job["stages"] if s["name"] == "work")
            assert work["status"] == "queued"  # handed back, not failed
            assert work["attempt"] == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_an_idle_connection_outlives_a_clients_own_idle_limit(tmp_path: Path) -> None:
    """A connection idle for 6 s (past httpx's and uvicorn's default 5 s) still takes the
    next request on the same socket. (Regression: the server closed it at 5 s, just as a
    client that kept it as long reused it, and that request failed with a reset.)"""
    api = start_server(tmp_path, None, worker_concurrency=0)
    request = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
    try:
        port = int(api.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(request)
            assert _response(conn).startswith(b"HTTP/1.1 200")
            time.sleep(6)
            conn.sendall(request)
            assert _response(conn).startswith(b"HTTP/1.1 200")
    finally:
        assert api.stop() == 0


def _response(conn: socket.socket) -> bytes:
    """One whole HTTP/1.1 response with a Content-Length (b"" if the server closed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body
