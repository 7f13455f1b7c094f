"""SSE streams over a real socket: per job and per caller, fresh and resumed, heartbeats,
the per-job cap, stream tokens, lost wake-ups, and clients that go away."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import resource
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select

from jobgate.api import streams
from jobgate.blobs.signing import sign_token
from jobgate.ids import now
from jobgate.store import Database
from jobgate.store.repositories import events as event_repo
from jobgate.store.repositories import jobs as job_repo
from jobgate.store.tables import events as event_table
from jobgate.store.tables import jobs as job_table
from tests.api.conftest import AppFactory
from tests.api.helpers import state_of
from tests.api.sse import Sse, collect, read_events, serving, signed_in
from tests.conftest import POSTGRES_DSN
from tests.waiting import idle

SSE = {"Accept": "text/event-stream"}
TERMINAL = {"completed", "error", "cancelled"}
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")


async def _submit(client: httpx.AsyncClient, pipeline: str = "steps", **params: Any) -> str:
    response = await client.post("/v1/jobs", json={"pipeline": pipeline, "params": params})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def _stored(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    page = await client.get(
        f"/v1/jobs/{job_id}/events", params={"limit": 1000}, headers={"Accept": "application/json"}
    )
    events: list[dict[str, Any]] = page.json()["events"]
    return events


async def test_a_fresh_stream_sends_state_then_every_event_until_the_end(
    app_factory: AppFactory, make_key: Any
) -> None:
    """`state` (id = the latest seq) first, then each later event once, in order, and
    the stream ends after the terminal event: nothing the log holds is missing."""
    app = await app_factory(worker_concurrency=2)
    _, key = await make_key("user-1", ["user"])
    async with signed_in(app, key) as user:
        job_id = await _submit(user, steps=20, step_ms=20)
        got = await collect(user, f"/v1/jobs/{job_id}/events", headers=SSE)
        stored = await _stored(user, job_id)
    first = got[0]
    assert first.kind == "state"
    assert first.data["id"] == job_id
    assert first.id is not None
    rest = [e for e in got[1:] if e.kind != "heartbeat"]
    expected = [e for e in stored if e["seq"] > first.id]
    assert [(e.id, e.kind, e.data) for e in rest] == [
        (e["seq"], e["type"], e["data"]) for e in expected
    ]
    assert rest[-1].kind == "completed"
    assert any(e.kind == "progress" for e in rest)


async def test_a_finished_jobs_stream_is_its_state_and_the_end(
    app_factory: AppFactory, make_key: Any
) -> None:
    app = await app_factory()
    _, key = await make_key("user-1", ["user"])
    async with signed_in(app, key) as user:
        job_id = await _submit(user)
        assert (await user.post(f"/v1/jobs/{job_id}/cancel")).status_code in (200, 202)
        got = await collect(user, f"/v1/jobs/{job_id}/events", headers=SSE)
        stored = await _stored(user, job_id)
    assert [e.kind for e in got] == ["state"]
    assert got[0].id == stored[-1]["seq"]
    assert got[0].data["status"] == "cancelled"


async def test_resuming_sends_exactly_what_came_after(
    app_factory: AppFactory, make_key: Any
) -> None:
    """`Last-Event-ID` (header or query) resumes with no state, no gap, no duplicate;
    resuming after a finished job's end ends at once."""
    app = await app_factory(worker_concurrency=2)
    _, key = await make_key("user-1", ["user"])
    async with signed_in(app, key) as user:
        job_id = await _submit(user, steps=6, step_ms=30)
        head = await collect(user, f"/v1/jobs/{job_id}/events", headers=SSE, until=3)
        seen = max(e.id for e in head if e.id is not None)
        by_header = await collect(
            user, f"/v1/jobs/{job_id}/events", headers={**SSE, "Last-Event-ID": str(seen)}
        )
        by_query = await collect(
            user, f"/v1/jobs/{job_id}/events?last_event_id={seen}", headers=SSE
        )
        stored = await _stored(user, job_id)
        after_end = await collect(
            user,
            f"/v1/jobs/{job_id}/events",
            headers={**SSE, "Last-Event-ID": str(stored[-1]["seq"])},
        )
        bad = await user.get(f"/v1/jobs/{job_id}/events", headers={**SSE, "Last-Event-ID": "seven"})
    expected = [(e["seq"], e["type"]) for e in stored if e["seq"] > seen]
    for resumed in (by_header, by_query):
        assert [(e.id, e.kind) for e in resumed if e.kind != "heartbeat"] == expected
    assert expected[-1][1] == "completed"
    assert after_end == []
    assert bad.status_code == 422


async def test_resuming_as_another_process_ends_the_job_sends_its_last_events(
    app_factory: AppFactory, make_key: Any, database_url: str
) -> None:
    """A stream resumed after the job ended in another process, before this process
    heard of it, still sends the job's last events before it ends: the job being over
    is no reason to stop short of its terminal event."""
    app = await app_factory(sse_poll_s=60)  # no periodic check to cover for it
    _, key = await make_key("user-1", ["user"])
    elsewhere = Database(database_url)  # another process: no bus, no hub
    try:
        async with signed_in(app, key) as user:
            job_id = await _submit(user)  # no worker: it stays queued
            # An open stream keeps the job's shared log in this process, up to date.
            watching = asyncio.create_task(
                collect(user, f"/v1/jobs/{job_id}/events", headers=SSE, until=2)
            )
            async with asyncio.timeout(10):
                while state_of(app).streams.open_streams == 0:
                    await asyncio.sleep(0.01)
            seen = (await _stored(user, job_id))[-1]["seq"]
            async with elsewhere.write() as conn:
                assert await job_repo.cancel(conn, job_id, owner=None, at=now())
            async with asyncio.timeout(10):
                resumed = await collect(
                    user,
                    f"/v1/jobs/{job_id}/events",
                    headers={**SSE, "Last-Event-ID": str(seen)},
                )
            stored = await _stored(user, job_id)
            watching.cancel()
    finally:
        await elsewhere.aclose()
    assert [(e.id, e.kind) for e in resumed] == [
        (e["seq"], e["type"]) for e in stored if e["seq"] > seen
    ]
    assert resumed[-1].kind == "cancelled"


async def test_heartbeats_keep_an_idle_stream_alive(app_factory: AppFactory, make_key: Any) -> None:
    app = await app_factory(sse_heartbeat_s=0.2)
    _, key = await make_key("user-1", ["user"])
    async with signed_in(app, key) as user:
        job_id = await _submit(user)  # no worker: it stays queued
        got = await collect(user, f"/v1/jobs/{job_id}/events", headers=SSE, until=3)
    assert [e.kind for e in got] == ["state", "heartbeat", "heartbeat"]
    assert got[1].id is None
    assert got[1].data == {}


async def test_a_job_has_at_most_the_configured_streams(
    app_factory: AppFactory, make_key: Any, expect_problem: Any
) -> None:
    """The next stream past `JOBGATE_SSE_MAX_PER_JOB` is 429 too-many-streams; one that
    closes frees its place."""
    app = await app_factory(sse_max_per_job=2)
    _, key = await make_key("user-1", ["user"])
    async with signed_in(app, key) as user:
        job_id = await _submit(user)
        url = f"/v1/jobs/{job_id}/events"
        async with user.stream("GET", url, headers=SSE) as one:
            assert one.status_code == 200
            async with user.stream("GET", url, headers=SSE) as two:
                assert two.status_code == 200
                third = await user.get(url, headers=SSE)
                expect_problem(third, 429, "too-many-streams")
                other_job = await _submit(user)
                async with user.stream("GET", f"/v1/jobs/{other_job}/events", headers=SSE) as r:
                    assert r.status_code == 200
        await _until(lambda: state_of(app).streams.open_streams == 0)
        got = await collect(user, url, headers=SSE, until=1)
    assert got[0].kind == "state"


async def test_a_caller_has_at_most_the_configured_global_streams(
    app_factory: AppFactory, make_key: Any, expect_problem: Any
) -> None:
    """Past `JOBGATE_SSE_MAX_PER_USER` open `/v1/events` streams, the caller's next is 429
    too-many-streams with Retry-After (regression: no cap, 150 of one user's were held
    open); another caller is not held to it, and a stream that closes frees its place."""
    app = await app_factory(sse_max_per_user=2)
    _, key = await make_key("user-1", ["user"])
    _, other_key = await make_key("user-2", ["user"])
    async with signed_in(app, key) as user, signed_in(app, other_key) as other:
        async with user.stream("GET", "/v1/events", headers=SSE) as one:
            assert one.status_code == 200
            async with user.stream("GET", "/v1/events", headers=SSE) as two:
                assert two.status_code == 200
                third = await user.get("/v1/events", headers=SSE)
                expect_problem(third, 429, "too-many-streams")
                assert int(third.headers["retry-after"]) >= 1
                async with other.stream("GET", "/v1/events", headers=SSE) as theirs:
                    assert theirs.status_code == 200
        await _until(lambda: state_of(app).streams.open_streams == 0)
        async with user.stream("GET", "/v1/events", headers=SSE) as again:
            assert again.status_code == 200
        me = (await user.get("/v1/me")).json()
    assert me["limits"]["sse_max_per_user"] == 2


async def test_stream_tokens_open_one_jobs_stream_without_credentials(
    app_factory: AppFactory, make_key: Any, expect_problem: Any
) -> None:
    app = await app_factory(public_url="http://jobs.example")
    _, key = await make_key("user-1", ["user"])
    _, other_key = await make_key("user-2", ["user"])
    async with (
        signed_in(app, key) as user,
        httpx.AsyncClient(base_url=str(user.base_url), timeout=30) as browser,
    ):
        job_id = await _submit(user)
        other_job = await _submit(user)
        answer = await user.post(f"/v1/jobs/{job_id}/events/token")
        assert answer.status_code == 200
        body = answer.json()
        assert body["expires_in"] == state_of(app).settings.stream_token_ttl_s
        assert body["url"].startswith(f"http://jobs.example/v1/jobs/{job_id}/events?token=")
        path = body["url"].removeprefix("http://jobs.example")
        got = await collect(browser, path, headers=SSE, until=1)
        assert got[0].kind == "state"
        assert got[0].data["id"] == job_id
        token = path.partition("token=")[2]
        # Not for another job, not tampered with, not expired, not for another tenant.
        expect_problem(
            await browser.get(f"/v1/jobs/{other_job}/events?token={token}", headers=SSE),
            403,
            "forbidden",
        )
        expect_problem(await browser.get(path[:-2] + "xx", headers=SSE), 403, "forbidden")
        key_of = state_of(app).settings.signing_key
        expired = sign_token(key_of, "job-events", {"job": job_id}, int(now()) - 1)
        expect_problem(
            await browser.get(f"/v1/jobs/{job_id}/events?token={expired}", headers=SSE),
            403,
            "forbidden",
        )
        intruder = httpx.AsyncClient(
            base_url=user.base_url, headers={"Authorization": f"Bearer {other_key}"}, timeout=30
        )
        async with intruder:
            expect_problem(await intruder.post(f"/v1/jobs/{job_id}/events/token"), 404, "not-found")
        expect_problem(
            await browser.get(f"/v1/jobs/{job_id}/events", headers=SSE), 401, "unauthenticated"
        )


async def test_the_callers_stream_sees_only_its_jobs_with_increasing_global_ids(
    app_factory: AppFactory, make_key: Any
) -> None:
    """`/v1/events`: a user's events only (admins: all), each with `job_id` and `seq`,
    ids increasing; resuming from any id gives exactly the rest."""
    app = await app_factory(worker_concurrency=2)
    _, alice_key = await make_key("alice", ["user"])
    _, bob_key = await make_key("bob", ["user"])
    _, admin_key = await make_key("root", ["admin"])

    def client(key: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {key}", **SSE}, timeout=30
        )

    async with (
        serving(app) as base,
        client(alice_key) as alice,
        client(bob_key) as bob,
        client(admin_key) as admin,
    ):
        streams = [await _reading(c, count) for c, count in ((alice, 8), (admin, 16))]
        mine = [await _submit(alice, "noop") for _ in range(2)]
        theirs = [await _submit(bob, "noop") for _ in range(2)]
        alice_got, admin_got = await asyncio.gather(*streams)
        stored = {j: await _stored(admin, j) for j in mine + theirs}
        resumed = await _read_all(alice, 8 - 3, last=alice_got[2].id)
    assert {e.data["job_id"] for e in alice_got} == set(mine)
    assert {e.data["job_id"] for e in admin_got} == set(mine + theirs)
    for got in (alice_got, admin_got):
        ids = [e.id for e in got]
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)
        for job_id in {e.data["job_id"] for e in got}:
            per_job = [(e.data["seq"], e.kind) for e in got if e.data["job_id"] == job_id]
            assert per_job == [(e["seq"], e["type"]) for e in stored[job_id]]
    assert [e.id for e in resumed] == [e.id for e in alice_got[3:]]


async def _read_all(
    client: httpx.AsyncClient,
    count: int,
    last: int | None = None,
    kind: str | None = None,
    opened: asyncio.Event | None = None,
) -> list[Sse]:
    """The first `count` events (of type `kind`, when given) of `/v1/events`."""
    headers = {"Last-Event-ID": str(last)} if last is not None else {}
    got: list[Sse] = []
    async with asyncio.timeout(30), client.stream("GET", "/v1/events", headers=headers) as r:
        assert r.status_code == 200
        if opened is not None:
            opened.set()
        async for event in read_events(r):
            if event.kind != "heartbeat" and kind in (None, event.kind):
                got.append(event)
            if len(got) >= count:
                break
    return got


async def _reading(client: httpx.AsyncClient, count: int, **kwargs: Any) -> asyncio.Task[list[Sse]]:
    """`_read_all` in a task, once its stream is open: a fresh stream's start is fixed
    before its headers come, so it gets every event that follows."""
    opened = asyncio.Event()
    reader = asyncio.create_task(_read_all(client, count, opened=opened, **kwargs))
    async with asyncio.timeout(10):
        while not opened.is_set():
            if reader.done():
                reader.result()
            await asyncio.sleep(0.01)
    return reader


async def test_a_lost_wake_up_only_delays_an_event(app_factory: AppFactory, make_key: Any) -> None:
    """With the bus saying nothing at all, streams still get every event, from the
    hub's periodic look at the store."""
    app = await app_factory(sse_poll_s=0.2)
    state_of(app).db.on_changes = None  # every notification is lost
    _, key = await make_key("user-1", ["user"])
    async with signed_in(app, key) as user:
        job_id = await _submit(user)
        reader = asyncio.create_task(collect(user, f"/v1/jobs/{job_id}/events", headers=SSE))
        await asyncio.sleep(0.3)
        assert (await user.post(f"/v1/jobs/{job_id}/cancel")).status_code in (200, 202)
        got = await reader
    assert got[0].kind == "state"
    assert got[-1].kind == "cancelled"


@pytest.mark.service("postgres")
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_global_stream_waits_for_a_slower_writer_of_a_smaller_id(
    app_factory: AppFactory, make_key: Any
) -> None:
    """Global ids commit out of order on PostgreSQL: an event with a larger id that
    commits first is held back until the smaller one commits, then both arrive in id
    order. Resuming from the larger id would otherwise skip the smaller one. (On SQLite
    writers take turns: ids commit in order.)"""
    app = await app_factory()
    db = state_of(app).db
    _, key = await make_key("root", ["admin"])
    async with signed_in(app, key, SSE) as admin:
        slow_job = await _submit(admin, "noop")
        fast_job = await _submit(admin, "noop")
        reader = await _reading(admin, 2, kind="message")
        async with db.write() as slow:
            await event_repo.append(slow, slow_job, [("message", {"text": "slow"})], at=now())
            async with db.write() as fast:
                await event_repo.append(fast, fast_job, [("message", {"text": "fast"})], at=now())
            await asyncio.sleep(0.5)
            assert not reader.done(), "the larger id was sent before the smaller committed"
        got = await reader
    assert [e.data["text"] for e in got] == ["slow", "fast"]
    assert got[0].id is not None
    assert got[1].id is not None
    assert got[0].id < got[1].id


@pytest.mark.service("postgres")
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_fresh_global_stream_opened_while_a_writer_is_in_flight_starts_now(
    app_factory: AppFactory, make_key: Any
) -> None:
    """A new client of `/v1/events` gets what happens from now on, even when a write is
    in flight as it connects (regression: the stream began at the last id known safe,
    0 in a new process, and sent the whole history first)."""
    app = await app_factory()
    db = state_of(app).db
    _, key = await make_key("root", ["admin"])
    async with signed_in(app, key, SSE) as admin:
        job_id = await _submit(admin, "noop")
        for i in range(5):
            async with db.write() as conn:
                await event_repo.append(conn, job_id, [("message", {"text": f"old {i}"})], at=now())
        async with db.write() as slow:
            await event_repo.append(slow, job_id, [("message", {"text": "in flight"})], at=now())
            reader = asyncio.create_task(_read_all(admin, 1, kind="message"))
            await asyncio.sleep(0.3)  # the stream is connecting meanwhile
        await asyncio.sleep(0.2)
        async with db.write() as conn:
            await event_repo.append(conn, job_id, [("message", {"text": "new"})], at=now())
        async with asyncio.timeout(5):
            got = await reader
    assert [e.data["text"] for e in got] == ["new"]


@pytest.mark.service("postgres")
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_writer_in_another_database_does_not_hold_global_streams_back(
    app_factory: AppFactory, make_key: Any
) -> None:
    """Only this database's writers can hold an event id: a transaction with an id open
    in another database of the same server (another app, or another test process) does
    not delay `/v1/events`."""
    app = await app_factory()
    _, key = await make_key("root", ["admin"])
    other = await asyncpg.connect(POSTGRES_DSN)  # the server's `test` database
    try:
        async with signed_in(app, key, SSE) as admin, other.transaction():
            assert await other.fetchval("SELECT pg_current_xact_id()") is not None
            job_id = await _submit(admin, "noop")
            reader = await _reading(admin, 1, kind="message")
            async with state_of(app).db.write() as conn:
                await event_repo.append(conn, job_id, [("message", {"text": "hi"})], at=now())
            async with asyncio.timeout(3):
                got = await reader
    finally:
        await other.close()
    assert [e.data["text"] for e in got] == ["hi"]


@pytest.mark.service("postgres")
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_global_stream_under_a_burst_gets_every_event_once_in_id_order(
    app_factory: AppFactory, make_key: Any
) -> None:
    """200 jobs submitted 20 at a time and run by 8 slots while `/v1/events` reads:
    writers are in flight at most reads, so the stream goes back and forth between
    one-statement pages and the safe id. It gets every stored event of those jobs
    exactly once, in increasing id order."""
    app = await app_factory(worker_concurrency=8)
    db = state_of(app).db
    _, key = await make_key("root", ["admin"])
    got: list[Sse] = []
    ended: set[str] = set()
    submitted: set[str] = set()
    all_in = asyncio.Event()

    async with signed_in(app, key, SSE) as admin:

        async def read() -> None:
            async with admin.stream("GET", "/v1/events") as response:
                async for event in read_events(response):
                    if event.kind == "heartbeat":
                        continue
                    got.append(event)
                    if event.kind in TERMINAL:
                        ended.add(event.data["job_id"])
                    if all_in.is_set() and ended >= submitted:
                        return

        hub = state_of(app).streams
        safe_reads = 0
        safe_event_id = hub.safe_event_id

        async def counted() -> int | None:
            nonlocal safe_reads
            safe_reads += 1
            return await safe_event_id()

        hub.safe_event_id = counted  # type: ignore[method-assign]
        handed_over = 0
        reported = hub.reported

        def counted_rows(rows: list[dict[str, Any]]) -> None:
            nonlocal handed_over
            handed_over += len(rows)
            reported(rows)

        db.on_rows = counted_rows
        reader = asyncio.create_task(read())
        await asyncio.sleep(0.3)
        for _ in range(10):
            batch = await asyncio.gather(*(_submit(admin, "noop") for _ in range(20)))
            submitted.update(batch)
        all_in.set()
        async with asyncio.timeout(60):
            while await _unfinished(db, submitted):
                await asyncio.sleep(0.05)
        with contextlib.suppress(TimeoutError):  # a skipped event shows in the sets below
            async with asyncio.timeout(5):
                await reader
        reader.cancel()
    async with db.read() as conn:
        stored = {
            (row.id, row.job_id, row.seq, row.type, json.dumps(row.data, sort_keys=True))
            for row in await conn.execute(
                select(
                    event_table.c.id,
                    event_table.c.job_id,
                    event_table.c.seq,
                    event_table.c.type,
                    event_table.c.data,
                ).where(event_table.c.job_id.in_(submitted))
            )
        }
    ids = [e.id for e in got]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    mine = {
        (e.id, e.data["job_id"], e.data["seq"], e.kind, _stored_data(e.data))
        for e in got
        if e.data["job_id"] in submitted
    }
    assert len(stored) >= 200 * 3
    assert mine == stored
    assert handed_over, "no write handed its events over: the burst tested reads only"
    assert safe_reads, "no read fell back to the safe id: the burst tested one path only"


def _stored_data(data: dict[str, Any]) -> str:
    """An event's data as stored: what the stream sends, less the `job_id` and `seq` it
    adds."""
    return json.dumps({k: v for k, v in data.items() if k not in ("job_id", "seq")}, sort_keys=True)


async def _unfinished(db: Database, job_ids: set[str]) -> int:
    async with db.read() as conn:
        count = await conn.scalar(
            select(func.count())
            .select_from(job_table)
            .where(job_table.c.id.in_(job_ids), job_table.c.status.not_in(TERMINAL_STATUSES))
        )
    return int(count or 0)


@pytest.mark.service("postgres")
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_global_stream_reads_back_what_it_was_not_handed(
    app_factory: AppFactory, make_key: Any, database_url: str
) -> None:
    """Events a write of this process hands the hub go out as they are only when no id
    is missing before them. An event another process wrote first, which this one was
    not told of, is read from the store and sent first, in id order."""
    app = await app_factory(sse_poll_s=60)  # no periodic check to cover for a skip
    db = state_of(app).db
    _, key = await make_key("root", ["admin"])
    elsewhere = Database(database_url)  # another process: no bus, no hub
    try:
        async with signed_in(app, key, SSE) as admin:
            job_id = await _submit(admin, "noop")
            reader = await _reading(admin, 2, kind="message")
            async with elsewhere.write() as conn:
                await event_repo.append(conn, job_id, [("message", {"text": "there"})], at=now())
            async with db.write() as conn:
                seq = await event_repo.append(
                    conn, job_id, [("message", {"text": "here"})], at=now()
                )
                event_id = await conn.scalar(select(func.max(event_table.c.id)))
                row = {"id": event_id, "job_id": job_id, "seq": seq, "type": "message"}
                event_repo.note_rows(conn, [{**row, "data": {"text": "here"}, "owner": "root"}])
            async with asyncio.timeout(3):
                got = await reader
    finally:
        await elsewhere.aclose()
    assert [e.data["text"] for e in got] == ["there", "here"]
    assert got[0].id is not None
    assert got[0].id + 1 == got[1].id


@pytest.mark.service("postgres")
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_an_idle_servers_global_stream_sends_a_jobs_whole_life_without_a_read(
    app_factory: AppFactory, make_key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an idle `serve`, a submit starts its job in its own statement (the 202 says
    running), and every write on the way to `completed` hands its events to the hub: the
    global stream sends them all, as stored, without reading the store once."""
    app = await app_factory(worker_concurrency=2, sse_poll_s=60)
    db = state_of(app).db
    _, key = await make_key("root", ["admin"])
    reads: list[str] = []
    for name in ("_whole_page", "_global_page"):
        read = getattr(streams, name)

        async def counted(*args: Any, _read: Any = read, _name: str = name, **kwargs: Any) -> Any:
            reads.append(_name)
            return await _read(*args, **kwargs)

        monkeypatch.setattr(streams, name, counted)

    opened = asyncio.Event()

    async def until_completed(client: httpx.AsyncClient) -> list[Sse]:
        got: list[Sse] = []
        async with asyncio.timeout(10), client.stream("GET", "/v1/events") as response:
            opened.set()
            async for event in read_events(response):
                if event.kind != "heartbeat":
                    got.append(event)
                if event.kind == "completed":
                    return got
        raise AssertionError("the stream ended before `completed`")

    async with signed_in(app, key, SSE) as admin:
        for _ in range(3):
            opened.clear()
            reads.clear()
            reader = asyncio.create_task(until_completed(admin))
            async with asyncio.timeout(10):  # the stream is open and has read the store once
                while not (opened.is_set() and reads):
                    await asyncio.sleep(0.01)
            await idle(state_of(app).submits.lender)  # type: ignore[arg-type]
            reads.clear()  # what opening the stream read
            response = await admin.post("/v1/jobs", json={"pipeline": "noop", "params": {}})
            assert response.status_code == 202, response.text
            job = response.json()
            assert job["status"] == "running", "the submit did not start its job"
            sent = await reader
            assert reads == [], f"the stream read the store: {reads}"
            stored = await _stored_events(db, job["id"])
            assert [(e.id, e.kind, _stored_data(e.data)) for e in sent] == [
                (row["id"], row["type"], json.dumps(row["data"], sort_keys=True)) for row in stored
            ]


async def test_events_that_come_together_go_out_in_one_write(
    app_factory: AppFactory, make_key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's end is two events committed together (its stage's `stage_update`, then
    `completed`): a global stream sends them in one write to the socket, not one each."""
    app = await app_factory(worker_concurrency=2, sse_poll_s=60)
    _, key = await make_key("root", ["admin"])
    writes: list[bytes] = []
    respond = streams.EventStreamResponse.__call__

    async def recording(self: Any, scope: Any, receive: Any, send: Any) -> None:
        async def recorded(message: Any) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                writes.append(message["body"])
            await send(message)

        await respond(self, scope, receive, recorded)

    monkeypatch.setattr(streams.EventStreamResponse, "__call__", recording)
    opened = asyncio.Event()

    async def until_completed(client: httpx.AsyncClient) -> None:
        async with asyncio.timeout(10), client.stream("GET", "/v1/events") as response:
            opened.set()
            async for event in read_events(response):
                if event.kind == "completed":
                    return
        raise AssertionError("the stream ended before `completed`")

    async with signed_in(app, key, SSE) as admin:
        reader = asyncio.create_task(until_completed(admin))
        await asyncio.wait_for(opened.wait(), 10)
        response = await admin.post("/v1/jobs", json={"pipeline": "noop", "params": {}})
        assert response.status_code == 202, response.text
        await reader
    ends = [w for w in writes if b"event: completed\n" in w]
    assert len(ends) == 1, writes
    assert ends[0].count(b"\n\n") == 2, ends[0]
    assert ends[0].index(b"event: stage_update\n") < ends[0].index(b"event: completed\n")
    assert b'"status":"succeeded"' in ends[0]


async def _stored_events(db: Database, job_id: str) -> list[dict[str, Any]]:
    async with db.read() as conn:
        rows = await conn.execute(
            select(event_table).where(event_table.c.job_id == job_id).order_by(event_table.c.id)
        )
        return [dict(row) for row in rows.mappings()]


class _RolledBack(Exception):
    pass


@pytest.mark.service("postgres")
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_global_stream_gets_past_an_id_a_rolled_back_write_used(
    app_factory: AppFactory, make_key: Any
) -> None:
    """An event id taken by a write that rolled back never becomes a row: the stream
    must not wait for it. Events before and after it arrive, in order, and the stream
    reads whole pages in one statement again afterwards."""
    app = await app_factory()
    state = state_of(app)
    _, key = await make_key("root", ["admin"])
    async with signed_in(app, key, SSE) as admin:
        job_id = await _submit(admin, "noop")
        reader = await _reading(admin, 3, kind="message")
        async with state.db.write() as conn:
            await event_repo.append(conn, job_id, [("message", {"text": "before"})], at=now())
        with contextlib.suppress(_RolledBack):
            async with state.db.write() as conn:
                await event_repo.append(conn, job_id, [("message", {"text": "lost"})], at=now())
                raise _RolledBack
        for text in ("after", "later"):
            async with state.db.write() as conn:
                await event_repo.append(conn, job_id, [("message", {"text": text})], at=now())
        async with asyncio.timeout(3):
            got = await reader
        # Past the gap, a stream's read is one statement again.
        reader = await _reading(admin, 1, kind="message")
        async with state.db.write() as conn:
            await event_repo.append(conn, job_id, [("message", {"text": "again"})], at=now())
        async with asyncio.timeout(3):
            again = await reader
    assert [e.data["text"] for e in got] == ["before", "after", "later"]
    ids = [e.id for e in got if e.id is not None]
    assert len(ids) == 3
    assert ids[1] > ids[0] + 1, "the rolled-back write took no id: the test proves nothing"
    assert [e.data["text"] for e in again] == ["again"]
    assert state.streams.whole_pages


@pytest.mark.service("postgres")
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_callers_stream_reads_past_pages_of_other_owners_events(
    app_factory: AppFactory, make_key: Any
) -> None:
    """More than a page of someone else's events between two of the caller's: the
    caller's stream skips them all and sends its own, and nothing else, at once (the
    periodic check, which would hide a stream that stops at a page, is off)."""
    app = await app_factory(sse_poll_s=60)
    state = state_of(app)
    _, alice_key = await make_key("alice", ["user"])
    _, bob_key = await make_key("bob", ["user"])
    async with signed_in(app, alice_key, SSE) as alice, signed_in(app, bob_key, SSE) as bob:
        mine = await _submit(alice, "noop")
        theirs = await _submit(bob, "noop")
        reader = await _reading(alice, 2, kind="message")
        for text, job_id, count in (("first", mine, 1), ("noise", theirs, 1200), ("last", mine, 1)):
            async with state.db.write() as conn:
                items = [("message", {"text": text})] * count
                await event_repo.append(conn, job_id, items, at=now())
        async with asyncio.timeout(3):
            got = await reader
    assert [(e.data["text"], e.data["job_id"]) for e in got] == [("first", mine), ("last", mine)]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the hub's, not the store's
async def test_clients_that_go_away_leave_nothing_behind(
    app_factory: AppFactory, make_key: Any
) -> None:
    """1,000 streams opened and dropped: no watch left in the hub, no task left running,
    and memory does not grow with them."""
    app = await app_factory(sse_max_per_job=50)  # 8 clients at once, and closing lags
    hub = state_of(app).streams
    _, key = await make_key("user-1", ["user"])
    async with signed_in(app, key) as user:
        job_id = await _submit(user)
        await _cycles(user, job_id, 100)  # warm-up: caches, pools, allocator arenas
        await _until(lambda: hub.open_streams == 0)
        gc.collect()
        tasks_before = len(asyncio.all_tasks())
        rss_before = _rss_kib()
        await _cycles(user, job_id, 1000)
        await _until(lambda: hub.open_streams == 0)
        await _until(lambda: len(asyncio.all_tasks()) <= tasks_before)
        gc.collect()
        grown_kib = _rss_kib() - rss_before
    assert grown_kib < 20 * 1024, f"RSS grew {grown_kib} KiB over 1,000 streams"


async def _cycles(user: httpx.AsyncClient, job_id: str, n: int, clients: int = 8) -> None:
    """`n` streams opened and dropped, by `clients` clients at once."""

    async def one_client(count: int) -> None:
        for _ in range(count):
            url = f"/v1/jobs/{job_id}/events"
            async with user.stream("GET", url, headers=SSE) as response:
                assert response.status_code == 200
                async for _event in read_events(response):
                    break  # the state arrived: drop the connection

    await asyncio.gather(*(one_client(n // clients) for _ in range(clients)))


async def _until(condition: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def test_too_many_streams_carries_retry_after(
    app_factory: AppFactory, make_key: Any, expect_problem: Any
) -> None:
    """The 429 `too-many-streams` carries `Retry-After` (seconds), like every 429."""
    app = await app_factory(sse_max_per_job=1)
    _, key = await make_key("user-1", ["user"])
    async with signed_in(app, key) as user:
        job_id = await _submit(user)
        url = f"/v1/jobs/{job_id}/events"
        async with user.stream("GET", url, headers=SSE) as one:
            assert one.status_code == 200
            second = await user.get(url, headers=SSE)
            expect_problem(second, 429, "too-many-streams")
            assert int(second.headers["retry-after"]) >= 1


@pytest.mark.parametrize("value", ["\u00b2", "\u00b3", "\uff11", "1\u00b2", str(2**63)], ids=repr)
async def test_a_last_event_id_that_is_not_a_stored_id_is_422(
    app_factory: AppFactory, make_key: Any, expect_problem: Any, value: str
) -> None:
    """`Last-Event-ID` that `str.isdigit` takes but is not ASCII digits ("²", a fullwidth
    "1"), or too large for the store, is 422 `validation-error`, as header or query, on
    both streams; a job's stream takes at most 2**31 - 1 (its `seq` is 32-bit)."""
    app = await app_factory()
    _, key = await make_key("user-1", ["user"])
    async with signed_in(app, key) as user:
        job_id = await _submit(user, "noop")
        too_big = {b"Last-Event-ID": str(2**31).encode()}
        response = await user.get(f"/v1/jobs/{job_id}/events", headers={**SSE, **too_big})
        expect_problem(response, 422, "validation-error")
        for path in (f"/v1/jobs/{job_id}/events", "/v1/events"):
            by_query = await user.get(path, params={"last_event_id": value}, headers=SSE)
            expect_problem(by_query, 422, "validation-error")
            header = {b"Last-Event-ID": value.encode("utf-8")}
            by_header = await user.get(path, headers={**SSE, **header})
            expect_problem(by_header, 422, "validation-error")


async def test_a_stream_resumed_past_the_jobs_last_event_ends_with_the_job(
    app_factory: AppFactory, make_key: Any
) -> None:
    """A `Last-Event-ID` past the job's last event names none: the stream follows from
    the job's real last event, sends what comes, and ends with the job (regression: it
    skipped every event, never ended, and held one of the job's stream slots)."""
    app = await app_factory(worker_concurrency=1)
    _, key = await make_key("user-1", ["user"])
    async with signed_in(app, key) as user:
        job_id = await _submit(user, steps=3, step_ms=300)
        got = await collect(
            user, f"/v1/jobs/{job_id}/events", headers={**SSE, "Last-Event-ID": "1000"}, timeout=15
        )
        stored = await _stored(user, job_id)
    sent = [(e.id, e.kind) for e in got if e.kind != "heartbeat"]
    assert sent[-1][1] == "completed"
    assert sent == [(e["seq"], e["type"]) for e in stored if e["seq"] > sent[0][0] - 1]


async def test_a_global_stream_resumed_past_every_event_sends_what_comes_next(
    app_factory: AppFactory, make_key: Any
) -> None:
    """A `Last-Event-ID` past every event, up to the largest the route takes (2**63 - 1),
    is a stream from now (regression on PostgreSQL: 200, then the connection torn by a
    BIGINT overflow in the page's bound; below the edge, a stream silent for ever)."""
    app = await app_factory(worker_concurrency=1)
    _, key = await make_key("user-1", ["user"])
    async with signed_in(app, key) as user:
        for last_id in (2**63 - 1, 2**62):
            headers = {**SSE, "Last-Event-ID": str(last_id)}
            got: list[Sse] = []
            async with user.stream("GET", "/v1/events", headers=headers) as response:
                assert response.status_code == 200  # its place is taken before the headers
                job_id = await _submit(user, "noop")
                async with asyncio.timeout(15):
                    async for event in read_events(response):
                        got.append(event)
                        if event.kind == "completed" and event.data["job_id"] == job_id:
                            break
            stored = await _stored(user, job_id)
            mine = [(e.data["seq"], e.kind) for e in got if e.data.get("job_id") == job_id]
            assert mine == [(e["seq"], e["type"]) for e in stored]


async def test_a_fresh_job_stream_waits_out_a_store_outage_on_its_first_read(
    app_factory: AppFactory, make_key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `state` read of a fresh stream, after the headers went out, meets a store out
    of reach (here: a pool with no connection free in time): the stream waits it out
    and goes on (regression: 200, then the connection torn with an error log)."""
    app = await app_factory()
    _, key = await make_key("user-1", ["user"])
    real_get = job_repo.get
    failures = []

    async def get_once_out(conn: Any, job_id: str, **kwargs: Any) -> Any:
        if "owner" not in kwargs and not failures:  # the stream's own read, not the route's
            failures.append(job_id)
            raise sa_exc.TimeoutError("QueuePool limit reached (as if)")
        return await real_get(conn, job_id, **kwargs)

    monkeypatch.setattr(streams, "_OUTAGE_RETRY_S", 0.2)
    async with signed_in(app, key) as user:
        job_id = await _submit(user, "noop")
        monkeypatch.setattr(streams.job_repo, "get", get_once_out)
        got = await collect(user, f"/v1/jobs/{job_id}/events", headers=SSE, until=1, timeout=10)
    assert failures == [job_id]
    assert [e.kind for e in got] == ["state"]
    assert got[0].data["id"] == job_id
