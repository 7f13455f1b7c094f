"""The built-in pipelines `noop`, `steps` and `text-stats` (API.md, "Built-in pipelines")."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jobgate.pipelines.context import StageContext
from jobgate.pipelines.files import FileRule, InputFile
from jobgate.pipelines.pipeline import Pipeline

# -- noop ------------------------------------------------------------------------------

noop = Pipeline("noop", "1", description="One stage that echoes its params back.")


@noop.stage(name="run")
async def _noop_run(ctx: StageContext) -> Any:
    return ctx.params


# -- steps -----------------------------------------------------------------------------


class StepsParams(BaseModel):
    """A job of N timed steps that can fail, cost money and log on purpose."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(5, ge=1, le=10_000)
    step_ms: int = Field(200, ge=0, le=600_000)
    fail_at: int | None = Field(None, description="the step at which `work` raises")
    fail_attempts: int = Field(0, ge=0, description="only the first N attempts fail; 0: all")
    cost_per_step: float = Field(0.0, ge=0)
    message_every: int = Field(0, ge=0)


steps = Pipeline(
    "steps",
    "1",
    params=StepsParams,
    estimate=lambda params, files: params.steps * params.cost_per_step,
    description="N timed steps with progress, cost, messages and planned failures.",
)


@steps.stage
async def prepare(ctx: StageContext) -> dict[str, Any]:
    return {"steps": ctx.params.steps}


@steps.stage(after=[prepare], retries=2, backoff=0.2)
async def work(ctx: StageContext) -> dict[str, Any]:
    p: StepsParams = ctx.params
    fails_now = p.fail_at is not None and (p.fail_attempts == 0 or ctx.attempt <= p.fail_attempts)
    for step in range(1, p.steps + 1):
        ctx.check_cancelled()
        if p.step_ms:
            await asyncio.sleep(p.step_ms / 1000)
        if fails_now and step == p.fail_at:
            raise RuntimeError(f"planned failure at step {step}")
        if p.cost_per_step:
            ctx.add_cost(p.cost_per_step, f"step {step}")
        if p.message_every and step % p.message_every == 0:
            ctx.log(f"step {step} of {p.steps}")
        ctx.progress(step / p.steps, f"step {step}")
    return {"steps": p.steps, "cost_usd": ctx.cost_usd}


@steps.stage(after=[work])
async def finish(ctx: StageContext, work: dict[str, Any]) -> dict[str, Any]:
    return {"steps": work["steps"], "cost_usd": work["cost_usd"]}


# -- text-stats ------------------------------------------------------------------------


class TextStatsParams(BaseModel):
    """Line, word and character counts of text files, with the most common words."""

    model_config = ConfigDict(extra="forbid")

    top: int = Field(10, ge=1, le=100)


text_stats = Pipeline(
    "text-stats",
    "1",
    params=TextStatsParams,
    files=FileRule(
        types=["text/plain", "text/markdown", "text/csv"],
        max_bytes=1_000_000,
        min_count=1,
        max_count=20,
    ),
    description="Counts lines, words and characters per text file, with a report.",
)
_WORD = re.compile(r"\w+")


def _counts(text: str) -> Counter[str]:
    return Counter(word.lower() for word in _WORD.findall(text))


def _top(counter: Counter[str], n: int) -> list[list[Any]]:
    ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [[word, count] for word, count in ranked]


@text_stats.map_stage(over="files")
def count(ctx: StageContext, item: InputFile) -> dict[str, Any]:
    text = item.read_text()
    return {
        "lines": len(text.splitlines()),
        "words": len(text.split()),
        "chars": len(text),
        "top_words": _top(_counts(text), ctx.params.top),
    }


@text_stats.stage(after=[count])
def report(ctx: StageContext, count: dict[str, Any]) -> dict[str, Any]:
    results = count["results"]
    if not results:
        raise RuntimeError("no file could be counted")
    words: Counter[str] = Counter()
    for result in results:
        words.update(_counts(ctx.files[result["index"]].read_text()))
    summary = {
        "files": len(results),
        "failed": len(count["errors"]),
        "lines": sum(r["data"]["lines"] for r in results),
        "words": sum(r["data"]["words"] for r in results),
        "chars": sum(r["data"]["chars"] for r in results),
        "top_words": _top(words, ctx.params.top),
    }
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["file", "lines", "words", "chars"])
    for r in results:
        writer.writerow([r["key"], r["data"]["lines"], r["data"]["words"], r["data"]["chars"]])
    ctx.save_artifact(
        "report.json",
        json.dumps(summary, indent=2).encode(),
        content_type="application/json",
        primary=True,
    )
    ctx.save_artifact("report.csv", table.getvalue().encode(), content_type="text/csv")
    return summary


ALL = (noop, steps, text_stats)
