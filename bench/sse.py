"""Live streams: how many one API process holds, and how fast events reach them.

One `jobgate serve` (PostgreSQL store, an in-process worker of concurrency 4) per bus
(memory, postgres, redis) and run. A client process of plain asyncio sockets opens the
streams:

- **Idle streams** follow parked jobs: jobs of `bench/parked.py`'s pipeline, whose
  stage is on a queue no worker serves, so they stay `queued` and say nothing (at most
  10 streams a job, as the API allows). They cost memory, and CPU for heartbeats and
  the hub's check.
- **Measured streams** follow `steps` jobs running on the worker (100 progress events
  each, one every 20 ms): 1 stream on 1 job, or 100 streams, 10 on each of 10 jobs.
  A stream's latency for an event is the moment the client read it minus the event's
  `created_at` in the store (stamped by the worker just before its commit), both from
  this machine's clock.

After one untimed round of 100 streams (a fresh server's first jobs are slower for
reasons that have nothing to do with streams), figures at 1, 100 and 10,000 open
streams (the measured ones plus idle ones): delivery latency p50 and p99. At 10,000:
the server's RSS per 1,000 streams (RSS with them open minus RSS before, over 10), and
its CPU while only heartbeats and the hub's check run (`JOBGATE_SSE_HEARTBEAT_S` at its
default, 30 s, over a 30 s window), next to its CPU with no stream open (a 10 s window
before the first).
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from bench._common import Result, fresh_postgres, log, temp_dir
from bench.submit import Server, _env, _free_port, _jobgate, _proc_cpu_s, _run_cli, _running

BUSES = {"memory": "memory", "postgres": "postgres", "redis": "redis://127.0.0.1:6379/0"}
STREAMS_PER_JOB = 10
STEPS, STEP_MS = 100, 20
IDLE_WINDOW_S = 30.0
BASELINE_WINDOW_S = 10.0  # the server's CPU with no stream open, for comparison
OPEN_BATCH = 100  # streams opened at once


def _raise_fd_limit() -> None:
    """Up to the hard limit: 10,000 streams need 10,000 sockets here and in the server
    (which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def open_stream(
    host: str, port: int, key: str, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """GET `path` as an SSE stream on a raw socket; returns once the headers are read."""
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
    )
    status = await reader.readline()
    if b" 200 " not in status:
        writer.close()
        raise RuntimeError(f"stream refused: {status!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    return reader, writer


class Stream:
    """One SSE connection on a raw socket: reads events, stamping each on arrival."""

    def __init__(self, host: str, port: int, key: str, job_id: str) -> None:
        self.host, self.port, self.key, self.job_id = host, port, key, job_id
        self.received: list[tuple[int, str, float]] = []  # (seq, type, arrival time)
        self.ended = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        reader, self._writer = await open_stream(
            self.host, self.port, self.key, f"/v1/jobs/{self.job_id}/events"
        )
        self._task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        event_id: int | None = None
        kind = ""
        try:
            while line := await reader.readline():
                # Chunked transfer: size lines and blank chunk ends carry no field.
                text = line.decode().rstrip("\r\n")
                if text.startswith("id: "):
                    event_id = int(text[4:])
                elif text.startswith("event: "):
                    kind = text[7:]
                elif text.startswith("data: ") and event_id is not None:
                    self.received.append((event_id, kind, time.time()))
                    event_id = None
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.ended.set()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()


async def _open_all(streams: list[Stream]) -> None:
    for start in range(0, len(streams), OPEN_BATCH):
        await asyncio.gather(*(s.open() for s in streams[start : start + OPEN_BATCH]))


async def _submit(
    client: httpx.AsyncClient, params: dict[str, Any], n: int, pipeline: str = "steps"
) -> list[str]:
    body = {"jobs": [{"pipeline": pipeline, "params": params} for _ in range(n)]}
    ids: list[str] = []
    while len(ids) < n:
        body["jobs"] = body["jobs"][: min(100, n - len(ids))]
        answer = await client.post("/v1/jobs/batch", json=body)
        answer.raise_for_status()
        ids += [job["id"] for job in answer.json()["jobs"]]
    return ids


async def _created_at(database_url: str, job_ids: list[str]) -> dict[tuple[str, int], float]:
    url = make_url(database_url).set(drivername="postgresql")
    conn = await asyncpg.connect(url.render_as_string(hide_password=False))
    try:
        rows = await conn.fetch(
            "SELECT job_id, seq, created_at FROM events WHERE job_id = ANY($1::text[])", job_ids
        )
    finally:
        await conn.close()
    return {(r["job_id"], r["seq"]): r["created_at"] for r in rows}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _measure(
    server: Server, database_url: str, client: httpx.AsyncClient, streams: int
) -> list[float]:
    """Latencies (ms) of every progress event on `streams` measured streams."""
    jobs = 1 if streams == 1 else streams // STREAMS_PER_JOB
    # Parked first, so the jobs exist when the streams open and run once released.
    ids = await _submit(client, {"steps": STEPS, "step_ms": STEP_MS}, jobs)
    host, port = "127.0.0.1", int(server.base_url.rsplit(":", 1)[1])
    measured = [Stream(host, port, server.key, ids[i % jobs]) for i in range(streams)]
    await _open_all(measured)
    async with asyncio.timeout(120):
        await asyncio.gather(*(s.ended.wait() for s in measured))
    created = await _created_at(database_url, ids)
    latencies = [
        (arrived - created[(s.job_id, seq)]) * 1000
        for s in measured
        for seq, kind, arrived in s.received
        if kind == "progress"
    ]
    for s in measured:
        await s.close()
    return latencies


async def run_once(bus: str, open_streams: list[int]) -> dict[str, Any]:
    """One server on `bus`: latency at each count of open streams, then idle costs."""
    figures: dict[str, Any] = {}
    with temp_dir("sse") as tmp:
        database_url = await fresh_postgres()
        env = {
            **_env(tmp, database_url),
            "JOBGATE_BUS_URL": BUSES[bus],
            "JOBGATE_TRANSPORT_NAMESPACE": f"bench{uuid.uuid4().hex[:8]}",
            "JOBGATE_SSE_MAX_PER_JOB": str(STREAMS_PER_JOB),
            "JOBGATE_PIPELINES": "bench.parked:pipeline",
            "PYTHONPATH": str(Path(__file__).parent.parent),
        }
        _run_cli(["db", "upgrade"], env, tmp)
        key = _run_cli(["keys", "create", "--owner", "bench", "--role", "admin"], env, tmp)
        key = key.strip().splitlines()[-1].strip()
        port = _free_port()
        command = [
            *_jobgate(),
            *("serve", "--host", "127.0.0.1", "--port", str(port), "--worker-concurrency", "4"),
        ]
        with _running(command, env, tmp, tmp / "serve.log", port, key) as server:
            async with httpx.AsyncClient(
                base_url=server.base_url,
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            ) as client:
                idle: list[Stream] = []
                rss_before = _rss_kib(server.pid)
                cpu_before = _proc_cpu_s(server.pid)
                await asyncio.sleep(BASELINE_WINDOW_S)
                figures["base_cpu"] = (_proc_cpu_s(server.pid) - cpu_before) / BASELINE_WINDOW_S
                # Untimed: a fresh server's first jobs pay for warming up (the worker's
                # first claims and threads, statement caches), not for streaming.
                await _measure(server, database_url, client, 100)
                for count in open_streams:
                    measured = 1 if count == 1 else min(count, 100)
                    wanted_idle = count - measured
                    if wanted_idle > len(idle):
                        extra = wanted_idle - len(idle)
                        parked = await _submit(
                            client, {}, -(-extra // STREAMS_PER_JOB), pipeline="parked"
                        )
                        more = [
                            Stream("127.0.0.1", port, key, parked[i // STREAMS_PER_JOB])
                            for i in range(extra)
                        ]
                        await _open_all(more)
                        idle += more
                    latencies = await _measure(server, database_url, client, measured)
                    figures[f"p50@{count}"] = _percentile(latencies, 0.5)
                    figures[f"p99@{count}"] = _percentile(latencies, 0.99)
                    log(
                        f"  sse {bus}: {count:>6} streams, p50 {figures[f'p50@{count}']:.1f} ms, "
                        f"p99 {figures[f'p99@{count}']:.1f} ms ({len(latencies)} events)"
                    )
                opened = len(idle)
                if opened:
                    figures["rss_per_1000"] = (
                        (_rss_kib(server.pid) - rss_before) / 1024 / (opened / 1000)
                    )
                    figures["rss_total"] = _rss_kib(server.pid) / 1024
                    cpu_before = _proc_cpu_s(server.pid)
                    await asyncio.sleep(IDLE_WINDOW_S)
                    figures["idle_cpu"] = (_proc_cpu_s(server.pid) - cpu_before) / IDLE_WINDOW_S
                    alive = sum(not s.ended.is_set() for s in idle)
                    figures["idle_alive"] = alive
                    log(
                        f"  sse {bus}: {opened} idle streams: RSS {figures['rss_total']:.0f} MiB "
                        f"({figures['rss_per_1000']:.1f} MiB per 1,000), idle CPU "
                        f"{figures['idle_cpu'] * 100:.1f}%, {alive} still open"
                    )
                for s in idle:
                    await s.close()
    return figures


async def run(*, streams: list[int], runs: int, buses: list[str]) -> list[Result]:
    """Every bus, `runs` times round; medians of each figure."""
    _raise_fd_limit()
    collected: dict[str, list[dict[str, Any]]] = {bus: [] for bus in buses}
    for run_index in range(runs):
        for bus in buses:
            log(f"sse: run {run_index + 1}/{runs}, bus {bus}")
            collected[bus].append(await run_once(bus, streams))
    results: list[Result] = []
    for bus, figures in collected.items():
        for count in streams:
            for q in ("p50", "p99"):
                values = [f[f"{q}@{count}"] for f in figures]
                results.append(
                    Result(f"SSE delivery {q}, {count:,} streams", f"postgres, {bus} bus", "ms",
                           values)
                )  # fmt: skip
        if figures and "rss_per_1000" in figures[0]:
            top = max(streams)
            results.append(
                Result(f"SSE RSS per 1,000 idle streams (at {top:,})", f"postgres, {bus} bus",
                       "MiB", [f["rss_per_1000"] for f in figures],
                       note=json.dumps({"rss_total_mib": [round(f["rss_total"]) for f in figures],
                                        "still_open": [f["idle_alive"] for f in figures]}))
            )  # fmt: skip
            results.append(
                Result(f"SSE server CPU, {top:,} idle streams", f"postgres, {bus} bus",
                       "% of a core", [f["idle_cpu"] * 100 for f in figures],
                       note=json.dumps({"cpu_with_no_stream_pct":
                                        [round(f["base_cpu"] * 100, 1) for f in figures]}))
            )  # fmt: skip
    return results
