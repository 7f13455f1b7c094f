"""What every peer driver shares: settings, the completion counter, workers, the protocol.

Runs inside a peer's own virtualenv (`.bench-venvs/<venv>`), imported by the driver scripts
next to it and by their worker processes. Standard library and redis-py only (every peer
venv has redis-py): never jobgate, never the `bench` package.

One driver run is one run of every measurement, printed as one JSON line on stdout:

- enqueue: `single_n` single enqueue calls from this process, no worker running, after a
  few untimed calls that open the connections; then `bulk_n` jobs through the peer's bulk
  API in batches of `bulk_batch`, where the peer has one.
- drain: workers are started on an empty queue and warmed up (the first job's completion
  gives `boot_s`, then a wait until every worker process is idle, then `WARMUP_JOBS` more
  jobs), then stopped with SIGSTOP while `drain_n` jobs are enqueued (untimed), then
  resumed with SIGCONT: the figure is `drain_n` / (SIGCONT -> the `drain_n`-th completion).
- latency: fresh workers, warmed up the same way; then one job at a time, submit -> its
  result in hand through the peer's own result API, `latency_n` times or until
  `latency_cap_s`, after `LATENCY_WARMUP` untimed ones.

Every job runs the same body: one `INCR` of `COUNTER_KEY` on the benchmark's Redis database
(how completions are counted, identically for every peer), and it returns the new count.
Each measurement starts from purged queues (the whole Redis database is flushed, and the
driver purges its own RabbitMQ queues or PostgreSQL schema) and ends with every worker
process group stopped (SIGTERM, then SIGKILL after `STOP_GRACE_S`).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self, TypeVar

import redis
import redis.asyncio

COUNTER_KEY = "bench:done"
WARMUP_JOBS = 100
# Workers count as booted once their processes use under IDLE_CPU_SHARE of a core over
# IDLE_WINDOW_S, with no process coming or going (IDLE_TIMEOUT_S at most).
IDLE_CPU_SHARE = 0.05
IDLE_WINDOW_S = 0.5
IDLE_TIMEOUT_S = 15.0
LATENCY_WARMUP = 10
BOOT_TIMEOUT_S = 90.0
STOP_GRACE_S = 3.0
DRIVERS_DIR = Path(__file__).resolve().parent
T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    """The run's sizes and servers, from `BENCH_*` variables (workers inherit them)."""

    redis_url: str
    amqp_url: str
    pg_dsn: str
    pg_admin_dsn: str
    broker: str
    drain_n: int
    single_n: int
    bulk_n: int
    bulk_batch: int
    latency_n: int
    latency_cap_s: float
    client_poll_s: float
    drain_timeout_s: float
    log_dir: Path

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ
        return cls(
            redis_url=env.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11"),
            amqp_url=env.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
            pg_dsn=env.get(
                "BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/bench_procrastinate"
            ),
            pg_admin_dsn=env.get(
                "BENCH_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
            ),
            broker=env.get("BENCH_BROKER", "redis"),
            drain_n=int(env.get("BENCH_DRAIN_N", "5000")),
            single_n=int(env.get("BENCH_SINGLE_N", "2000")),
            bulk_n=int(env.get("BENCH_BULK_N", "10000")),
            bulk_batch=int(env.get("BENCH_BULK_BATCH", "1000")),
            latency_n=int(env.get("BENCH_LATENCY_N", "200")),
            latency_cap_s=float(env.get("BENCH_LATENCY_CAP_S", "30")),
            client_poll_s=float(env.get("BENCH_CLIENT_POLL_S", "0.005")),
            drain_timeout_s=float(env.get("BENCH_DRAIN_TIMEOUT_S", "60")),
            log_dir=Path(env.get("BENCH_LOG_DIR", "/tmp")),
        )


def log(message: str) -> None:
    """Progress on stderr: stdout carries only the result line."""
    print(f"    {message}", file=sys.stderr, flush=True)


# --- the job body -----------------------------------------------------------------------


class SyncCounter:
    """The job body for thread/process workers: INCR, on a client made on first use."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: redis.Redis | None = None

    def incr(self) -> int:
        if self._client is None:
            self._client = redis.Redis.from_url(self.url)
        return int(self._client.incr(COUNTER_KEY))


class AsyncCounter:
    """The job body for asyncio workers: INCR on a client made inside the worker's loop."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: redis.asyncio.Redis | None = None

    async def incr(self) -> int:
        if self._client is None:
            # No client-side read timeout: asyncio would fire it at SIGCONT after a freeze.
            self._client = redis.asyncio.Redis.from_url(self.url, socket_timeout=None)
        return int(await self._client.incr(COUNTER_KEY))


# --- the peer's side ----------------------------------------------------------------------


class Driver(ABC):
    """One peer, as the protocol sees it. Subclasses live in `<peer>_driver.py`."""

    #: distributions whose versions are reported
    dists: tuple[str, ...] = ()
    #: the bulk enqueue API used, or None when the peer has none
    bulk_api: str | None = None

    def __init__(self, config: Config) -> None:
        self.config = config

    @property
    def bin_dir(self) -> Path:
        """The peer venv's `bin/` (not resolved: the venv's own scripts live there)."""
        return Path(sys.executable).parent

    @abstractmethod
    def worker_commands(self) -> list[list[str]]:
        """One command per worker process group to start (cwd: this folder)."""

    @abstractmethod
    def enqueue_single(self, n: int) -> None:
        """n enqueue calls, one job each, one after the other."""

    def enqueue_bulk(self, n: int, batch: int) -> None:
        raise NotImplementedError

    def fill(self, n: int) -> None:
        """Enqueue a backlog: the bulk API where there is one, else single calls."""
        if self.bulk_api is None:
            self.enqueue_single(n)
        else:
            self.enqueue_bulk(n, self.config.bulk_batch)

    @abstractmethod
    def latency(self, n: int, cap_s: float) -> list[float]:
        """Seconds from submit to result in hand, for up to n jobs one at a time."""

    def purge(self) -> None:
        """Empty the peer's queues outside Redis (the Redis database is flushed anyway)."""
        return None

    def servers(self) -> dict[str, str]:
        """Versions of the servers this peer talks to, besides Redis."""
        return {}

    def server_epoch(self) -> str:
        """Something that changes when the peer's own server (not Redis) restarts."""
        return ""

    def close(self) -> None:
        """Release client connections."""
        return None

    def versions(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for dist in self.dists:
            try:
                found[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                found[dist] = "missing"
        return found


class AsyncDriver(Driver):
    """A driver whose client API is asyncio: one event loop for the whole run."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._runner = asyncio.Runner()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    def close(self) -> None:
        self._runner.close()


def timed_loop(n: int, cap_s: float, one: Callable[[], object]) -> list[float]:
    """Time `one()` up to n times, stopping early once cap_s has passed."""
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < n and time.perf_counter() - start < cap_s:
        t0 = time.perf_counter()
        one()
        samples.append(time.perf_counter() - t0)
    return samples


async def atimed_loop(n: int, cap_s: float, one: Callable[[], Awaitable[object]]) -> list[float]:
    """`timed_loop` for a coroutine function, inside the running loop."""
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < n and time.perf_counter() - start < cap_s:
        t0 = time.perf_counter()
        await one()
        samples.append(time.perf_counter() - t0)
    return samples


async def poll_until(check: Callable[[], Awaitable[bool]], interval: float, timeout: float) -> None:
    """Await `check()` every `interval` s until it is true; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no result after {timeout} s")
        await asyncio.sleep(interval)


# --- processes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    """What /proc/<pid>/stat says that matters here."""

    state: str
    pgid: int
    sid: int
    cpu_ticks: int  # user + system


def _proc_stat(pid: str) -> ProcStat | None:
    """A /proc entry's stat, or None once the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # fields[0] is field 3, `state`
    return ProcStat(fields[0], int(fields[2]), int(fields[3]), int(fields[11]) + int(fields[12]))


def group_stats(pgid: int) -> dict[int, ProcStat]:
    """Live (non-zombie) processes of a process group."""
    members: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(entry)
            if stat is not None and stat.pgid == pgid and stat.state != "Z":
                members[int(entry)] = stat
    return members


def group_members(pgid: int) -> list[int]:
    return list(group_stats(pgid))


class WorkerFailed(RuntimeError):
    pass


class ServerRestarted(RuntimeError):
    pass


class Workers:
    """Worker processes, each command in its own process group, always stopped on exit."""

    def __init__(self, commands: list[list[str]], log_dir: Path, label: str) -> None:
        self.commands = commands
        self.log_path = log_dir / f"workers-{label}.log"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.sigkilled = 0

    def __enter__(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as sink:
            for command in self.commands:
                self.procs.append(
                    subprocess.Popen(
                        command,
                        cwd=DRIVERS_DIR,
                        stdin=subprocess.DEVNULL,
                        stdout=sink,
                        stderr=subprocess.STDOUT,
                        process_group=0,
                    )
                )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def signal(self, signum: int) -> None:
        for proc in self.procs:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signum)

    def check(self) -> None:
        """Raise, with the end of the workers' log, if a worker has exited."""
        for proc in self.procs:
            code = proc.poll()
            if code is not None:
                raise WorkerFailed(f"worker {proc.args!r} exited with {code}:\n{self.log_tail()}")

    def wait_idle(self) -> float:
        """Until the workers' processes have stopped burning CPU (every process done
        booting: a warm-up job proves only one of them ready). Seconds waited."""
        started = time.monotonic()
        window_ticks = IDLE_CPU_SHARE * IDLE_WINDOW_S * os.sysconf("SC_CLK_TCK")
        before = self._cpu()
        while time.monotonic() - started < IDLE_TIMEOUT_S:
            time.sleep(IDLE_WINDOW_S)
            self.check()
            after = self._cpu()
            if after[0] == before[0] and after[1] - before[1] <= window_ticks:
                break
            before = after
        return time.monotonic() - started

    def _cpu(self) -> tuple[frozenset[int], int]:
        """(the groups' processes, their CPU ticks in all)."""
        stats = {pid: st for proc in self.procs for pid, st in group_stats(proc.pid).items()}
        return frozenset(stats), sum(st.cpu_ticks for st in stats.values())

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM to each group leader (it stops its own children; SIGCONT for paused
        groups), then SIGKILL to every group with a process left after the grace period."""
        started = time.monotonic()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        self.signal(signal.SIGCONT)
        deadline = started + STOP_GRACE_S
        while time.monotonic() < deadline and any(group_members(p.pid) for p in self.procs):
            time.sleep(0.05)
        for proc in self.procs:
            if group_members(proc.pid):
                self.sigkilled += 1
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait()
        deadline = time.monotonic() + 5
        while any(group_members(p.pid) for p in self.procs):
            if time.monotonic() > deadline:
                left = [pid for p in self.procs for pid in group_members(p.pid)]
                raise WorkerFailed(f"worker processes survived SIGKILL: {left}")
            time.sleep(0.05)
        how = f", {self.sigkilled} group(s) SIGKILLed" if self.sigkilled else ""
        log(f"workers stopped in {time.monotonic() - started:.1f} s{how}")


# --- the protocol ---------------------------------------------------------------------------


class Counter:
    """The driver's view of the completion counter (and of the whole Redis database)."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def flush(self) -> None:
        self.client.flushdb()

    def reset(self) -> None:
        self.client.set(COUNTER_KEY, 0)

    def value(self) -> int:
        raw = self.client.get(COUNTER_KEY)
        return int(raw) if raw is not None else 0

    def wait(self, target: int, timeout: float, workers: Workers, poll: float = 0.005) -> float:
        """perf_counter() when the counter first reads >= target."""
        deadline = time.monotonic() + timeout
        next_check = 0.0
        while True:
            if self.value() >= target:
                return time.perf_counter()
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"{self.value()}/{target} jobs done after {timeout:.0f} s")
            if now > next_check:
                workers.check()
                next_check = now + 0.5
            time.sleep(poll)

    def server_version(self) -> str:
        info: dict[str, Any] = self.client.info("server")
        return str(info.get("redis_version", "?"))

    def run_id(self) -> str:
        """Changes when the Redis server restarts (other people's tests do that here)."""
        info: dict[str, Any] = self.client.info("server")
        return str(info.get("run_id", "?"))


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class Protocol:
    """Runs every measurement once against one driver and collects the result line."""

    def __init__(self, name: str, driver: Driver) -> None:
        self.name = name
        self.driver = driver
        self.config = driver.config
        self.counter = Counter(self.config.redis_url)
        self.sigkilled = 0

    def purge(self) -> None:
        self.counter.flush()
        self.driver.purge()

    def epoch(self) -> tuple[str, str]:
        """Tells server restarts apart: Redis's run_id, and the driver's own token."""
        return self.counter.run_id(), self.driver.server_epoch()

    @contextmanager
    def warm_workers(self, label: str) -> Iterator[tuple[Workers, float]]:
        """Started workers, with the first job's completion time since spawn (boot)."""
        workers = Workers(self.driver.worker_commands(), self.config.log_dir, label)
        try:
            with workers:
                spawned = time.perf_counter()
                self.driver.fill(1)
                boot = self.counter.wait(1, BOOT_TIMEOUT_S, workers) - spawned
                log(f"workers idle {workers.wait_idle():.1f} s after the first job")
                self.driver.fill(WARMUP_JOBS)
                self.counter.wait(1 + WARMUP_JOBS, BOOT_TIMEOUT_S, workers)
                self.counter.reset()
                yield workers, boot
        finally:
            self.sigkilled += workers.sigkilled

    def enqueue(self) -> dict[str, Any]:
        cfg = self.config
        self.purge()
        self.driver.enqueue_single(20)  # connections opened, code paths warm
        t0 = time.perf_counter()
        self.driver.enqueue_single(cfg.single_n)
        seconds = time.perf_counter() - t0
        return {"n": cfg.single_n, "seconds": seconds, "per_s": cfg.single_n / seconds}

    def enqueue_bulk(self) -> dict[str, Any] | None:
        cfg = self.config
        if self.driver.bulk_api is None:
            return None
        self.purge()
        self.driver.enqueue_bulk(cfg.bulk_batch, cfg.bulk_batch)
        t0 = time.perf_counter()
        self.driver.enqueue_bulk(cfg.bulk_n, cfg.bulk_batch)
        seconds = time.perf_counter() - t0
        return {
            "n": cfg.bulk_n,
            "batch": cfg.bulk_batch,
            "seconds": seconds,
            "per_s": cfg.bulk_n / seconds,
        }

    def drain(self) -> dict[str, Any]:
        cfg = self.config
        self.purge()
        with self.warm_workers("drain") as (workers, boot):
            workers.signal(signal.SIGSTOP)
            t_fill = time.perf_counter()
            self.driver.fill(cfg.drain_n)
            fill_s = time.perf_counter() - t_fill
            leaked = self.counter.value()
            if leaked:
                raise WorkerFailed(f"{leaked} jobs ran while the workers were paused")
            t0 = time.perf_counter()
            workers.signal(signal.SIGCONT)
            t1 = self.counter.wait(cfg.drain_n, cfg.drain_timeout_s, workers)
            time.sleep(0.3)  # anything past N would be a duplicate delivery
            done = self.counter.value()
            workers.check()
        seconds = t1 - t0
        return {
            "n": cfg.drain_n,
            "seconds": seconds,
            "per_s": cfg.drain_n / seconds,
            "fill_s": fill_s,
            "boot_s": boot,
            "completed": done,
        }

    def latency(self) -> dict[str, Any]:
        cfg = self.config
        self.purge()
        with self.warm_workers("latency") as (workers, boot):
            self.driver.latency(LATENCY_WARMUP, cfg.latency_cap_s)
            samples = self.driver.latency(cfg.latency_n, cfg.latency_cap_s)
            workers.check()
        return {
            "n": len(samples),
            "p50_ms": percentile(samples, 50) * 1000,
            "p99_ms": percentile(samples, 99) * 1000,
            "mean_ms": statistics.fmean(samples) * 1000,
            "max_ms": max(samples) * 1000,
            "boot_s": boot,
        }

    def run(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "peer": self.name,
            "versions": self.driver.versions(),
            "bulk_api": self.driver.bulk_api,
            "workers": [" ".join(_short(c)) for c in self.driver.worker_commands()],
            "errors": {},
        }
        servers = {"redis": self.counter.server_version()}
        servers.update(self.driver.servers())
        result["servers"] = servers
        steps: list[tuple[str, Callable[[], dict[str, Any] | None]]] = [
            ("enqueue_single", self.enqueue),
            ("enqueue_bulk", self.enqueue_bulk),
            ("drain", self.drain),
            ("latency", self.latency),
        ]
        for key, step in steps:
            started = time.monotonic()
            try:
                before = self.epoch()
                result[key] = step()
                if self.epoch() != before:
                    raise ServerRestarted("a server restarted during this measurement")
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                result[key] = None
                result["errors"][key] = f"{type(exc).__name__}: {exc}"[:2000]
            log(f"{self.name}: {key} took {time.monotonic() - started:.1f} s")
        with suppress(Exception):
            self.purge()
        result["sigkilled_groups"] = self.sigkilled
        return result


def _short(command: list[str]) -> list[str]:
    """A worker command as a person would type it (no venv path)."""
    return [Path(command[0]).name, *command[1:]]


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(make_driver: Callable[[Config], Driver]) -> None:
    """A driver script's entry point: one run of the protocol, one JSON line on stdout.

    The peer's name (`BENCH_PEER`) tells drivers with several set-ups (brokers) apart.
    """
    name = os.environ.get("BENCH_PEER", Path(sys.argv[0]).stem.removesuffix("_driver"))
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    driver = make_driver(Config.from_env())
    try:
        result = Protocol(name, driver).run()
    finally:
        driver.close()
    print(json.dumps(result), flush=True)
