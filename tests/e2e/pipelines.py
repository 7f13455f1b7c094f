"""Pipelines the end-to-end tests load into their servers (`JOBGATE_PIPELINES`)."""

from __future__ import annotations

import asyncio
import time

from jobgate import Pipeline, StageContext

# One stage long enough to kill its process in the middle of it.
dozer = Pipeline("dozer", description="One stage that sleeps for two seconds.")


@dozer.stage(name="sleep")
async def _sleep(ctx: StageContext) -> dict[str, int]:
    await asyncio.sleep(2)
    return {"attempt": ctx.attempt}


# A sync stage that never looks at its cancel: only the end of its process stops it.
stubborn = Pipeline("stubborn", description="A thread stage that sleeps for a minute.")


@stubborn.stage(name="block")
def _block(ctx: StageContext) -> dict[str, int]:
    time.sleep(60)
    return {"attempt": ctx.attempt}
