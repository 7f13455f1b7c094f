"""A store outage while a stage's context writes (an artifact): the write waits the
outage out, and the stage goes on; it is never the stage's failure, and no store
internals reach the job's error."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from jobgate.store.tables import artifacts
from tests.engine import pipelines
from tests.engine.conftest import Engine


async def _admin(url: str) -> tuple[asyncpg.Connection, str]:
    parsed = make_url(url)
    database = str(parsed.database)
    admin = await asyncpg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, database="postgres"
    )
    return admin, database


async def _cut(admin: asyncpg.Connection, database: str) -> None:
    """The database refuses connections, and every open one is closed."""
    await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    await admin.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1",
        database,
    )


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.parametrize(
    ("lease_s", "attempts"),
    [
        pytest.param(10.0, 1, id="outage-within-the-lease"),
        pytest.param(1.5, 2, id="outage-past-the-lease"),
    ],
)
async def test_an_artifact_saved_during_a_store_outage_is_recorded_after_it(
    engine: Engine, lease_s: float, attempts: int
) -> None:
    """A 3 s outage while the stage saves: within its lease the save waits and the stage
    goes on (one attempt); past it, the stage stops without a failure and its task runs
    again once the store is back. Regression: the stage failed for good
    (`stage_failed`, no retries), its error message the SQL statement, its parameters
    and the task's lease token."""
    engine.settings = engine.settings.model_copy(update={"lease_s": lease_s})
    pipelines.SAVE_GATE.clear()
    pipelines.SAVE_WAITING.clear()
    admin, database = await _admin(engine.db.url)
    try:
        await engine.start_worker()
        job_id = await engine.submit("gated-saver")
        assert await asyncio.to_thread(pipelines.SAVE_WAITING.wait, 20)
        await _cut(admin, database)
        pipelines.SAVE_GATE.set()
        await asyncio.sleep(3)  # the stage's save meets the outage, and waits
        cut_ended = time.monotonic()
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        done = await engine.wait(job_id, timeout=30)
    finally:
        pipelines.SAVE_GATE.set()
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
    assert done.job["status"] == "succeeded", done.job["error"]
    assert done.job["error"] is None
    stage = engine.stage(done, "save_when_told")
    assert stage["attempt"] == attempts
    async with engine.db.read() as conn:
        saved = (
            await conn.execute(select(artifacts.c.sha256).where(artifacts.c.job_id == job_id))
        ).scalar_one()
    assert stage["output"] == {"sha256": saved}
    assert time.monotonic() - cut_ended < 20
