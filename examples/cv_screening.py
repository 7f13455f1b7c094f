"""CV screening: score each uploaded CV against the job's keywords, then rank them.

Serve it with `JOBGATE_PIPELINES=examples.cv_screening:pipeline make run`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, Field

from jobgate import FileRule, InputFile, Pipeline, StageContext


class Params(BaseModel):
    """Keywords a good CV mentions, and how many candidates to shortlist."""

    keywords: list[str] = Field(min_length=1, max_length=50)
    shortlist: int = Field(5, ge=1, le=100)


pipeline = Pipeline(
    "cv-screening",
    "1",
    params=Params,
    files=FileRule(
        types=["text/plain", "text/markdown"], max_bytes=2_000_000, min_count=1, max_count=200
    ),
    estimate=lambda params, files: 0.001 * files.count,
    description="Scores each CV against keywords and shortlists the best.",
)
_WORD = re.compile(r"\w+")


@pipeline.map_stage(over="files", retries=1, timeout=30)
def score(ctx: StageContext, item: InputFile) -> dict[str, Any]:
    words = {w.lower() for w in _WORD.findall(item.read_text())}
    wanted = [k.lower() for k in ctx.params.keywords]
    hits = [k for k in wanted if k in words]
    ctx.add_cost(0.001, item.name)
    return {"score": len(hits) / len(wanted), "matched": hits}


@pipeline.stage(after=[score])
def rank(ctx: StageContext, score: dict[str, Any]) -> dict[str, Any]:
    ranked = sorted(score["results"], key=lambda r: (-r["data"]["score"], r["key"]))
    shortlist = [
        {"cv": r["key"], "score": r["data"]["score"]} for r in ranked[: ctx.params.shortlist]
    ]
    ctx.save_artifact("shortlist.json", json.dumps(shortlist, indent=2).encode(), primary=True)
    return {"shortlist": shortlist, "screened": len(ranked), "unreadable": len(score["errors"])}
