"""Group commit for submits (`api/submit_group.py`) on the real PostgreSQL: concurrent
submits share statements, each stays whole, and one submit's refused row or a lost
server fails only what it must."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from jobgate.api.submit_group import SubmitGroup
from jobgate.ids import uuid7
from jobgate.pipelines import Registry
from jobgate.store.database import Database, is_outage
from jobgate.store.repositories import jobs as job_repo
from jobgate.store.tables import jobs, owner_clocks, tasks
from tests.api.conftest import state_of

pytestmark = pytest.mark.service("postgres")
NOOP = Registry.from_paths([]).get("noop")


def _new(owner: str = "alice", job_id: str | None = None) -> job_repo.NewJob:
    return job_repo.NewJob(
        id=job_id or uuid7(),
        pipeline=NOOP,
        owner=owner,
        params={},
        files=[],
        priority=0,
        budget_usd=1.0,
        estimated_usd=0.0,
    )


@pytest.fixture
def database_url(postgres_db_url: str) -> str:
    """PostgreSQL only: SQLite writes each submit in its own transaction (one writer at
    a time), not through the group."""
    return postgres_db_url


@pytest.fixture
def db(database: Database) -> Database:
    """The test's PostgreSQL store (`database`, on the URL above)."""
    return database


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The job ids of each `jobs.create` call (one insert statement each), in order."""
    calls: list[list[str]] = []
    create = job_repo.create

    async def counted(conn: Any, new_jobs: Sequence[job_repo.NewJob], **kw: Any) -> Any:
        calls.append([job.id for job in new_jobs])
        return await create(conn, new_jobs, **kw)

    monkeypatch.setattr(job_repo, "create", counted)
    return calls


async def _stored_ids(db: Database) -> set[str]:
    async with db.read() as conn:
        return set((await conn.execute(select(jobs.c.id))).scalars())


async def test_concurrent_submits_share_statements_and_each_gets_its_own_jobs(
    db: Database, statements: list[list[str]]
) -> None:
    group = SubmitGroup(db, aging_s=10.0, stride_s=1.0, writers=2)
    submits = [[_new(owner) for _ in range(n)] for owner, n in [("alice", 1), ("bob", 3)] * 20]
    answers = await asyncio.gather(*(group.create(s) for s in submits))
    for submitted, answer in zip(submits, answers, strict=True):
        assert [snap.job["id"] for snap in answer] == [job.id for job in submitted]
        assert all(snap.job["status"] == "queued" for snap in answer)
    assert await _stored_ids(db) == {job.id for s in submits for job in s}
    # Two writers take the first two submits; the other 38 wait and go in a few more.
    assert len(statements) <= 6
    # Each submit's jobs went in one statement, whole.
    by_statement = {job_id: n for n, ids in enumerate(statements) for job_id in ids}
    assert all(len({by_statement[job.id] for job in s}) == 1 for s in submits)
    # And the fair-share clocks moved once per job, as one statement per submit would.
    async with db.read() as conn:
        clocks = {row.owner: row.clock for row in await conn.execute(select(owner_clocks))}
        keys = (await conn.execute(select(jobs.c.owner, jobs.c.fair_key))).all()
    start = min(key for _, key in keys)
    assert clocks["alice"] - start == pytest.approx(20.0, abs=1.0)
    assert clocks["bob"] - start == pytest.approx(60.0, abs=1.0)
    for owner in ("alice", "bob"):
        owned = sorted(key for who, key in keys if who == owner)
        assert [b - a for a, b in itertools.pairwise(owned)] == pytest.approx(
            [1.0] * (len(owned) - 1)
        )


async def test_a_lone_submit_is_written_at_once(db: Database, statements: list[list[str]]) -> None:
    group = SubmitGroup(db, aging_s=10.0, stride_s=1.0)
    job = _new()
    (snapshot,) = await group.create([job])
    assert statements == [[job.id]]
    assert snapshot.job["id"] == job.id
    assert await _stored_ids(db) == {job.id}
    assert group.batches.idle


async def test_a_batch_holds_at_most_max_jobs_but_never_splits_a_submit(
    db: Database, statements: list[list[str]]
) -> None:
    group = SubmitGroup(db, aging_s=10.0, stride_s=1.0, writers=1, max_jobs=4)
    submits = [[_new() for _ in range(3)] for _ in range(6)] + [[_new() for _ in range(7)]]
    await asyncio.gather(*(group.create(s) for s in submits))
    assert sorted(len(ids) for ids in statements) == [3, 3, 3, 3, 3, 3, 7]
    assert await _stored_ids(db) == {job.id for s in submits for job in s}


async def test_a_large_submit_is_written_by_itself_at_once(
    db: Database, statements: list[list[str]]
) -> None:
    """A submit of `alone_from` jobs or more neither waits for a writer nor shares its
    statement; the small ones around it still go together."""
    group = SubmitGroup(db, aging_s=10.0, stride_s=1.0, writers=1, alone_from=5)
    small = [[_new()] for _ in range(4)]
    large = [_new() for _ in range(5)]
    await asyncio.gather(*(group.create(s) for s in [small[0], large, *small[1:]]))
    assert sorted(statements, key=len) == [[s[0].id for s in small], [j.id for j in large]]


async def test_a_refused_submit_fails_alone(db: Database, statements: list[list[str]]) -> None:
    """A submit whose row PostgreSQL refuses (here a job id that exists) takes its batch
    down; the batch's other submits are then written one by one, and only it fails."""
    group = SubmitGroup(db, aging_s=10.0, stride_s=1.0, writers=1)
    taken = _new()
    await group.create([taken])
    blocker = asyncio.create_task(group.create([_new()]))  # holds the one writer
    await asyncio.sleep(0)
    good = [[_new()], [_new(), _new()], [_new("bob")]]
    bad = [_new(), _new(job_id=taken.id)]
    results = await asyncio.gather(
        *(group.create(s) for s in [good[0], bad, *good[1:]]), return_exceptions=True
    )
    await blocker
    assert isinstance(results[1], IntegrityError)
    assert not is_outage(results[1])
    assert all(isinstance(r, list) for i, r in enumerate(results) if i != 1)
    stored = await _stored_ids(db)
    assert {job.id for s in good for job in s} <= stored
    assert bad[0].id not in stored
    # The shared statement, then each of its four submits alone.
    assert [len(ids) for ids in statements[2:]] == [6, 1, 2, 2, 1]
    async with db.read() as conn:
        orphans = await conn.scalar(
            select(func.count()).select_from(tasks).where(tasks.c.job_id == bad[0].id)
        )
    assert orphans == 0


async def test_an_unreachable_database_fails_every_waiting_submit_without_retrying(
    postgres_db_url: str,
) -> None:
    """Whether a statement whose connection broke committed is unknown: its submits fail
    with the outage (503 upstream) and are not written again one by one."""
    gone = make_url(postgres_db_url).set(port=1).render_as_string(hide_password=False)
    db = Database(gone)
    attempts = 0
    autocommit = db.autocommit

    def counted() -> Any:
        nonlocal attempts
        attempts += 1
        return autocommit()

    db.autocommit = counted  # type: ignore[method-assign]
    try:
        group = SubmitGroup(db, aging_s=10.0, stride_s=1.0, writers=1)
        results = await asyncio.gather(
            *(group.create([_new()]) for _ in range(5)), return_exceptions=True
        )
    finally:
        await db.aclose()
    assert all(isinstance(r, Exception) and is_outage(r) for r in results)
    assert attempts == 1  # one shared statement, not tried again one submit at a time


async def test_a_cancelled_caller_does_not_stop_the_others(
    db: Database, statements: list[list[str]]
) -> None:
    group = SubmitGroup(db, aging_s=10.0, stride_s=1.0, writers=1)
    first = [_new()]
    waiting = [[_new()] for _ in range(4)]
    running = asyncio.create_task(group.create(first))
    await asyncio.sleep(0)
    callers = [asyncio.create_task(group.create(s)) for s in waiting]
    await asyncio.sleep(0)
    callers[1].cancel()
    await running
    answers = await asyncio.gather(*callers, return_exceptions=True)
    assert isinstance(answers[1], asyncio.CancelledError)
    assert all(isinstance(a, list) for i, a in enumerate(answers) if i != 1)
    await group.aclose()
    # The cancelled caller's job was already in the statement: it is stored all the same.
    assert await _stored_ids(db) == {job.id for s in [first, *waiting] for job in s}


async def test_concurrent_http_submits_of_two_owners(
    app: FastAPI, make_client: Any, statements: list[list[str]]
) -> None:
    """Over HTTP: 60 concurrent submits of two owners are all accepted, each answer is
    that request's own job, each owner sees only its jobs, in fewer statements."""
    clients: dict[str, httpx.AsyncClient] = {o: await make_client(o) for o in ("ann", "ben")}

    async def submit(owner: str, n: int) -> tuple[str, int, str]:
        response = await clients[owner].post(
            "/v1/jobs", json={"pipeline": "noop", "params": {"n": n}}
        )
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["params"] == {"n": n}
        return owner, n, body["id"]

    made = await asyncio.gather(*(submit(("ann", "ben")[n % 2], n) for n in range(60)))
    assert len(statements) < 60
    for owner, client in clients.items():
        listed = (await client.get("/v1/jobs", params={"limit": 100})).json()["jobs"]
        mine = {job_id for who, _, job_id in made if who == owner}
        assert {job["id"] for job in listed} == mine
    async with state_of(app).db.read() as conn:
        assert await conn.scalar(select(func.count()).select_from(jobs)) == 60
