"""PostgreSQL restarts under a running worker: nothing is lost, nothing finishes twice."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from jobgate.store.tables import events, jobs
from tests.conftest import require_exclusive
from tests.engine.conftest import Engine

pytestmark = [
    pytest.mark.service("postgres"),
    pytest.mark.timeout(180),
    pytest.mark.disruptive,
]
JOBS = 300


def _restart_postgres() -> None:
    require_exclusive()
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
        check=True,
        capture_output=True,
        timeout=60,
    )


async def _wait_until_answering(engine: Engine, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await engine.db.ping()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.fixture
def database_url(postgres_db_url: str) -> str:
    """PostgreSQL only: restarting it is the point."""
    return postgres_db_url


async def test_jobs_survive_a_postgres_restart_mid_run(engine: Engine) -> None:
    """Restart PostgreSQL while 300 jobs run: each ends once, succeeded, with one terminal event."""
    await engine.start_worker(concurrency=8)
    ids = [await engine.submit("steps", {"steps": 3, "step_ms": 20}) for _ in range(JOBS)]
    async with engine.db.read() as conn:
        done_before = await conn.scalar(
            select(func.count()).select_from(jobs).where(jobs.c.status == "succeeded")
        )
    assert done_before < JOBS  # the restart really lands mid-run
    await asyncio.to_thread(_restart_postgres)
    await _wait_until_answering(engine)
    deadline = time.monotonic() + 120
    while True:
        async with engine.db.read() as conn:
            statuses = dict(
                (
                    await conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status))
                ).all()
            )
        if statuses.get("succeeded", 0) + statuses.get("failed", 0) == JOBS:
            break
        assert time.monotonic() < deadline, statuses
        await asyncio.sleep(0.2)
    assert statuses == {"succeeded": JOBS}
    async with engine.db.read() as conn:
        terminal = dict(
            (
                await conn.execute(
                    select(events.c.job_id, func.count())
                    .where(events.c.type.in_(["completed", "error", "cancelled"]))
                    .group_by(events.c.job_id)
                )
            ).all()
        )
        gaps = await conn.scalar(
            select(func.count())
            .select_from(jobs)
            .where(
                jobs.c.last_seq
                != select(func.count())
                .select_from(events)
                .where(events.c.job_id == jobs.c.id)
                .scalar_subquery()
            )
        )
    assert set(terminal) == set(ids)
    assert set(terminal.values()) == {1}
    assert gaps == 0  # every job's event numbers run 1..last_seq with none missing
