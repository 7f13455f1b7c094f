"""The client commands (`submit`, `watch`, `status`, `cancel`, `download`) against a real
`jobgate serve`, as subprocesses: `--json` output, exit codes, errors, and a `watch` that
outlives a server restart."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import JOBGATE, Server, start_server
from tests.e2e.sdk_helpers import restart, start_worker

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `jobgate serve` (SQLite, in-process worker) for this module's tests."""
    running = start_server(tmp_path_factory.mktemp("cli"), None)
    try:
        yield running
    finally:
        running.stop()  # how `serve` exits is test_serve.py's business


def jobgate(
    server: Server, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**server.env, "JOBGATE_URL": server.url, "JOBGATE_API_KEY": server.key}
    return subprocess.run(
        [*JOBGATE, *args], env=env, capture_output=True, text=True, timeout=90, cwd=cwd
    )


def json_of(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def lines_of(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_submit_status_and_download(served: Server, tmp_path: Path) -> None:
    """`submit -p --file --budget --json`, `status --json`, then `download` of both
    artifacts, byte-equal to what the signed URLs serve."""
    note = tmp_path / "note.txt"
    note.write_text("one two two\n")
    job = json_of(
        jobgate(
            served,
            "submit",
            "text-stats",
            "-p",
            "top=1",
            "--file",
            str(note),
            "--budget",
            "5",
            "--json",
        )
    )
    assert (job["status"], job["params"], job["cost"]["budget_usd"]) == ("queued", {"top": 1}, 5)
    assert jobgate(served, "watch", job["id"], "--json").returncode == 0
    shown = json_of(jobgate(served, "status", job["id"], "--json"))
    assert shown["result"]["top_words"] == [["two", 2]]

    saved = json_of(jobgate(served, "download", job["id"], "-o", str(tmp_path), "--json"))
    assert saved["path"] == str(tmp_path / "report.json")
    # The README's `-o out/`: a directory made for it, not a file named `out`.
    into = json_of(jobgate(served, "download", job["id"], "-o", "out/", "--json", cwd=tmp_path))
    assert into["path"] == str(Path("out") / "report.json")
    assert (tmp_path / "out" / "report.json").read_bytes() == (
        tmp_path / "report.json"
    ).read_bytes()
    with served.client() as http:
        link = http.get(f"/v1/jobs/{job['id']}/artifacts/report.csv").json()
    done = jobgate(served, "download", job["id"], "report.csv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "report.csv")
    assert (tmp_path / "report.csv").read_bytes() == httpx.get(link["download_url"]).content
    assert json.loads((tmp_path / "report.json").read_bytes()) == shown["result"]


def test_watch_json_prints_every_event_once_and_exits_0(served: Server) -> None:
    """`submit --watch --json`: one JSON event per line, `state` first, no gap, exit 0."""
    done = jobgate(
        served,
        "submit",
        "steps",
        "--params-json",
        '{"steps": 5, "step_ms": 10}',
        "--watch",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    events = lines_of(done)
    assert events[0]["type"] == "state"
    assert events[-1]["type"] == "completed"
    seqs = [int(e["id"]) for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_watch_shows_a_live_display_for_people(served: Server) -> None:
    """Without `--json`: stages, cost and the final status."""
    done = jobgate(
        served,
        "submit",
        "steps",
        "-p",
        "steps=3",
        "-p",
        "step_ms=10",
        "-p",
        "cost_per_step=0.5",
        "--watch",
    )
    assert done.returncode == 0, done.stderr
    assert "submitted" in done.stderr
    for text in ("prepare", "work", "finish", "succeeded", "cost $1.5"):
        assert text in done.stdout


def test_watch_exit_codes_for_failed_and_cancelled_jobs(served: Server) -> None:
    """A failed job exits 1, a cancelled one 3; `cancel --json` prints the job."""
    failing = json_of(
        jobgate(
            served,
            "submit",
            "steps",
            "-p",
            "steps=1",
            "-p",
            "step_ms=0",
            "-p",
            "fail_at=1",
            "--json",
        )
    )
    assert jobgate(served, "watch", failing["id"]).returncode == 1
    slow = json_of(jobgate(served, "submit", "steps", "-p", "steps=1000", "--json"))
    cancelled = json_of(jobgate(served, "cancel", slow["id"], "--json"))
    assert cancelled["id"] == slow["id"]
    done = jobgate(served, "watch", slow["id"], "--json")
    assert done.returncode == 3
    assert lines_of(done)[-1]["type"] in ("cancelled", "state")


def test_errors_print_the_problem_and_exit_1(served: Server) -> None:
    """404 and 401 come out as the problem's title and detail on stderr, nothing on stdout."""
    missing = jobgate(served, "status", "no-such-job", "--json")
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert "HTTP 404 Not found" in missing.stderr
    stranger = jobgate(served, "watch", "x", "--api-key", "jg_" + "0" * 40)
    assert stranger.returncode == 1
    assert "HTTP 401" in stranger.stderr
    invalid = jobgate(served, "submit", "steps", "-p", "steps=-1")
    assert invalid.returncode == 1
    assert "steps" in invalid.stderr


def test_watch_survives_a_server_restart(tmp_path: Path) -> None:
    """The API is killed and started again mid-job (the worker runs on in its own
    process): `watch` resumes where it stopped, exits 0, and printed every event once."""
    server = start_server(tmp_path, None, worker_concurrency=0)
    worker = start_worker(server, "restart-worker")
    watcher: subprocess.Popen[str] | None = None
    try:
        with server.client() as http:
            params = {"steps": 60, "step_ms": 50, "message_every": 1}
            job_id = http.post("/v1/jobs", json={"pipeline": "steps", "params": params}).json()[
                "id"
            ]
        env = {**server.env, "JOBGATE_URL": server.url, "JOBGATE_API_KEY": server.key}
        watcher = subprocess.Popen(
            [*JOBGATE, "watch", job_id, "--json"], env=env, stdout=subprocess.PIPE, text=True
        )
        assert watcher.stdout is not None
        lines = [watcher.stdout.readline() for _ in range(8)]  # mid-job: state + 7 events
        server = restart(server)
        out = watcher.stdout.read()  # the same buffered reader: nothing read ahead is lost
        assert watcher.wait(timeout=30) == 0
        events = [json.loads(line) for line in lines + out.splitlines() if line.strip()]
        with server.client() as http:
            stored = http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()
        first = int(events[0]["id"])
        assert [(int(e["id"]), e["type"]) for e in events[1:]] == [
            (e["seq"], e["type"]) for e in stored["events"] if e["seq"] > first
        ]
        assert events[-1]["type"] == "completed"
    finally:
        for process in (watcher, worker):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        server.stop()
