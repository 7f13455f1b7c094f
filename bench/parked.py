"""A pipeline no bench worker runs: its stage is on a queue nothing serves.

`bench/sse.py` opens its idle streams on jobs of this pipeline, which stay `queued` and
say nothing for as long as the bench runs.
"""

from __future__ import annotations

from jobgate import Pipeline, StageContext

pipeline = Pipeline("parked", "1", description="Never runs (bench/sse.py's idle streams).")


@pipeline.stage(queue="parked")
def wait(ctx: StageContext) -> None:
    """Never called: no worker serves the `parked` queue."""
