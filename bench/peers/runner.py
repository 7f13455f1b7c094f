"""Runs a peer's driver in the peer's venv, once per run, and leaves no process behind.

Each driver run is its own session (`start_new_session`): the driver starts its workers
in process groups of their own, inside that session, and stops them itself; whatever is
still alive in the session when the driver has exited (crash, timeout, Ctrl-C) is
SIGKILLed here and counted as a leftover.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.peers import catalog
from bench.peers.catalog import Peer

DRIVER_STOP_GRACE_S = 20.0  # the driver's own shutdown of its worker groups
ATTEMPTS = 3  # per run, when a run reports errors


@dataclass(frozen=True)
class Sizes:
    """How much work one run does (`--quick` makes everything small)."""

    single_n: int
    bulk_n: int
    bulk_batch: int
    latency_n: int
    latency_cap_s: float
    drain_n: int | None  # None: each peer's own `drain_n`
    timeout_s: float

    def drain_for(self, peer: Peer) -> int:
        return peer.drain_n if self.drain_n is None else self.drain_n


FULL = Sizes(2000, 10_000, 1000, 200, 15.0, None, 300.0)
QUICK = Sizes(200, 1000, 500, 20, 5.0, 300, 120.0)


@dataclass
class PeerResult:
    """Every run of one peer: the drivers' result lines and what went wrong."""

    peer: Peer
    runs: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    leftovers: int = 0
    retries: int = 0

    def values(self, measure: str, key: str) -> list[float]:
        found: list[float] = []
        for run in self.runs:
            part = run.get(measure)
            if isinstance(part, dict) and isinstance(part.get(key), int | float):
                found.append(float(part[key]))
        return found

    def median(self, measure: str, key: str) -> float | None:
        values = self.values(measure, key)
        return statistics.median(values) if values else None

    def errors(self) -> list[str]:
        found = list(self.failures)
        for index, run in enumerate(self.runs, 1):
            for measure, error in run.get("errors", {}).items():
                found.append(f"run {index}, {measure}: {error.splitlines()[0]}")
        return found

    def first(self, key: str) -> Any:
        return self.runs[0].get(key) if self.runs else None


def log(message: str) -> None:
    print(f"  . {message}", file=sys.stderr, flush=True)


def driver_env(peer: Peer, sizes: Sizes, log_dir: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")
    }
    env.update(
        {
            "PYTHONPATH": str(catalog.DRIVERS),
            "BENCH_PEER": peer.name,
            "BENCH_BROKER": peer.broker,
            "BENCH_REDIS_URL": catalog.REDIS_URL,
            "BENCH_AMQP_URL": catalog.AMQP_URL,
            "BENCH_PG_DSN": catalog.PG_DSN,
            "BENCH_PG_ADMIN_DSN": catalog.PG_ADMIN_DSN,
            "BENCH_DRAIN_N": str(sizes.drain_for(peer)),
            "BENCH_SINGLE_N": str(sizes.single_n),
            "BENCH_BULK_N": str(sizes.bulk_n),
            "BENCH_BULK_BATCH": str(sizes.bulk_batch),
            "BENCH_LATENCY_N": str(sizes.latency_n),
            "BENCH_LATENCY_CAP_S": str(sizes.latency_cap_s),
            "BENCH_LOG_DIR": str(log_dir),
            **peer.env,
        }
    )
    return env


def run_peer(peer: Peer, python: Path, sizes: Sizes, runs: int) -> PeerResult:
    """`runs` runs; a run with an error (a server restarted under it, say: other people's
    tests restart the shared servers here) is tried again, up to `ATTEMPTS` times, and
    the attempt with the fewest errors is kept."""
    result = PeerResult(peer)
    for index in range(1, runs + 1):
        best: dict[str, Any] | None = None
        for attempt in range(1, ATTEMPTS + 1):
            if attempt > 1:
                result.retries += 1
                time.sleep(2.0)  # a restarting server may still accept connections
                wait_for_servers(peer)
            log(
                f"{peer.name}: run {index}/{runs}" + (f", attempt {attempt}" if attempt > 1 else "")
            )
            line, leftovers, error = run_driver(peer, python, sizes)
            result.leftovers += leftovers
            if line is None:
                log(f"{peer.name}: run {index} failed: {error}")
                continue
            log(f"{peer.name}: run {index}: {summary(line)}")
            if best is None or len(line.get("errors", {})) < len(best.get("errors", {})):
                best = line
            if not line.get("errors"):
                break
        if best is None:
            result.failures.append(f"run {index}: no result in {ATTEMPTS} attempts")
        else:
            result.runs.append(best)
    return result


def wait_for_servers(peer: Peer, timeout_s: float = 90.0) -> list[str]:
    """Waits until the peer's servers accept connections; the ones that still don't."""
    deadline = time.monotonic() + timeout_s
    while True:
        down = [n for n in catalog.servers_of(peer) if not reachable(catalog.SERVER_URLS[n])]
        if not down or time.monotonic() > deadline:
            return down
        time.sleep(1.0)


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 3):
            return True
    except OSError:
        return False


def run_driver(
    peer: Peer, python: Path, sizes: Sizes
) -> tuple[dict[str, Any] | None, int, str | None]:
    """(the driver's result line or None, leftover processes killed, error)."""
    log_dir = Path(tempfile.mkdtemp(prefix=f"bench-peers-{peer.name}-"))
    meter = OtherCpu()
    proc = subprocess.Popen(
        [str(python), str(peer.driver_path)],
        cwd=catalog.DRIVERS,
        env=driver_env(peer, sizes, log_dir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    error: str | None = None
    out = ""
    try:
        out, _ = proc.communicate(timeout=sizes.timeout_s)
    except subprocess.TimeoutExpired:
        error = f"timed out after {sizes.timeout_s:.0f} s"
        stop_driver(proc)
    except BaseException:  # Ctrl-C: stop the workers before leaving
        stop_driver(proc)
        kill_session(proc.pid)
        raise
    leftovers = kill_session(proc.pid)
    line = _last_json(out)
    if line is not None:
        line["other_cpu_cores"] = meter.cores()
    if line is None and error is None:
        error = f"driver exited {proc.returncode} without a result line"
    if line is None or line.get("errors") or leftovers:
        log(f"{peer.name}: worker logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    if leftovers:
        log(f"{peer.name}: killed {leftovers} leftover process(es)")
    return line, leftovers, error


class OtherCpu:
    """How busy the machine was outside this benchmark's own processes (driver, workers;
    the Redis, RabbitMQ and PostgreSQL servers count as outside), in cores on average.

    /proc/stat's busy time less the CPU time of the reaped descendants (`os.times()`:
    each worker's CPU reaches us through its parent's wait)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.busy = _machine_busy_s()
        self.ours = _children_cpu_s()

    def cores(self) -> float | None:
        elapsed = time.monotonic() - self.started
        busy = _machine_busy_s()
        if busy is None or self.busy is None or elapsed <= 0:
            return None
        others = (busy - self.busy) - (_children_cpu_s() - self.ours)
        return max(0.0, others / elapsed)


def _machine_busy_s() -> float | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    times = os.times()
    return times.children_user + times.children_system


def stop_driver(proc: subprocess.Popen[str]) -> None:
    """SIGTERM: the driver stops its worker groups and exits; SIGKILL after the grace."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=DRIVER_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of a session, read from /proc."""
    members: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry))
    return members


def kill_session(sid: int) -> int:
    """SIGKILL every process left in the session; how many there were."""
    members = session_members(sid)
    for pid in members:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(members)


def _last_json(out: str) -> dict[str, Any] | None:
    for raw in reversed(out.splitlines()):
        if raw.startswith("{"):
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError:
                return None
            return parsed if isinstance(parsed, dict) else None
    return None


def summary(line: dict[str, Any]) -> str:
    """One run in a line, for stderr."""
    parts: list[str] = []
    drain = line.get("drain")
    if drain:
        parts.append(
            f"drain {drain['per_s']:,.0f}/s ({drain['completed']}/{drain['n']} in "
            f"{drain['seconds']:.2f} s, boot {drain['boot_s']:.1f} s)"
        )
    latency = line.get("latency")
    if latency:
        parts.append(f"latency p50 {latency['p50_ms']:.1f} p99 {latency['p99_ms']:.1f} ms")
    single = line.get("enqueue_single")
    if single:
        parts.append(f"enqueue {single['per_s']:,.0f}/s")
    bulk = line.get("enqueue_bulk")
    if bulk:
        parts.append(f"bulk {bulk['per_s']:,.0f}/s")
    if isinstance(line.get("other_cpu_cores"), float):
        parts.append(f"CPU busy elsewhere {line['other_cpu_cores']:.1f} cores")
    if line.get("errors"):
        parts.append(f"errors in {', '.join(line['errors'])}")
    return "; ".join(parts)
