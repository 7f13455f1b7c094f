"""Pipelines the engine tests run: DAGs, map stages, timeouts, artifacts, threads."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

from pydantic import BaseModel

from jobgate import FileRule, Pipeline, StageContext

# A diamond: `split` fans out to `left` and `right`, which run in parallel; `join` gets both.
diamond = Pipeline("diamond")


@diamond.stage
async def split(ctx: StageContext) -> dict[str, Any]:
    return {"n": ctx.params.get("n", 3)}


@diamond.stage(after=[split])
async def left(ctx: StageContext, split: dict[str, Any]) -> dict[str, Any]:
    started = time.time()
    await asyncio.sleep(ctx.params.get("branch_s", 0.3))
    return {"value": split["n"] * 2, "started": started, "ended": time.time()}


@diamond.stage(after=[split])
def right(ctx: StageContext, split: dict[str, Any]) -> dict[str, Any]:
    started = time.time()
    time.sleep(ctx.params.get("branch_s", 0.3))
    return {"value": split["n"] + 1, "started": started, "ended": time.time()}


@diamond.stage(after=[left, right])
async def join(ctx: StageContext, left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
    return {"sum": left["value"] + right["value"]}


# Map over a list another stage returns; the item "bad" fails on every attempt.
mapper = Pipeline("mapper")


@mapper.stage
async def items(ctx: StageContext) -> list[str]:
    return list(ctx.params["items"])


@mapper.map_stage(over=items, retries=1, backoff=0.01)
async def shout(ctx: StageContext, item: str) -> dict[str, Any]:
    if item == "bad":
        raise ValueError(f"cannot shout {item!r}")
    return {"text": item.upper(), "attempt": ctx.attempt}


@mapper.stage(after=[shout])
async def collect(ctx: StageContext, shout: dict[str, Any]) -> dict[str, Any]:
    return {
        "texts": [r["data"]["text"] for r in shout["results"]],
        "failed": [e["key"] for e in shout["errors"]],
    }


class Summary(BaseModel):
    total: int
    names: list[str]


# Sync stages in threads: timeouts, cooperative cancellation, artifacts, pydantic output.
threads = Pipeline("threads", files=FileRule(types=["text/plain"], max_count=5))


@threads.stage(timeout=0.5)
def run(ctx: StageContext) -> Summary:
    mode = ctx.params.get("mode", "ok")
    if mode == "sleep":
        for _ in range(200):
            time.sleep(0.05)
            ctx.check_cancelled()
    if mode == "loop":
        # Loops until cancelled, whatever the timeout.
        while True:
            time.sleep(0.02)
            ctx.check_cancelled()
    ctx.save_artifact("names.txt", "\n".join(f.name for f in ctx.files).encode(), primary=True)
    ctx.log(f"thread {threading.current_thread().name}")
    return Summary(total=sum(f.size for f in ctx.files), names=[f.name for f in ctx.files])


# A sync stage that overruns its timeout without looking at its cancel: its thread
# cannot be stopped, and runs on for `sleep_s`.
overrun = Pipeline("overrun")


@overrun.stage(timeout=0.3)
def crawl(ctx: StageContext) -> dict[str, float]:
    started = time.time()
    time.sleep(float(ctx.params.get("sleep_s", 0.05)))
    return {"started": started}


slow = Pipeline("slow")


@slow.stage(timeout=0.3, retries=1, backoff=0.01)
async def wait(ctx: StageContext) -> None:
    await asyncio.sleep(5)


cancellable = Pipeline("cancellable")


@cancellable.stage
def spin(ctx: StageContext) -> None:
    ctx.save_artifact("partial.txt", b"half done")
    while True:
        time.sleep(0.02)
        ctx.check_cancelled()


# One branch fails the job at once; the other, a thread that never checks for a stop,
# saves an artifact after that (within its cancel grace).
late_saver = Pipeline("late-saver")


@late_saver.stage(retries=0)
async def breaks(ctx: StageContext) -> None:
    raise ValueError("broken on purpose")


@late_saver.stage
def saves_late(ctx: StageContext) -> None:
    time.sleep(float(ctx.params.get("after_s", 0.6)))
    ctx.save_artifact("late.txt", b"too late")


# A bit of everything, for the mixed-workload test: a map over a stage's output (async),
# a sync sibling in a thread, a join; costs everywhere; failures where `fail` says.
class MixedParams(BaseModel):
    n: int = 3
    fail: list[str] = []
    sleep_s: float = 0.01


mixed = Pipeline("mixed", params=MixedParams)


@mixed.stage
async def plan(ctx: StageContext) -> list[int]:
    await asyncio.sleep(ctx.params.sleep_s)
    ctx.add_cost(0.01, item="plan")
    return list(range(ctx.params.n))


@mixed.map_stage(over=plan, retries=1, backoff=0.01)
async def part(ctx: StageContext, item: int) -> int:
    await asyncio.sleep(ctx.params.sleep_s)
    ctx.add_cost(0.01, item=f"part {item}")
    if f"part{item}" in ctx.params.fail:
        raise ValueError(f"part {item} fails")
    return item * item


@mixed.stage(after=[plan], retries=1, backoff=0.01)
def side(ctx: StageContext, plan: list[int]) -> int:
    time.sleep(ctx.params.sleep_s)
    ctx.add_cost(0.01, item="side")
    if "side" in ctx.params.fail:
        raise ValueError("side fails")
    return len(plan)


@mixed.stage(after=[part, side], name="join")
async def join_mixed(ctx: StageContext, part: dict[str, Any], side: int) -> dict[str, Any]:
    return {"parts": len(part["results"]), "failed": len(part["errors"]), "side": side}


# Six branches that finish at the same moment, then one stage that needs all of them.
fan = Pipeline("fan")


@fan.stage
async def start(ctx: StageContext) -> int:
    return 1


def _branch(i: int) -> Any:
    async def branch(ctx: StageContext, start: int) -> int:
        return start + i

    branch.__name__ = f"b{i}"
    return fan.stage(after=[start])(branch)


BRANCHES = [_branch(i) for i in range(6)]


@fan.stage(after=BRANCHES)
async def gather(ctx: StageContext, **outputs: int) -> int:
    return sum(v for k, v in outputs.items() if k != "start")


# Sync stages in subprocesses (isolation="process"): reports, crashes, kills, memory limits.
class ProcParams(BaseModel):
    mode: str = "ok"
    crash_attempts: int = 1


proc = Pipeline("proc", params=ProcParams)


@proc.stage
async def prepare(ctx: StageContext) -> dict[str, Any]:
    return {"n": 3}


@proc.stage(after=[prepare], retries=1, backoff=0.01, isolation="process")
def crunch(ctx: StageContext, prepare: dict[str, Any]) -> dict[str, Any]:
    params: ProcParams = ctx.params
    crashing = ctx.attempt <= params.crash_attempts
    if params.mode == "cooperative":
        ctx.progress(0.1, "waiting")
        while True:
            time.sleep(0.01)
            ctx.check_cancelled()
    if params.mode == "busy":
        ctx.progress(0.1, "spinning")
        while True:  # never looks at the cancellation flag
            pass
    if params.mode == "exit" and crashing:
        os._exit(3)
    if params.mode == "sigkill" and crashing:
        os.kill(os.getpid(), signal.SIGKILL)
    if params.mode == "alloc":
        ctx.log(f"allocated {len(bytearray(500 * 1024 * 1024))} bytes")
    if params.mode == "raise":
        raise ValueError("no crunching today")
    if params.mode == "budget":
        ctx.add_cost(1000.0, "too much")
        ctx.log("still running after the budget")
    for i in range(prepare["n"]):
        ctx.progress((i + 1) / prepare["n"], f"step {i + 1}")
        ctx.add_cost(0.5, "step")
    print("a print goes to stderr, not into the protocol")
    ctx.log(f"pid {os.getpid()}")
    saved = ctx.save_artifact("report.txt", f"n={prepare['n']}".encode(), primary=True)
    return {
        "pid": os.getpid(),
        "n": prepare["n"],
        "mode": params.mode,
        "attempt": ctx.attempt,
        "cost": ctx.cost_usd,
        "artifact": saved["name"],
    }


proc_slow = Pipeline("proc-slow")


@proc_slow.stage(timeout=0.5, isolation="process")
def nap(ctx: StageContext) -> None:
    time.sleep(30)


# Sleeps, and says when: for concurrency caps.
napper = Pipeline("nap")
capped = Pipeline("capped", max_running=1)


async def _nap(ctx: StageContext) -> dict[str, float]:
    started = time.time()
    await asyncio.sleep(0.3)
    return {"started": started, "ended": time.time()}


napper.stage(name="sleep")(_nap)
capped.stage(name="sleep")(_nap)


# Two branches that spend in parallel: each alone stays under the job's budget.
spenders = Pipeline("spenders")


async def _spend(ctx: StageContext) -> dict[str, int]:
    steps = int(ctx.params.get("steps", 8))
    for step in range(1, steps + 1):
        await asyncio.sleep(ctx.params.get("step_s", 0.05))
        ctx.add_cost(float(ctx.params.get("cost", 1.0)), item=f"step {step}")
    return {"steps": steps}


spenders.stage(name="east")(_spend)
spenders.stage(name="west")(_spend)


# Two charges half a second apart, after a pause the test uses to lock the job's row.
charger = Pipeline("charger")


@charger.stage(name="charge")
async def _charge(ctx: StageContext) -> dict[str, int]:
    await asyncio.sleep(1.0)
    ctx.add_cost(1.0, item="first")
    await asyncio.sleep(0.5)  # a flush takes the first charge and waits for the row
    ctx.add_cost(1.0, item="second")
    return {"charges": 2}


# Outputs no store keeps as they are: NaN and infinities (stored as null), and a NUL
# character (refused); the map stage's records hold an infinity too.
odd_values = Pipeline("odd-values")


def _odd(kind: str) -> Any:
    return {"nul": "a\x00b", "nan": float("nan")}[kind]


@odd_values.stage
async def metrics(ctx: StageContext) -> dict[str, Any]:
    return {"loss": _odd(ctx.params["kind"]), "best": float("inf"), "steps": 3}


@odd_values.stage
async def points(ctx: StageContext) -> list[int]:
    return [1, 2]


@odd_values.map_stage(over=points)
async def per_point(ctx: StageContext, item: int) -> dict[str, Any]:
    return {"item": item, "score": float("-inf")}


# Saves an artifact once the test opens `SAVE_GATE` (while the store is down, say).
gated_saver = Pipeline("gated-saver")
SAVE_GATE = threading.Event()
SAVE_WAITING = threading.Event()


@gated_saver.stage(timeout=60)
def save_when_told(ctx: StageContext) -> dict[str, Any]:
    SAVE_WAITING.set()
    SAVE_GATE.wait(30)
    saved = ctx.save_artifact("out.txt", b"saved through a store outage", primary=True)
    return {"sha256": saved["sha256"]}


ALL = (
    gated_saver,
    odd_values,
    napper,
    capped,
    fan,
    diamond,
    mapper,
    threads,
    slow,
    cancellable,
    proc,
    proc_slow,
    spenders,
    charger,
    overrun,
    late_saver,
    mixed,
)
