"""HTTP submit → `completed` received on an open SSE stream, on an idle system.

What a client of jobgate sees end to end, as issue 3 asks: one `jobgate serve` (an
in-process worker of concurrency 4) per database and run, a client holding one
`GET /v1/events` stream open, and one `noop` job at a time: the clock starts before
`POST /v1/jobs` is written and stops when the stream delivers that job's `completed`
event. Both the submit and the stream are plain asyncio sockets on keep-alive
connections (an HTTP client library costs more CPU than the server on this machine).

A few untimed jobs first warm the server (statement caches, the worker's first claim).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from bench._common import (
    BROKERS,
    Result,
    delete_namespace,
    fresh_postgres,
    log,
    sqlite_url,
    temp_dir,
    transport_namespace,
)
from bench.sse import open_stream
from bench.submit import _env, _free_port, _jobgate, _run_cli, _running

WARM_UP = 20
SUBMIT_BODY = json.dumps({"pipeline": "noop", "params": {}}).encode()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class AllEvents:
    """`GET /v1/events` on a raw socket: hands each `completed` job id to a waiter."""

    def __init__(self, port: int, key: str) -> None:
        self.port, self.key = port, key
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.early: dict[str, float] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        reader, self._writer = await open_stream("127.0.0.1", self.port, self.key, "/v1/events")
        self._task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        kind = ""
        while line := await reader.readline():
            if line.startswith(b"event: "):
                kind = line[7:].decode().strip()
            elif line.startswith(b"data: ") and kind == "completed":
                arrived = time.perf_counter()
                job_id = json.loads(line[6:])["job_id"]
                waiter = self.waiting.pop(job_id, None)
                if waiter is None:
                    # Read before the submit's answer was (the two sockets are read in
                    # whatever order the loop finds them ready).
                    self.early[job_id] = arrived
                elif not waiter.done():
                    waiter.set_result(arrived)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()


class Submitter:
    """`POST /v1/jobs` on one keep-alive socket."""

    def __init__(self, port: int, key: str) -> None:
        self.port, self.key = port, key
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)

    def send(self) -> None:
        assert self._writer is not None
        self._writer.write(
            (
                f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(SUBMIT_BODY)}\r\n\r\n"
            ).encode()
            + SUBMIT_BODY
        )

    async def answer(self) -> dict[str, Any]:
        assert self._reader is not None
        status = await self._reader.readline()
        if b" 202 " not in status:
            raise RuntimeError(f"submit refused: {status!r}")
        length = 0
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        body: dict[str, Any] = json.loads(await self._reader.readexactly(length))
        return body

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


async def _one(stream: AllEvents, submitter: Submitter) -> float:
    """One job: ms from writing its submit to reading its `completed` on the stream."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    submitter.send()
    job = await submitter.answer()
    if job["status"] == "succeeded":  # pragma: no cover - only with a very fast worker
        raise RuntimeError("the answer already says succeeded: the clock would be wrong")
    arrived = stream.early.pop(job["id"], None)
    if arrived is None:
        done: asyncio.Future[float] = loop.create_future()
        stream.waiting[job["id"]] = done
        async with asyncio.timeout(30):
            arrived = await done
    return (arrived - started) * 1000


async def run_once(
    database: str,
    samples: int,
    *,
    src: Path | None = None,
    gap_s: float = 0.01,
    broker: str = "",
) -> list[float]:
    """One server on `database`: `samples` submit→completed latencies (ms). `src`: run
    the jobgate found there instead of this checkout's (`bench/compare.py`). `broker`:
    its tasks go through that transport (the submit's token is published by the
    server's relay and consumed by its worker)."""
    namespace = transport_namespace()
    try:
        return await _run_once(database, samples, src, gap_s, broker, namespace)
    finally:
        if broker:
            await delete_namespace(broker, namespace)


async def _run_once(
    database: str, samples: int, src: Path | None, gap_s: float, broker: str, namespace: str
) -> list[float]:
    with temp_dir("sse-latency") as tmp:
        url = sqlite_url(tmp) if database == "sqlite" else await fresh_postgres()
        paths = [str(src)] if src is not None else []
        env = {
            **_env(tmp, url),
            "JOBGATE_TRANSPORT_NAMESPACE": namespace,
            "PYTHONPATH": os.pathsep.join([*paths, str(Path(__file__).parent.parent)]),
        }
        if broker:
            env["JOBGATE_TRANSPORT_URL"] = BROKERS[broker]
        if database == "postgres":
            _run_cli(["db", "upgrade"], env, tmp)
        key = _run_cli(["keys", "create", "--owner", "bench", "--role", "user"], env, tmp)
        key = key.strip().splitlines()[-1].strip()
        port = _free_port()
        command = [
            *_jobgate(),
            *("serve", "--host", "127.0.0.1", "--port", str(port), "--worker-concurrency", "4"),
        ]
        with _running(command, env, tmp, tmp / "serve.log", port, key):
            stream, submitter = AllEvents(port, key), Submitter(port, key)
            await stream.open()
            await submitter.open()
            try:
                for _ in range(WARM_UP):
                    await _one(stream, submitter)
                latencies = []
                for _ in range(samples):
                    latencies.append(await _one(stream, submitter))
                    if gap_s:
                        await asyncio.sleep(gap_s)
            finally:
                await submitter.close()
                await stream.close()
    return latencies


async def run(
    *, databases: list[str], samples: int, runs: int, brokers: list[str] | None = None
) -> list[Result]:
    """p50 and p99 per database, the median of `runs` runs each; then on PostgreSQL with
    each of `brokers` as the transport."""
    setups = [(database, "") for database in databases]
    setups += [("postgres", broker) for broker in brokers or [] if "postgres" in databases]
    results: list[Result] = []
    for database, broker in setups:
        label = f"{database}, {broker} transport" if broker else database
        p50 = Result(
            benchmark="HTTP submit -> completed on an open SSE stream, p50",
            database=label,
            unit="ms",
        )
        p99 = Result(
            benchmark="HTTP submit -> completed on an open SSE stream, p99",
            database=label,
            unit="ms",
        )
        for run_index in range(runs):
            latencies = await run_once(database, samples, broker=broker)
            p50.values.append(_percentile(latencies, 0.5))
            p99.values.append(_percentile(latencies, 0.99))
            log(
                f"  sse latency {label} run {run_index + 1}: p50 {p50.values[-1]:.2f} ms, "
                f"p99 {p99.values[-1]:.2f} ms ({samples} jobs)"
            )
        results += [p50, p99]
    return results
