"""Live event streams (SSE): the hub that wakes them, and the streams themselves.

A stream reads events from the store, by `seq` for one job (`GET /v1/jobs/{id}/events`)
or by the global `events.id` for all of a caller's jobs (`GET /v1/events`). The event
bus only wakes it; whatever the bus misses (a restart, a process that died between its
commit and its publish) the hub's periodic check catches, so a stream never skips an
event, only, at worst, delays one by `JOBGATE_SSE_POLL_S`.

Why a per-job stream cannot skip: a job's `seq` numbers are handed out by an update of
the job's row, so they commit in order. Global ids come from a sequence and commit out
of order; `Hub.safe_event_id` is the highest id below which no transaction can still
add an event, and a stream never reads past it (docs/events.md, "Ordering").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any

import structlog
from sqlalchemy import Select, bindparam, func, select
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from jobgate.api import views
from jobgate.bus import Changes, EventBus
from jobgate.errors import TooManyStreams
from jobgate.store import Database, pg
from jobgate.store.database import is_outage
from jobgate.store.repositories import events as event_repo
from jobgate.store.repositories import jobs as job_repo
from jobgate.store.tables import events, jobs
from jobgate.waits import wait_at_most

log = structlog.get_logger("jobgate.streams")

TERMINAL_EVENTS = frozenset({"completed", "error", "cancelled"})
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
PAGE = 500  # events read from the store at a time
_CACHED_ROWS = 1000  # the newest events of a watched job its streams share
_SWEEP_CHUNK = 1000  # job ids per query of the periodic check
_SAFE_RETRY_S = 0.01  # how soon global streams look again while a writer is in flight
# How long a fresh global stream waits, at most, for writers in flight to end.
_START_WAIT_S = 1.0
_OUTAGE_RETRY_S = 1.0  # how soon a stream tries the store again after it failed
_REPORTED_ROWS = 4096  # the newest events this process's writers handed the hub
STREAM_RETRY_AFTER_S = 5
"""`Retry-After` of a 429 `too-many-streams`: a place frees when a stream closes, which
nobody can foretell; a few seconds keeps reconnecting clients from hammering."""
# The newest event id taken, then the transactions of this database that hold a
# transaction id (writers), running now: only these can hold an event id, and other
# databases' transactions on the same server do not delay streams (the cluster-wide
# snapshot `xmin` would wait for them too). One round trip, in that order: the writers'
# subquery refers to the id, so it runs after the id was read, and the activity table
# is read once per statement, at its first use.
_LAST_ID_THEN_WRITERS = (
    "WITH taken AS MATERIALIZED (SELECT coalesce(pg_sequence_last_value("
    "pg_get_serial_sequence('events', 'id')::regclass), 0) AS id) "
    "SELECT taken.id, (SELECT coalesce(array_agg(backend_xid::text), '{}') "
    "FROM pg_stat_activity WHERE datname = current_database() "
    "AND backend_xid IS NOT NULL AND taken.id IS NOT NULL) FROM taken"
)
_WRITERS = (
    "SELECT coalesce(array_agg(backend_xid::text), '{}') FROM pg_stat_activity "
    "WHERE datname = current_database() AND backend_xid IS NOT NULL"
)
# A global stream's page and the proof that it is whole, in one round trip: the
# sequence's value `v` (capped at a page past `$1`), how many events exist in
# ($1, v], and the caller's events among them. When every id in ($1, v] is a visible
# row, no transaction can still commit an event with a smaller id, so the page is safe
# to send whatever `safe_event_id` would say. The count and the page share one
# snapshot. A missing id (a writer in flight, or an id a rolled-back write used) makes
# the caller fall back to `safe_event_id` and `_global_page`.
_WHOLE_PAGE = """
WITH v AS MATERIALIZED (
    SELECT least(coalesce(pg_sequence_last_value(pg_get_serial_sequence('events', 'id')
        ::regclass), 0), $1::BIGINT + {page}) AS v
), n AS MATERIALIZED (
    SELECT count(*) AS n FROM events, v WHERE events.id > $1::BIGINT AND events.id <= v.v
)
SELECT v.v AS bound, n.n = v.v - $1::BIGINT AS whole, p.id, p.job_id, p.seq, p.type, p.data
FROM v CROSS JOIN n LEFT JOIN LATERAL (
    SELECT events.id, events.job_id, events.seq, events.type, events.data
    FROM events {owned}
    WHERE n.n = v.v - $1::BIGINT AND events.id > $1::BIGINT AND events.id <= v.v
    ORDER BY events.id LIMIT {page}
) p ON true
ORDER BY p.id
"""
_WHOLE_PAGES = {
    owned: _WHOLE_PAGE.format(
        page=PAGE,
        owned="JOIN jobs ON jobs.id = events.job_id AND jobs.owner = $2::TEXT" if owned else "",
    )
    for owned in (False, True)
}
HEARTBEAT = b"event: heartbeat\ndata: {}\n\n"
STREAM_HEADERS = {
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx: do not buffer
}


class Watch:
    """One open stream's place in the hub: woken when its job (any job, for a global
    stream) may have events past `seen`. A global stream woken only by events the hub
    was handed (`Hub.reported`) has `needs_read` false: it may send them as they are."""

    __slots__ = ("closed", "holder", "job_id", "needs_read", "seen", "wake")

    def __init__(self, job_id: str | None, seen: int = 0, holder: str | None = None) -> None:
        self.job_id = job_id
        self.holder = holder
        self.seen = seen
        self.wake = asyncio.Event()
        self.closed = False
        self.needs_read = True

    def close(self) -> None:
        """The client went away: end the stream at its next step."""
        self.closed = True
        self.wake.set()


class JobLog:
    """The streams of one job in this process, and the tail of its log they share.

    Every stream of a job wants the same new events at the same moment; one of them
    reads the store and the others take the rows from here. Events never change once
    committed and a job's `seq` numbers commit in order, so rows read once stay true,
    and `rows` is always a run of consecutive numbers.
    """

    __slots__ = ("fetching", "latest", "rows", "stale", "watches")

    def __init__(self) -> None:
        self.watches: set[Watch] = set()
        self.latest = 0  # the highest seq known to exist (from the bus or the check)
        self.stale = True  # the bus reconnected: `latest` may be behind
        self.rows: list[dict[str, Any]] = []
        self.fetching: asyncio.Future[None] | None = None

    def after(self, seq: int) -> list[dict[str, Any]] | None:
        """The cached rows after `seq` up to `latest`, or None if the cache cannot say."""
        if self.stale:
            return None
        if seq >= self.latest:
            return []
        if not self.rows or self.rows[0]["seq"] > seq + 1 or self.rows[-1]["seq"] < self.latest:
            return None
        return self.rows[seq + 1 - self.rows[0]["seq"] :]

    def keep(self, rows: list[dict[str, Any]], *, complete: bool) -> None:
        """Add rows read from the store; `complete`: nothing after them existed then."""
        if rows:
            if self.rows and rows[0]["seq"] == self.rows[-1]["seq"] + 1:
                self.rows.extend(rows)
            elif not self.rows or not (
                self.rows[0]["seq"] <= rows[0]["seq"] <= self.rows[-1]["seq"]
            ):
                self.rows = list(rows)
            else:  # overlaps what is cached: keep the cached run, then what follows
                self.rows.extend(r for r in rows if r["seq"] > self.rows[-1]["seq"])
            del self.rows[:-_CACHED_ROWS]
            self.latest = max(self.latest, rows[-1]["seq"])
        if complete:
            self.stale = False


class Hub:
    """This process's open streams, woken by the bus and by a periodic check.

    Args:
        db: the store.
        bus: the event bus; the hub subscribes to it (before the bus starts).
        poll_s: how often open streams are checked against the store regardless.
        max_per_job: open streams one job may have in this process.
    """

    def __init__(
        self,
        db: Database,
        bus: EventBus,
        *,
        poll_s: float,
        max_per_job: int,
        max_global_per_holder: int = 20,
    ) -> None:
        self.db = db
        self.bus = bus
        self.poll_s = poll_s
        self.max_per_job = max_per_job
        self.max_global_per_holder = max_global_per_holder
        self._jobs: dict[str, JobLog] = {}
        self._all: set[Watch] = set()
        self._global_held: dict[str, int] = {}  # holder -> its open global streams
        self._task: asyncio.Task[None] | None = None
        bus.subscribe(self._changed)
        # Global ids (PostgreSQL): (sequence value, snapshot xmax) pairs not yet safe.
        # (an event id, the writers that were running when it was read)
        self._pending: list[tuple[int, frozenset[str]]] = []
        self._safe = 0
        self._safe_at = 0.0
        self._safe_lock = asyncio.Lock()
        self._retry: asyncio.TimerHandle | None = None
        # Whether global streams' last one-statement page was whole; after one that was
        # not, the next read goes the two-statement way (writers are in flight).
        self.whole_pages = True
        # Committed events this process's writers handed over (`reported`), by global
        # id, and which (job, seq) they cover.
        self.reported_rows: dict[int, dict[str, Any]] = {}
        self.reported_max = 0
        self._reported_seqs: set[tuple[str, int]] = set()

    @property
    def open_streams(self) -> int:
        """Streams open in this process."""
        return len(self._all) + sum(len(log.watches) for log in self._jobs.values())

    async def start(self) -> None:
        self._task = asyncio.create_task(self._sweep(), name="jobgate-streams-sweep")

    async def aclose(self) -> None:
        """Stop the periodic check and end every open stream."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._retry is not None:
            self._retry.cancel()
        self.end_all()

    def end_all(self) -> None:
        """End every open stream (the server is shutting down); clients resume elsewhere."""
        for watch in self._every():
            watch.close()

    def open(self, job_id: str | None, holder: str | None = None) -> Watch:
        """Register a stream of one job (or, with None, of every job, for `holder`, the
        caller); `release` it.

        Raises:
            TooManyStreams: the job already has `max_per_job` streams in this process,
                or `holder` `max_global_per_holder` global ones.
        """
        watch = Watch(job_id, holder=holder)
        if job_id is None:
            if holder is not None:
                held = self._global_held.get(holder, 0)
                if held >= self.max_global_per_holder:
                    raise TooManyStreams(
                        f"you already have {held} open streams of /v1/events",
                        retry_after=STREAM_RETRY_AFTER_S,
                    )
                self._global_held[holder] = held + 1
            self._all.add(watch)
            self.db.rows_wanted = True  # writers hand over their events (`reported`)
            return watch
        log = self._jobs.get(job_id)
        if log is None:
            log = self._jobs[job_id] = JobLog()
        watching = log.watches
        if len(watching) >= self.max_per_job:
            raise TooManyStreams(
                f"job {job_id!r} already has {self.max_per_job} open streams",
                retry_after=STREAM_RETRY_AFTER_S,
            )
        watching.add(watch)
        return watch

    def release(self, watch: Watch) -> None:
        """Forget a stream that ended."""
        watch.closed = True
        if watch.job_id is None:
            if watch in self._all and watch.holder is not None:
                left = self._global_held.pop(watch.holder, 1) - 1
                if left:
                    self._global_held[watch.holder] = left
            self._all.discard(watch)
            if not self._all:  # no stream left to send handed-over events
                self.db.rows_wanted = False
                self.reported_rows.clear()
                self._reported_seqs.clear()
                self.reported_max = 0
            return
        log = self._jobs.get(watch.job_id)
        if log is not None:
            log.watches.discard(watch)
            if not log.watches:
                del self._jobs[watch.job_id]

    def _every(self) -> list[Watch]:
        return [*self._all, *(w for log in self._jobs.values() for w in log.watches)]

    def reported(self, rows: list[dict[str, Any]]) -> None:
        """Events a write of this process committed, as rows with their global `id` and
        their job's `owner` (`Database.on_rows`). Called before the bus announces the
        same write: global streams then send them without reading them back, when
        every id between what they sent and these is known (`all_stream`)."""
        for row in rows:
            event_id = int(row["id"])
            self.reported_rows[event_id] = row
            self.reported_max = max(self.reported_max, event_id)
            self._reported_seqs.add((row["job_id"], int(row["seq"])))
        while len(self.reported_rows) > _REPORTED_ROWS:
            oldest = next(iter(self.reported_rows))
            row = self.reported_rows.pop(oldest)
            self._reported_seqs.discard((row["job_id"], int(row["seq"])))

    def _changed(self, changes: Changes | None) -> None:
        if changes is None:
            for job_log in self._jobs.values():
                job_log.stale = True
            for watch in self._every():
                watch.needs_read = True
                watch.wake.set()
            return
        for job_id, seq in changes.items():
            log = self._jobs.get(job_id)
            if log is None:
                continue
            log.latest = max(log.latest, seq)
            for watch in log.watches:
                if seq > watch.seen:
                    watch.wake.set()
        if changes and self._all:
            covered = all((job_id, seq) in self._reported_seqs for job_id, seq in changes.items())
            for watch in self._all:
                if not covered:
                    watch.needs_read = True
                watch.wake.set()

    async def _sweep(self) -> None:
        """Every `poll_s`: wake the streams whose job's log went past what they sent (a
        notification the bus lost), and every global stream."""
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                ids = list(self._jobs)
                for start in range(0, len(ids), _SWEEP_CHUNK):
                    chunk = ids[start : start + _SWEEP_CHUNK]
                    async with self.db.read() as conn:
                        rows = await conn.execute(
                            select(jobs.c.id, jobs.c.last_seq).where(jobs.c.id.in_(chunk))
                        )
                        self._changed({row.id: int(row.last_seq) for row in rows})
                for watch in self._all:
                    watch.needs_read = True
                    watch.wake.set()
            except Exception as exc:  # the store is away: try again next time
                log.warning("streams_sweep_failed", error=type(exc).__name__)

    async def events_after(self, job_id: str, after: int) -> list[dict[str, Any]]:
        """Up to `PAGE` of job `job_id`'s events after `seq` `after`, oldest first: from
        the rows its streams share when they reach the newest known, else from the store,
        one read at a time per job (the others wait for it, then look again)."""
        log = self._jobs.get(job_id)
        while log is not None:
            cached = log.after(after)
            if cached is not None:
                return cached[:PAGE]
            if log.fetching is None:
                break
            await asyncio.shield(log.fetching)
        fetching: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if log is not None:
            log.fetching = fetching
        try:
            # One statement: on PostgreSQL it needs no transaction around it.
            reading = self.db.read() if self.db.is_sqlite else self.db.autocommit()
            async with reading as conn:
                rows = await event_repo.page(conn, job_id, after=after, limit=PAGE)
            if log is not None:
                log.keep(rows, complete=len(rows) < PAGE)
            return rows
        finally:
            if log is not None:
                log.fetching = None
            fetching.set_result(None)

    async def safe_event_id(self) -> int | None:
        """The highest global event id a stream may read up to now (None: any).

        On SQLite writers take turns, so ids commit in order and every visible one is
        safe. On PostgreSQL ids commit out of order: an id is safe once every
        transaction that could hold a smaller one has ended. The sequence's value `v`
        is read first, then the transactions of this database that hold a transaction
        id; once all of those have ended, every id up to `v` is committed or never will
        be (every writer has its transaction id before it takes an event id:
        `store/pg.py`). Callers that ask together share one computation.
        """
        if self.db.is_sqlite:
            return None
        asked = time.monotonic()
        async with self._safe_lock:
            if self._safe_at >= asked:
                return self._safe
            started = time.monotonic()
            async with self.db.autocommit() as conn:
                taken, writers = await pg.record(conn, _LAST_ID_THEN_WRITERS)
            running = frozenset(writers)
            self._pending.append((int(taken), running))
            safe = [value for value, writers in self._pending if not writers & running]
            if safe:
                self._safe = max(self._safe, *safe)
            self._pending = [(v, w) for v, w in self._pending if w & running and v > self._safe]
            self._safe_at = started
            if self._pending and self._retry is None:
                # A writer is still in flight: look again soon, not at the next commit.
                self._retry = asyncio.get_running_loop().call_later(
                    _SAFE_RETRY_S, self._wake_global
                )
            return self._safe

    async def start_id(self) -> int | None:
        """Where a fresh global stream starts (None: any id is safe, SQLite).

        The sequence's value now, once the writers then in flight have ended: they
        may hold smaller ids, and every id up to it is then committed or never will be.
        The newest safe id known may be far older, and starting there would send a new
        client the history it did not ask for. A writer that does not end within
        `_START_WAIT_S` began well before this stream; its events are not waited for.
        """
        if self.db.is_sqlite:
            return None
        deadline = time.monotonic() + _START_WAIT_S
        pause = 0.002
        async with self.db.autocommit() as conn:
            taken, writers = await pg.record(conn, _LAST_ID_THEN_WRITERS)
            running = frozenset(writers)
            while running and time.monotonic() < deadline:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)
                running &= frozenset(await pg.value(conn, _WRITERS))
        if not running:
            self._safe = max(self._safe, int(taken))
        return int(taken)

    def _wake_global(self) -> None:
        self._retry = None
        for watch in self._all:
            watch.needs_read = True
            watch.wake.set()


def frame(data: Any, *, kind: str, event_id: int | None = None) -> bytes:
    """One SSE event: `id:` (when given), `event:` and one `data:` line of JSON."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    body = json.dumps(data, separators=(",", ":"), default=str)
    return f"{head}event: {kind}\ndata: {body}\n\n".encode()


async def job_stream(
    hub: Hub,
    watch: Watch,
    job_id: str,
    *,
    resume_after: int | None,
    heartbeat_s: float,
) -> AsyncIterator[bytes]:
    """One job's stream: `state` (fresh) or the stored events after `resume_after`, then
    live events until the terminal one. `watch` was registered before the first read,
    so nothing committed meanwhile goes unnoticed. Every read, the first one too, is
    under `_follow`: a store out of reach is waited out, never a torn stream."""
    db = hub.db
    fresh = resume_after is None
    watch.seen = resume_after or 0
    finished = False
    resumed = not fresh

    async def catch_up() -> AsyncGenerator[bytes, None]:
        nonlocal finished, resumed, fresh
        if fresh:
            async with db.read() as conn:
                snapshot = await job_repo.get(conn, job_id)
            fresh = False
            watch.seen = int(snapshot.job["last_seq"])
            yield frame(views.job(snapshot), kind="state", event_id=watch.seen)
            if snapshot.job["status"] in TERMINAL_STATUSES:
                finished = True
                return
        while True:
            rows = await hub.events_after(job_id, watch.seen)
            if not rows and resumed:
                # Resumed with nothing new: after the end of a finished job (or the job
                # is gone), the stream is done. Asked once: any later end comes as its
                # terminal event, the place being moved back to the job's last event
                # if the client named one past it.
                status, watch.seen, rows = await _status_then_events(db, job_id, watch.seen)
                finished = not rows and (status is None or status in TERMINAL_STATUSES)
            resumed = False
            if not rows:
                return
            frames: list[bytes] = []
            for row in rows:
                watch.seen = int(row["seq"])
                frames.append(frame(row["data"], kind=row["type"], event_id=watch.seen))
                if row["type"] in TERMINAL_EVENTS:
                    finished = True
                    break
            yield b"".join(frames)  # one write for the page
            if finished or len(rows) < PAGE:
                return

    async for chunk in _follow(watch, heartbeat_s, catch_up, lambda: finished):
        yield chunk


async def _status_then_events(
    db: Database, job_id: str, after: int
) -> tuple[str | None, int, list[dict[str, Any]]]:
    """The job's status, where to read from, then its stored events after that, read in
    that order. Where to read from is `after`, or the job's last event if `after` is
    past it (a `Last-Event-ID` naming no event yet): the events to come follow that.

    The events come from the store, not the hub's cache: the bus may not have told this
    process yet of events another one committed. A job's status and its terminal event
    commit together, so a status read as finished means the second read sees every
    event the job will have; a stream must not end before sending them.
    """
    async with db.read() as conn:
        found = (
            await conn.execute(select(jobs.c.status, jobs.c.last_seq).where(jobs.c.id == job_id))
        ).first()
        if found is not None:
            after = min(after, int(found.last_seq))
        rows = await event_repo.page(conn, job_id, after=after, limit=PAGE)
    return (None if found is None else found.status), after, rows


async def all_stream(
    hub: Hub,
    watch: Watch,
    *,
    owner: str | None,
    resume_after: int | None,
    heartbeat_s: float,
) -> AsyncIterator[bytes]:
    """Every event of `owner`'s jobs (every job's, with None), by global id; never ends.

    A fresh stream starts at the newest safe id: only what happens from now on. That
    place is taken here, before the response's headers go out, so a client that has
    them misses nothing that happens after.
    """
    if resume_after is None:
        watch.seen = await _latest_id(hub)
    else:
        # An id past every committed event names none: what comes next follows the
        # newest (the page's bound, `$1 + PAGE`, must also stay within BIGINT).
        async with hub.db.read() as conn:
            newest = (await conn.execute(select(func.max(events.c.id)))).scalar() or 0
        watch.seen = min(resume_after, int(newest))
    return _all_chunks(hub, watch, owner=owner, heartbeat_s=heartbeat_s)


async def _all_chunks(
    hub: Hub, watch: Watch, *, owner: str | None, heartbeat_s: float
) -> AsyncIterator[bytes]:
    async def catch_up() -> AsyncGenerator[bytes, None]:
        if not watch.needs_read:
            # Woken only by events this process committed and handed over: those that
            # follow what was sent without a gap are committed rows, every id up to
            # them too, so they go as they are.
            reported = hub.reported_rows
            while (row := reported.get(watch.seen + 1)) is not None:
                # One write for what came together (a job's end is two events); then a
                # look for what was handed over while it was being sent.
                frames: list[bytes] = []
                while row is not None:
                    watch.seen += 1
                    if owner is None or row["owner"] == owner:
                        frames.append(_global_frame(row))
                    row = reported.get(watch.seen + 1)
                if frames:
                    yield b"".join(frames)
            if watch.seen >= hub.reported_max:
                return
        watch.needs_read = False
        if hub.whole_pages and not hub.db.is_sqlite:
            while True:
                after = watch.seen
                found = await _whole_page(hub.db, after=after, owner=owner)
                if found is None:
                    hub.whole_pages = False
                    break
                whole_to, page = found
                if page:
                    watch.seen = int(page[-1]["id"])
                    yield b"".join(map(_global_frame, page))
                # Every id up to `whole_to` was read: those not sent are other owners'.
                watch.seen = max(watch.seen, whole_to)
                if whole_to < after + PAGE:
                    return
        else:
            hub.whole_pages = True  # the one statement again next time
        bound = await hub.safe_event_id()
        if bound is not None and bound <= watch.seen:
            return  # nothing is safe to read yet: a writer is still in flight
        while True:
            rows = await _global_page(hub.db, after=watch.seen, bound=bound, owner=owner)
            if rows:
                watch.seen = int(rows[-1]["id"])
                yield b"".join(map(_global_frame, rows))
            if len(rows) < PAGE:
                return

    # The place first, as an id alone (no event: EventSource and the SDK only note it):
    # a client cut off before any event of its own resumes from here, not from "now".
    yield f"id: {watch.seen}\n\n".encode()
    async for chunk in _follow(watch, heartbeat_s, catch_up, lambda: False):
        yield chunk


async def _follow(
    watch: Watch,
    heartbeat_s: float,
    catch_up: Callable[[], AsyncGenerator[bytes, None]],
    finished: Callable[[], bool],
) -> AsyncIterator[bytes]:
    """Send what `catch_up` finds, then wait to be woken (with heartbeats while nothing
    comes), until `finished()` or the client leaves. A store that cannot be reached is
    waited out, heartbeats going on, rather than ending the stream."""
    loop = asyncio.get_running_loop()
    heartbeat_due = loop.time() + heartbeat_s
    while not watch.closed:
        watch.wake.clear()
        try:
            async with contextlib.aclosing(catch_up()) as chunks:
                async for chunk in chunks:
                    heartbeat_due = loop.time() + heartbeat_s
                    yield chunk
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("stream_store_unreachable", error=type(exc).__name__)
            retry_in = min(_OUTAGE_RETRY_S, max(0.0, heartbeat_due - loop.time()))
            await wait_at_most(watch.wake, retry_in)
            watch.wake.set()  # look again, woken or not
        else:
            if finished():
                return
            await wait_at_most(watch.wake, max(0.0, heartbeat_due - loop.time()))
        if loop.time() >= heartbeat_due and not watch.closed:
            heartbeat_due = loop.time() + heartbeat_s
            yield HEARTBEAT


def _global_frame(row: Any) -> bytes:
    data = {**row["data"], "job_id": row["job_id"], "seq": int(row["seq"])}
    return frame(data, kind=row["type"], event_id=int(row["id"]))


async def _whole_page(
    db: Database, *, after: int, owner: str | None
) -> tuple[int, list[Any]] | None:
    """(bound, the page) when every event id in (`after`, bound] is committed and
    visible (`_WHOLE_PAGE`); None when one is not (yet)."""
    args: list[Any] = [after] if owner is None else [after, owner]
    async with db.autocommit() as conn:
        rows = await pg.records(conn, _WHOLE_PAGES[owner is not None], *args)
    if not rows or not rows[0]["whole"]:
        return None
    return int(rows[0]["bound"]), [row for row in rows if row["id"] is not None]


async def _latest_id(hub: Hub) -> int:
    bound = await hub.start_id()
    if bound is not None:
        return bound
    async with hub.db.read() as conn:
        return int((await conn.execute(select(func.max(events.c.id)))).scalar() or 0)


def _global_pages() -> dict[tuple[bool, bool], Select[Any]]:
    """The page of `_global_page` by (bounded, one owner's), each built once."""
    built: dict[tuple[bool, bool], Select[Any]] = {}
    for bounded in (False, True):
        for owned in (False, True):
            query = (
                select(events.c.id, events.c.job_id, events.c.seq, events.c.type, events.c.data)
                .where(events.c.id > bindparam("after"))
                .order_by(events.c.id)
                .limit(PAGE)
            )
            if bounded:
                query = query.where(events.c.id <= bindparam("bound"))
            if owned:
                query = query.join(jobs, jobs.c.id == events.c.job_id).where(
                    jobs.c.owner == bindparam("owner")
                )
            built[bounded, owned] = query
    return built


# Every wake-up of every global stream reads one: built once, and on PostgreSQL run
# straight on the driver (`pg.fetch`), as building and compiling it each time cost more
# than the read.
_GLOBAL_PAGES = _global_pages()


async def _global_page(
    db: Database, *, after: int, bound: int | None, owner: str | None
) -> Sequence[Any]:
    query = _GLOBAL_PAGES[bound is not None, owner is not None]
    params: dict[str, Any] = {"after": after}
    if bound is not None:
        params["bound"] = bound
    if owner is not None:
        params["owner"] = owner
    # One statement: on PostgreSQL it needs no transaction around it.
    async with db.read() if db.is_sqlite else db.autocommit() as conn:
        return await pg.fetch(conn, query, params)


class EventStreamResponse(StreamingResponse):
    """`text/event-stream`, sent as it is produced, that ends the moment the client
    goes away: a task waits for `http.disconnect` and closes the stream's watch, so an
    idle stream frees its resources at once rather than at its next heartbeat. The
    watch is released however the response ends."""

    def __init__(self, chunks: AsyncIterator[bytes], hub: Hub, watch: Watch) -> None:
        super().__init__(chunks, media_type="text/event-stream", headers=STREAM_HEADERS)
        self._chunks = chunks
        self._hub = hub
        self._watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def wait_for_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self._watch.close()

        watcher = asyncio.create_task(wait_for_disconnect())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for chunk in self._chunks:
                if self._watch.closed:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client is gone (ASGI 2.4 servers raise it from `send`)
        finally:
            watcher.cancel()
            self._hub.release(self._watch)
            closing = getattr(self._chunks, "aclose", None)
            if closing is not None:
                await closing()
