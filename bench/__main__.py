"""`python -m bench` (`make bench`): the throughput baselines, printed and recorded.

    make bench                                        everything, then bench/RESULTS.md
    make bench BENCH_ARGS="--only drain --db sqlite"  one part (RESULTS.md untouched)
    make bench BENCH_ARGS="--quick"                   a smoke run of a few seconds each

A full run (both parts, both databases, not `--quick`) rewrites the generated block
of `bench/RESULTS.md` (between its markers); the notes around it are kept.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from bench import _common, auth, drain, latency, sse, sse_latency, submit
from bench._common import DATABASES, Result, log

RESULTS = Path(__file__).with_name("RESULTS.md")
START = "<!-- results:start (written by `python -m bench`) -->"
END = "<!-- results:end -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    summary = (__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m bench", description=summary)
    parser.add_argument(
        "--only",
        choices=["drain", "submit", "latency", "auth", "sse"],
        help="run one part only",
    )
    parser.add_argument("--db", choices=[*DATABASES, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    parser.add_argument("--runs", type=int, default=_common.RUNS, help="runs per figure")
    parser.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="update bench/RESULTS.md (default: only after a full run)",
    )
    return parser.parse_args(argv)


def quiet_logging() -> None:
    """jobgate's own log lines at WARNING and above, on stderr (stdout is the table)."""
    from jobgate.config import Settings
    from jobgate.observability.logging import configure_logging

    configure_logging(Settings(_env_file=None, log_level="WARNING"))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
            handler.addFilter(_common.EVENTS)


async def main(args: argparse.Namespace) -> list[Result]:
    databases = list(DATABASES) if args.db == "all" else [args.db]
    if "postgres" in databases:
        version, why = await _common.postgres_version()
        args.postgres_version = version or "n/a"
        if why is not None:
            if args.db == "postgres":
                raise SystemExit(f"PostgreSQL at {_common.PG_ADMIN_URL} does not answer: {why}")
            log(f"PostgreSQL skipped ({_common.PG_ADMIN_URL}: {why})")
            databases.remove("postgres")
    # Each figure of issue 3 on each transport: the brokers' only with PostgreSQL.
    wants_brokers = "postgres" in databases and args.only in (None, "drain", "submit", "latency")
    brokers = await _common.answering_brokers() if wants_brokers else []
    results: list[Result] = []
    if args.only in (None, "drain"):
        results += await drain.run(
            databases,
            count=500 if args.quick else 6000,
            concurrencies=[4, 16, 64],
            time_limit_s=2.0 if args.quick else 6.0,
            runs=args.runs,
            brokers=brokers,
        )
    if args.only in (None, "drain"):
        results += await drain.run_processes(
            databases,
            count=1000 if args.quick else 8000,
            shapes=[(4, 4), (4, 16), (2, 64)],
            broker_shapes=[(4, 16), (2, 64)],
            brokers=brokers,
            time_limit_s=3.0 if args.quick else 8.0,
            runs=args.runs,
        )
        results += await drain.run_relay(
            brokers, count=2000 if args.quick else 20_000, runs=args.runs
        )
    if args.only in (None, "submit"):
        results += await submit.run(
            databases,
            seconds=1.5 if args.quick else 5.0,
            inflight_single=16,
            inflight_batch=4,
            runs=args.runs,
        )
        results += await submit.run_transports(
            brokers,
            seconds=1.5 if args.quick else 5.0,
            inflight_single=16,
            inflight_batch=4,
            runs=args.runs,
        )
    if args.only in (None, "latency"):
        results += await latency.run(databases, samples=40 if args.quick else 200, runs=args.runs)
        results += await sse_latency.run(
            databases=databases,
            samples=40 if args.quick else 200,
            runs=args.runs,
            brokers=brokers,
        )
    if args.only in (None, "auth") and "postgres" in databases:
        # Shorter runs, more rounds: its figures are ratios of runs a few seconds apart.
        results += await auth.run(
            seconds=1.5 if args.quick else 3.0, inflight=16, runs=max(5, args.runs)
        )
    if args.only in (None, "sse") and "postgres" in databases:
        results += await sse.run(
            streams=[1, 100, 1000] if args.quick else [1, 100, 10_000],
            runs=1 if args.quick else args.runs,
            buses=list(sse.BUSES),
        )
    return results


def generated_block(results: list[Result], command: str, postgres: str) -> str:
    info = _common.machine(postgres)
    lines = [
        START,
        f"Measured {info['date']} with `{command}`.",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in info.items() if name != "date"),
        f"| load average at the end | {_loadavg()} |",
        "",
        _common.markdown_table(results),
        "",
    ]
    notes = [f"- {r.benchmark}, {r.database}: {r.note}" for r in results if r.note]
    if notes:
        lines += ["Per-run details:", "", *notes, ""]
    lines.append(END)
    return "\n".join(lines)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def write_results(block: str) -> None:
    if RESULTS.exists():
        text = RESULTS.read_text()
        if START in text and END in text:
            head, _, rest = text.partition(START)
            _, _, tail = rest.partition(END)
            RESULTS.write_text(head + block + tail)
            return
        RESULTS.write_text(text.rstrip() + "\n\n" + block + "\n")
        return
    RESULTS.write_text("# jobgate benchmarks\n\n" + block + "\n")


def cli(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_logging()
    results = asyncio.run(main(args))
    sys.stderr.flush()
    print()
    print(_common.text_table(results))
    for r in results:
        if r.note:
            print(f"  note: {r.benchmark}, {r.database}: {r.note}")
    full = args.only is None and args.db == "all" and not args.quick and args.runs == _common.RUNS
    write = full if args.write is None else args.write
    if write:
        command = "make bench" if full else f'make bench BENCH_ARGS="{" ".join(sys.argv[1:])}"'
        postgres = getattr(args, "postgres_version", "n/a")
        write_results(generated_block(results, command, postgres))
        print(f"\nwrote {RESULTS}")
    else:
        print("\n(partial run: bench/RESULTS.md not updated; --write forces it)")


if __name__ == "__main__":
    cli()
