"""Group commit: outcomes ready together share a transaction; one's failure is contained."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.store import Database
from jobgate.store.repositories.tasks import LeaseLost
from jobgate.store.tables import outbox
from jobgate.worker.group_commit import GroupCommit, Regroup


def _token(queue: str) -> Any:
    async def write(conn: AsyncConnection) -> str:
        await conn.execute(insert(outbox).values(queue=queue, available_at=0.0))
        if conn.dialect.name == "postgresql":
            return str(await conn.scalar(text("SELECT pg_current_xact_id()")))
        return queue

    return write


def _lost() -> Any:
    async def write(conn: AsyncConnection) -> None:
        raise LeaseLost()

    return write


def _broken() -> Any:
    async def write(conn: AsyncConnection) -> None:
        await conn.execute(insert(outbox).values(queue="broken", available_at=0.0))
        raise RuntimeError("the outcome's own statement failed")

    return write


async def _queues(db: Database) -> list[str]:
    async with db.read() as conn:
        return sorted((await conn.execute(select(outbox.c.queue))).scalars())


async def test_outcomes_ready_together_commit_in_one_transaction(database: Database) -> None:
    group = GroupCommit(database, writers=1)
    results = await asyncio.gather(
        *(group.write(f"job-{n}", n, _token(f"q{n}")) for n in range(10))
    )
    assert await _queues(database) == sorted(f"q{n}" for n in range(10))
    if database.dialect == "postgresql":
        assert len(set(results)) == 1  # one transaction id for all ten
    # and a lone outcome later is written at once, on its own
    assert await asyncio.wait_for(group.write("job-x", 99, _token("alone")), 5)
    assert "alone" in await _queues(database)


async def test_a_lost_lease_leaves_the_rest_of_the_group_to_commit(database: Database) -> None:
    group = GroupCommit(database, writers=1)
    results = await asyncio.gather(
        group.write("job-a", 1, _token("a")),
        group.write("job-b", 2, _lost()),
        group.write("job-c", 3, _token("c")),
        return_exceptions=True,
    )
    assert isinstance(results[1], LeaseLost)
    assert not isinstance(results[0], BaseException)
    assert not isinstance(results[2], BaseException)
    assert await _queues(database) == ["a", "c"]


async def test_a_failing_outcome_rolls_its_group_back_and_each_is_told_to_regroup(
    database: Database,
) -> None:
    group = GroupCommit(database, writers=1)
    results = await asyncio.gather(
        group.write("job-a", 1, _token("a")),
        group.write("job-b", 2, _broken()),
        group.write("job-c", 3, _token("c")),
        return_exceptions=True,
    )
    assert all(isinstance(r, Regroup) for r in results), results
    assert await _queues(database) == []  # nothing of the group stored
    # the callers then write alone: the healthy ones commit
    assert await group.write("job-a", 1, _token("a"))
    assert await _queues(database) == ["a"]


@pytest.mark.service("postgres")
async def test_groups_are_written_in_job_and_task_order(postgres_db_url: str) -> None:
    """Rows are locked in (job, task) order, the order lease renewals use, whatever
    order the outcomes arrived in."""
    db = Database(postgres_db_url)
    seen: list[str] = []

    def record(name: str) -> Any:
        async def write(conn: AsyncConnection) -> None:
            seen.append(name)
            await conn.execute(select(func.now()))

        return write

    try:
        group = GroupCommit(db, writers=1)
        await asyncio.gather(
            group.write("job-b", 5, record("b5")),
            group.write("job-a", 9, record("a9")),
            group.write("job-b", 2, record("b2")),
            group.write("job-a", 1, record("a1")),
        )
    finally:
        await db.aclose()
    assert seen == ["a1", "a9", "b2", "b5"]


async def test_an_outcome_written_as_the_last_writer_ends_is_still_written(
    database: Database,
) -> None:
    """A caller whose outcome was just committed writes its next one at once: the writer
    that committed it is finishing then (its queue was empty), and must not count as
    one still writing, or the new outcome waits forever (a worker's slots then never
    free and its shutdown hangs)."""
    group = GroupCommit(database, writers=1)

    async def twice(n: int) -> None:
        await group.write(f"job-{n}", n, _token(f"first-{n}"))
        await group.write(f"job-{n}", n + 100, _token(f"second-{n}"))

    await asyncio.wait_for(asyncio.gather(*(twice(n) for n in range(3))), 10)
    assert await _queues(database) == sorted(
        [*(f"first-{n}" for n in range(3)), *(f"second-{n}" for n in range(3))]
    )
