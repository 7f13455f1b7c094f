"""`python -m bench.compare REF` (`make bench-compare REF=...`): this checkout against
another commit, measured in pairs, back to back.

On a shared machine a figure moves by a fifth from one minute to the next, so a change
is judged by pairs measured one right after the other, never by figures from two
sessions. `REF` is checked out (`git worktree`) in a temporary directory and its `src/`
put first on the `PYTHONPATH` of the servers and workers the benchmarks start; the
benchmark code is this checkout's.

    make bench-compare REF=704c972                         everything, 3 pairs
    make bench-compare REF=HEAD~1 BENCH_ARGS="--only drain --pairs 5"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from bench import drain, sse_latency, submit
from bench._common import Result, fresh_postgres, log, temp_dir

ROOT = Path(__file__).parent.parent
PARTS = ("sse", "drain", "submit")


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """`ref` checked out in a temporary worktree; its `src` directory."""
    with tempfile.TemporaryDirectory(prefix="jobgate-compare-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref],
            check=True,
            capture_output=True,
        )
        try:
            yield tree / "src"
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                check=False,
                capture_output=True,
            )


@contextlib.contextmanager
def _pythonpath(src: Path) -> Iterator[None]:
    """Worker processes started meanwhile import jobgate from `src`."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(src)
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


async def _sse(src: Path) -> dict[str, float]:
    latencies = await sse_latency.run_once("postgres", 150, src=src)
    return {
        "SSE submit -> completed p50 (ms)": sse_latency._percentile(latencies, 0.5),
        "SSE submit -> completed p99 (ms)": sse_latency._percentile(latencies, 0.99),
    }


async def _drain(src: Path) -> dict[str, float]:
    figures: dict[str, float] = {}
    with _pythonpath(src):
        for processes, concurrency in ((2, 64), (4, 4)):
            rate, _ = await drain.drain_processes_once(
                "postgres", 8000, processes, concurrency, 8.0
            )
            figures[f"drain {processes} processes x{concurrency} (jobs/s)"] = rate
    return figures


async def _submit(src: Path) -> dict[str, float]:
    single = Result("single", "postgres", "jobs/s")
    batch = Result("batch", "postgres", "jobs/s")
    with (
        temp_dir("compare-submit") as tmp,
        submit.serve(
            tmp, await fresh_postgres(), postgres=True, settings={"PYTHONPATH": str(src)}
        ) as server,
    ):
        await submit._measure(
            server, single, "/v1/jobs", submit.SINGLE_BODY, 1, seconds=4, inflight=16, runs=1
        )
        await submit._measure(
            server,
            batch,
            "/v1/jobs/batch",
            submit.BATCH_BODY,
            submit.BATCH_SIZE,
            seconds=4,
            inflight=4,
            runs=1,
        )
    return {"single submits (jobs/s)": single.values[0], "batch submits (jobs/s)": batch.values[0]}


MEASURE: dict[str, Callable[[Path], Awaitable[dict[str, float]]]] = {
    "sse": _sse,
    "drain": _drain,
    "submit": _submit,
}


async def compare(ref: str, parts: list[str], pairs: int) -> str:
    """The parts measured `pairs` times for `ref` then this checkout; a Markdown table."""
    figures: dict[str, dict[str, list[float]]] = {}
    with checkout(ref) as base:
        for pair in range(pairs):
            for side, src in ((ref, base), ("this checkout", ROOT / "src")):
                for part in parts:
                    for name, value in (await MEASURE[part](src)).items():
                        figures.setdefault(name, {}).setdefault(side, []).append(value)
                        log(f"pair {pair + 1}, {side}: {name} {value:,.2f}")
    lines = [
        f"| median of {pairs} pairs | {ref} | this checkout | change |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, sides in figures.items():
        before, after = statistics.median(sides[ref]), statistics.median(sides["this checkout"])
        lines.append(f"| {name} | {before:,.1f} | {after:,.1f} | {after / before - 1:+.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("ref", help="the commit to compare this checkout with")
    parser.add_argument("--only", help=f"comma-separated parts (default: {','.join(PARTS)})")
    parser.add_argument("--pairs", type=int, default=3, help="measurements of each side")
    args = parser.parse_args()
    parts = args.only.split(",") if args.only else list(PARTS)
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    print(asyncio.run(compare(args.ref, parts, args.pairs)))


if __name__ == "__main__":
    main()
