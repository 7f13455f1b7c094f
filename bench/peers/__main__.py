"""`python -m bench.peers` (`make bench-peers`): peer job queues, measured the same way.

    make bench-peers                                      every peer, 3 runs, table only
    make bench-peers BENCH_ARGS="--write"                 ... and the block in RESULTS.md
    make bench-peers BENCH_ARGS="--only celery-redis,arq --quick"

Each peer library is installed (pinned) in its own venv under `.bench-venvs/`; a driver
script (`bench/peers/drivers/`) runs there, starts and stops the workers, and prints its
figures as one JSON line. Peers run one at a time. See bench/RESULTS.md for what each
figure means. Never part of CI.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from bench.peers import catalog, report, runner, venvs
from bench.peers.catalog import Peer

RUNS = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    summary = (__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=summary)
    names = ", ".join(peer.name for peer in catalog.PEERS)
    parser.add_argument("--only", help=f"comma-separated peers (default: all of {names})")
    parser.add_argument("--runs", type=int, help=f"runs per peer (default {RUNS}, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--write", action="store_true", help="rewrite the block in RESULTS.md")
    parser.add_argument(
        "--install-only", action="store_true", help="create/update the venvs, measure nothing"
    )
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else RUNS
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    try:
        args.peers = select(args.only)
    except KeyError as exc:
        parser.error(f"unknown peer {exc}; known: {names}")
    return args


def select(only: str | None) -> list[Peer]:
    if not only:
        return list(catalog.PEERS)
    return [catalog.BY_NAME[name.strip()] for name in only.split(",") if name.strip()]


def command_line(argv: list[str]) -> str:
    args = shlex.join(argv)
    if "MAKELEVEL" in os.environ:
        return "make bench-peers" + (f' BENCH_ARGS="{args}"' if args else "")
    return ".venv/bin/python -m bench.peers" + (f" {args}" if args else "")


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM like Ctrl-C: unwind, so that the running driver and its workers are stopped."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    sizes = runner.QUICK if args.quick else runner.FULL
    pythons: dict[str, Path] = {}
    for peer in args.peers:
        if peer.venv.name not in pythons:
            pythons[peer.venv.name] = venvs.ensure(peer.venv, runner.log)
    if args.install_only:
        for name, exe in pythons.items():
            print(f"{name}: {exe}")
        return 0
    load_before = report.loadavg()
    started = time.monotonic()
    results: list[runner.PeerResult] = []
    for peer in args.peers:
        down = runner.wait_for_servers(peer)
        if down:
            runner.log(f"{peer.name}: skipped, {', '.join(down)} not reachable for 90 s")
            continue
        results.append(runner.run_peer(peer, pythons[peer.venv.name], sizes, args.runs))
    minutes = (time.monotonic() - started) / 60
    print()
    print(report.text_table(results))
    for result in results:
        for error in result.errors():
            print(f"  error: {result.peer.name}: {error}")
        if result.retries:
            print(f"  retried: {result.peer.name}: {result.retries} run(s) after an error")
        if result.leftovers:
            print(f"  leftovers: {result.peer.name}: {result.leftovers} process(es) killed")
    if args.write:
        block = report.markdown_block(results, command_line(raw), args.runs, load_before, minutes)
        report.write_block(block)
        print(f"\nwrote the peers block of {report.RESULTS}")
    failed = any(not r.runs for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: the running driver and its workers were stopped", file=sys.stderr)
        sys.exit(130)
