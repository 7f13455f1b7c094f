"""Submit over HTTP: `noop` jobs/s accepted by `jobgate serve --worker-concurrency 0`.

The server runs as a subprocess on a fresh database (an admin key made first with
`jobgate keys create`), and one client process (this one) keeps `inflight` requests
in flight over HTTP/1.1 keep-alive connections with `httpx.AsyncClient`. Every answer
must be 202; anything else is counted as an error and printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
from sqlalchemy.engine import make_url

from bench._common import (
    BROKERS,
    PG_BENCH_DB,
    Result,
    analyze_postgres,
    delete_namespace,
    fresh_postgres,
    log,
    sqlite_url,
    temp_dir,
    transport_namespace,
)

STARTUP_TIMEOUT_S = 60.0
BATCH_SIZE = 100
SINGLE_BODY: dict[str, Any] = {"pipeline": "noop", "params": {}}
BATCH_BODY: dict[str, Any] = {"jobs": [SINGLE_BODY] * BATCH_SIZE}


@dataclass
class Server:
    base_url: str
    key: str
    log_path: Path
    pid: int
    tokens: list[str] = field(default_factory=list)
    """Bearer tokens the load takes in turn (several users); empty: `key` alone."""

    @property
    def credentials(self) -> list[str]:
        return self.tokens or [self.key]

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server process used so far."""
        return _proc_cpu_s(self.pid)


def _proc_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


@dataclass
class Tally:
    """What one timed run saw."""

    jobs: int = 0
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0


def _jobgate() -> list[str]:
    """The `jobgate` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "jobgate"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from jobgate.cli import main; main()"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(tmp: Path, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBGATE_")}
    env.update(
        JOBGATE_DATA_DIR=str(tmp / "data"),
        JOBGATE_DATABASE_URL=database_url,
        JOBGATE_LOG_LEVEL="WARNING",
    )
    return env


def _run_cli(args: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(
        [*_jobgate(), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"jobgate {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}"
        )
    return done.stdout


@contextmanager
def serve(
    tmp: Path, database_url: str, *, postgres: bool, settings: dict[str, str] | None = None
) -> Iterator[Server]:
    """`jobgate serve --worker-concurrency 0` on a free port, with an admin key;
    `settings` are more `JOBGATE_*` environment variables."""
    env = {**_env(tmp, database_url), **(settings or {})}
    if postgres:
        _run_cli(["db", "upgrade"], env, tmp)
    lines = _run_cli(["keys", "create", "--owner", "bench", "--role", "admin"], env, tmp)
    key = lines.strip().splitlines()[-1].strip()
    port = _free_port()
    command = [
        *_jobgate(),
        *("serve", "--host", "127.0.0.1", "--port", str(port), "--worker-concurrency", "0"),
    ]
    with _running(command, env, tmp, tmp / "serve.log", port, key) as server:
        yield server


@contextmanager
def _running(
    command: list[str], env: dict[str, str], cwd: Path, log_path: Path, port: int, key: str
) -> Iterator[Server]:
    """`command` as a server on `port`, logging to `log_path`: yielded once it answers
    `/healthz`, terminated (then killed) at the end."""
    with log_path.open("wb") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    server = Server(
        base_url=f"http://127.0.0.1:{port}", key=key, log_path=log_path, pid=process.pid
    )
    try:
        _wait_healthy(server, process)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(server: Server, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = server.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"jobgate serve exited {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{server.base_url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"jobgate serve did not answer /healthz within {STARTUP_TIMEOUT_S:g} s")


def _describe(response: httpx.Response) -> str:
    return f"{response.status_code} {response.text[:300]}"


async def _load(
    server: Server, path: str, body: dict[str, Any], jobs_each: int, seconds: float, inflight: int
) -> tuple[Tally, float]:
    """Keep `inflight` POSTs in flight for `seconds`; (what came back, elapsed)."""
    tally = Tally()
    limits = httpx.Limits(max_connections=inflight, max_keepalive_connections=inflight)
    headers = [{"Authorization": f"Bearer {token}"} for token in server.credentials]
    turn = itertools.count()
    async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=60) as client:
        server_cpu, client_cpu = server.cpu_s(), time.process_time()
        started = time.perf_counter()
        deadline = started + seconds

        async def one_lane() -> None:
            while time.perf_counter() < deadline:
                try:
                    credential = headers[next(turn) % len(headers)]
                    response = await client.post(path, json=body, headers=credential)
                except httpx.HTTPError as exc:
                    tally.errors[f"{type(exc).__name__}: {exc}"] += 1
                    continue
                tally.requests += 1
                if response.status_code != 202:
                    tally.errors[_describe(response)] += 1
                    continue
                if jobs_each > 1 and len(response.json().get("jobs", [])) != jobs_each:
                    tally.errors[f"202 without {jobs_each} jobs: {response.text[:200]}"] += 1
                    continue
                tally.jobs += jobs_each

        await asyncio.gather(*(one_lane() for _ in range(inflight)))
        elapsed = time.perf_counter() - started
        tally.server_cpu_s = server.cpu_s() - server_cpu
        tally.client_cpu_s = time.process_time() - client_cpu
    return tally, elapsed


WRK = shutil.which("wrk")


async def _load_wrk(
    server: Server, path: str, body: dict[str, Any], jobs_each: int, seconds: float, inflight: int
) -> tuple[Tally, float]:
    """The same load from `wrk` (one thread, `inflight` connections), when installed: a
    Python client spends more CPU per request than the servers measured here."""
    script = server.log_path.with_name("post.lua")
    tokens = ", ".join(json.dumps(token) for token in server.credentials)
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"local tokens = {{{tokens}}}\n"
        "local turn = 0\n"
        "request = function()\n"
        "  turn = turn % #tokens + 1\n"
        '  wrk.headers["Authorization"] = "Bearer " .. tokens[turn]\n'
        "  return wrk.format()\n"
        "end\n"
    )
    server_cpu = server.cpu_s()
    process = await asyncio.create_subprocess_exec(
        WRK or "wrk",
        "-t1",
        f"-c{inflight}",
        f"-d{max(1, round(seconds))}s",
        "-s",
        str(script),
        server.base_url + path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await process.communicate())[0].decode()
    tally = Tally(server_cpu_s=server.cpu_s() - server_cpu)
    elapsed = float(max(1, round(seconds)))
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", output)
    if total is None:
        raise RuntimeError(f"wrk printed no total:\n{output}")
    tally.requests = int(total.group(1))
    elapsed = float(total.group(2)) / (1000 if total.group(3) == "ms" else 1)
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    bad = int(failed.group(1)) if failed else 0
    errors = re.search(r"Socket errors: (.*)", output)
    if bad:
        tally.errors["non-2xx answers"] += bad
    if errors:
        tally.errors[f"socket errors: {errors.group(1)}"] += 1
    tally.jobs = (tally.requests - bad) * jobs_each
    return tally, elapsed


@dataclass
class Figure:
    """One figure to measure: a load on a server, and where its runs go."""

    server: Server
    result: Result
    path: str
    body: dict[str, Any]
    jobs_each: int
    inflight: int
    database_name: str = PG_BENCH_DB
    """The PostgreSQL database to ANALYZE before each run."""
    cpu_us: list[float] = field(default_factory=list)
    """The server's CPU per job in each run, in microseconds."""
    outbox: Outbox | None = None
    """With a broker transport: the server's outbox, waited empty before each run."""


async def _measure(
    server: Server,
    result: Result,
    path: str,
    body: dict[str, Any],
    jobs_each: int,
    *,
    seconds: float,
    inflight: int,
    runs: int,
) -> None:
    await _measure_in_turn(
        [Figure(server, result, path, body, jobs_each, inflight)], seconds=seconds, runs=runs
    )


async def _measure_in_turn(figures: list[Figure], *, seconds: float, runs: int) -> None:
    """Measure the figures in turn, run by run: figures that are compared with each other
    see the machine in the same minutes (its speed drifts). Each round starts one figure
    further along, so that no figure always runs first or after the same neighbour, and
    each run follows a second of the same load, untimed: a server idle while the others
    ran starts warm, as the one measured just before it did."""
    load = _load_wrk if WRK else _load
    for n in range(runs):
        turn = n % len(figures)
        for figure in figures[turn:] + figures[:turn]:
            result = figure.result
            if figure.outbox is not None:
                await figure.outbox.wait_empty()
            await load(
                figure.server, figure.path, figure.body, figure.jobs_each, 1.0, figure.inflight
            )
            if result.database.startswith("postgres"):
                # After the warm-up, never on empty tables: statistics that say `jobs` is
                # empty make the foreign keys' checks scan it whole, row after row.
                await analyze_postgres(figure.database_name)
            tally, elapsed = await load(
                figure.server, figure.path, figure.body, figure.jobs_each, seconds, figure.inflight
            )
            rate = tally.jobs / elapsed
            if figure.outbox is not None:
                figure.outbox.left.append(await figure.outbox.count())
            result.values.append(rate)
            if tally.jobs:
                figure.cpu_us.append(tally.server_cpu_s / tally.jobs * 1e6)
            result.errors += sum(tally.errors.values())
            log(
                f"{result.benchmark} {result.database} run {n + 1}: {rate:,.1f} jobs/s "
                f"({tally.requests} requests in {elapsed:.1f} s, "
                f"{sum(tally.errors.values())} errors; CPU: server "
                f"{tally.server_cpu_s / elapsed:.0%}, client {tally.client_cpu_s / elapsed:.0%})"
            )
            for message, count in tally.errors.most_common(5):
                print(f"    error x{count}: {message}", file=sys.stderr)


@contextmanager
def serve_ceiling(tmp: Path, dsn: str) -> Iterator[Server]:
    """`bench/ceiling_app.py` under uvicorn on a free port (the same server jobgate uses)."""
    port = _free_port()
    env = {**os.environ, "BENCH_CEILING_DSN": dsn}
    command = [
        *(sys.executable, "-m", "uvicorn", "bench.ceiling_app:app"),
        *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
        "--no-access-log",
    ]
    repo = Path(__file__).parent.parent
    with _running(command, env, repo, tmp / "ceiling.log", port, "-") as server:
        yield server


def _ceiling_result(inflight: int) -> Result:
    return Result(
        benchmark=f"FastAPI+asyncpg insert ceiling ({inflight} in flight)",
        database="postgres",
        unit="POST/s",
    )


def _submit_results(
    database: str, inflight_single: int, inflight_batch: int
) -> tuple[Result, Result]:
    """The single and the batch submits' results, for `database` (and transport)."""
    single = Result(
        benchmark=f"HTTP submit noop, single ({inflight_single} in flight)",
        database=database,
        unit="jobs/s",
    )
    batch = Result(
        benchmark=f"HTTP submit noop, batch of {BATCH_SIZE} ({inflight_batch} in flight)",
        database=database,
        unit="jobs/s",
    )
    return single, batch


async def run(
    databases: list[str],
    *,
    seconds: float,
    inflight_single: int,
    inflight_batch: int,
    runs: int,
    ceiling: bool = True,
) -> list[Result]:
    """Single and batch submits per database; on PostgreSQL (with `ceiling`) also the
    FastAPI + asyncpg one-row-insert ceiling, each of its runs right after a run of
    single submits, so that their ratio is of one moment."""
    results: list[Result] = []
    for database in databases:
        single, batch = _submit_results(database, inflight_single, inflight_batch)
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(temp_dir("submit"))
            postgres = database == "postgres"
            url = await fresh_postgres() if postgres else sqlite_url(tmp / "data")
            server = stack.enter_context(serve(tmp, url, postgres=postgres))
            single_figure = Figure(server, single, "/v1/jobs", SINGLE_BODY, 1, inflight_single)
            figures = [single_figure]
            if postgres and ceiling:
                # Its own table in the same database (`bench/ceiling_app.py`).
                dsn = make_url(url).set(drivername="postgresql")
                bare = stack.enter_context(
                    serve_ceiling(tmp, dsn.render_as_string(hide_password=False))
                )
                ceiling_result = _ceiling_result(inflight_single)
                figures.append(
                    Figure(bare, ceiling_result, "/v1/jobs", SINGLE_BODY, 1, inflight_single)
                )
            await _measure_in_turn(figures, seconds=seconds, runs=runs)
            batch_figure = Figure(
                server, batch, "/v1/jobs/batch", BATCH_BODY, BATCH_SIZE, inflight_batch
            )
            await _measure_in_turn([batch_figure], seconds=seconds, runs=runs)
            if len(figures) > 1:
                shares = [a / b for a, b in zip(single.values, ceiling_result.values, strict=True)]
                single.note = (
                    "share of the ceiling run right after it: "
                    + " / ".join(f"{share:.0%}" for share in shares)
                    + f" (median {statistics.median(shares):.0%})"
                )
        results += [single, batch, *(f.result for f in figures[1:])]
    return results


@dataclass
class Outbox:
    """A broker-transport server's outbox: the tokens its relay has yet to publish."""

    dsn: str
    left: list[int] = field(default_factory=list)
    """Tokens still waiting at the end of each run: how far the relay fell behind."""

    _conn: asyncpg.Connection | None = None

    async def count(self) -> int:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn)  # one for every poll, kept idle
        return int(await self._conn.fetchval("SELECT count(*) FROM outbox"))

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def wait_empty(self, timeout_s: float = 120.0) -> None:
        """Until the relay has published everything (so no run pays for the one before)."""
        deadline = time.monotonic() + timeout_s
        while await self.count():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the relay left tokens in the outbox for {timeout_s:g} s")
            await asyncio.sleep(0.2)


async def run_transports(
    brokers: list[str], *, seconds: float, inflight_single: int, inflight_batch: int, runs: int
) -> list[Result]:
    """Single and batch submits on PostgreSQL with each of `brokers` as the transport: the
    server's relay publishes every accepted job's token while the load runs, each run
    starting with its outbox empty; the note says how many tokens each run left behind."""
    results: list[Result] = []
    for broker in brokers:
        label = f"postgres, {broker} transport"
        single, batch = _submit_results(label, inflight_single, inflight_batch)
        namespace = transport_namespace()
        settings = {
            "JOBGATE_TRANSPORT_URL": BROKERS[broker],
            "JOBGATE_TRANSPORT_NAMESPACE": namespace,
        }
        try:
            with temp_dir("submit") as tmp:
                url = await fresh_postgres()
                dsn = (
                    make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
                )
                with serve(tmp, url, postgres=True, settings=settings) as server:
                    for result, path, body, each, inflight in (
                        (single, "/v1/jobs", SINGLE_BODY, 1, inflight_single),
                        (batch, "/v1/jobs/batch", BATCH_BODY, BATCH_SIZE, inflight_batch),
                    ):
                        outbox = Outbox(dsn)
                        figure = Figure(server, result, path, body, each, inflight, outbox=outbox)
                        try:
                            await _measure_in_turn([figure], seconds=seconds, runs=runs)
                        finally:
                            await outbox.close()
                        result.note = "tokens not yet published at the end of each run: " + (
                            " / ".join(f"{n:,}" for n in outbox.left)
                        )
        finally:
            await delete_namespace(broker, namespace)
        results += [single, batch]
    return results
