"""Pipelines the end-to-end tests load into their servers (`JOBGATE_PIPELINES`)."""

from __future__ import annotations

import asyncio

from jobgate import Pipeline, StageContext

# One stage long enough to kill its process in the middle of it.
dozer = Pipeline("dozer", description="One stage that sleeps for two seconds.")


@dozer.stage(name="sleep")
async def _sleep(ctx: StageContext) -> dict[str, int]:
    await asyncio.sleep(2)
    return {"attempt": ctx.attempt}
