"""The comparison table (stdout) and the generated block of bench/RESULTS.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

from bench.peers.runner import PeerResult

RESULTS = Path(__file__).resolve().parents[1] / "RESULTS.md"
START = "<!-- peers:start -->"
END = "<!-- peers:end -->"

COLUMNS = (
    "peer",
    "drain jobs/s",
    "drain N",
    "latency p50 ms",
    "latency p99 ms",
    "latency samples",
    "enqueue single/s",
    "enqueue bulk/s",
    "worker boot s",
    "runs",
)


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def row(result: PeerResult) -> list[str]:
    drain_n = result.values("drain", "n")
    samples = result.values("latency", "n")
    bulk = result.median("enqueue_bulk", "per_s")
    runs = f"{len(result.runs)}" + (f" ({len(result.failures)} failed)" if result.failures else "")
    return [
        result.peer.name,
        _fmt(result.median("drain", "per_s")),
        _fmt(drain_n[0]) if drain_n else "—",
        _fmt(result.median("latency", "p50_ms"), 1),
        _fmt(result.median("latency", "p99_ms"), 1),
        _fmt(min(samples)) if samples else "—",
        _fmt(result.median("enqueue_single", "per_s")),
        _fmt(bulk) if bulk is not None else "n/a",
        _fmt(result.median("drain", "boot_s"), 1),
        runs,
    ]


def text_table(results: list[PeerResult]) -> str:
    rows = [list(COLUMNS), *(row(r) for r in results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for index, cells in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: list[PeerResult]) -> str:
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] + ["--:"] * (len(COLUMNS) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(lines)


def _per_run(result: PeerResult) -> str:
    def series(measure: str, key: str, digits: int) -> str:
        values = result.values(measure, key)
        return " / ".join(_fmt(v, digits) for v in values) if values else "—"

    parts = [
        f"drain {series('drain', 'per_s', 0)} jobs/s "
        f"(backlog enqueued in {series('drain', 'fill_s', 1)} s, untimed)",
        f"p50 {series('latency', 'p50_ms', 1)} ms",
        f"p99 {series('latency', 'p99_ms', 1)} ms",
        f"single {series('enqueue_single', 'per_s', 0)}/s",
    ]
    if result.values("enqueue_bulk", "per_s"):
        parts.append(f"bulk {series('enqueue_bulk', 'per_s', 0)}/s")
    others = [run.get("other_cpu_cores") for run in result.runs]
    if any(isinstance(o, float) for o in others):
        cpu = " / ".join(f"{o:.1f}" if isinstance(o, float) else "?" for o in others)
        parts.append(f"CPU busy outside the benchmark {cpu} cores")
    completed = result.values("drain", "completed")
    wanted = result.values("drain", "n")
    if completed and wanted and any(c != w for c, w in zip(completed, wanted, strict=False)):
        parts.append(f"drain completions {series('drain', 'completed', 0)} (duplicates?)")
    return f"- {result.peer.name}: " + "; ".join(parts)


def _servers(results: list[PeerResult]) -> dict[str, str]:
    found: dict[str, str] = {}
    for result in results:
        for run in result.runs:
            found.update(run.get("servers", {}))
    return found


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def markdown_block(
    results: list[PeerResult], command: str, runs: int, load_before: str, minutes: float
) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    servers = _servers(results)
    lines = [
        START,
        f"Measured {now} with `{command}` ({minutes:.1f} min in all). Every figure is the "
        f"median of {runs} run(s); each run starts fresh workers and purged queues.",
        "",
        "| machine | |",
        "|---|---|",
        f"| nproc | {os.cpu_count()} |",
        f"| cpu | {_cpu()} |",
        f"| python (every venv) | {platform.python_version()} |",
        *(f"| {name} server | {version} |" for name, version in sorted(servers.items())),
        f"| load average before / after | {load_before} / {loadavg()} |",
        "",
        markdown_table(results),
        "",
        "Versions, settings and worker commands:",
        "",
    ]
    for result in results:
        versions = ", ".join(f"{k} {v}" for k, v in (result.first("versions") or {}).items())
        workers = "; ".join(f"`{w}`" for w in result.first("workers") or [])
        bulk = result.first("bulk_api") or "none (the bulk column is n/a)"
        lines.append(
            f"- **{result.peer.name}** ({versions or 'no run finished'}): "
            f"{result.peer.settings}. Workers: {workers or '—'}. Bulk API: {bulk}."
        )
    lines += ["", "Per-run values, in run order:", ""]
    lines += [_per_run(r) for r in results if r.runs]
    problems = [(r.peer.name, e) for r in results for e in r.errors()]
    leftovers = [(r.peer.name, r.leftovers) for r in results if r.leftovers]
    retries = [(r.peer.name, r.retries) for r in results if r.retries]
    if problems or leftovers or retries:
        lines += ["", "Errors and retries:", ""]
        lines += [f"- {name}: {error}" for name, error in problems]
        lines += [f"- {name}: {n} leftover process(es) killed" for name, n in leftovers]
        lines += [f"- {name}: {n} run(s) retried after an error" for name, n in retries]
    lines.append(END)
    return "\n".join(lines)


def write_block(block: str, path: Path = RESULTS) -> None:
    """Replace the text between the markers (markers included), or append the block."""
    text = path.read_text() if path.exists() else "# jobgate benchmarks\n"
    if START in text and END in text:
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        path.write_text(head + block + tail)
    else:
        path.write_text(text.rstrip("\n") + "\n\n" + block + "\n")
