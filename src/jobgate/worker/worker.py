"""`Worker`: claims stage tasks, runs them under renewed leases, records their outcomes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate import __version__
from jobgate.blobs.base import BlobStore
from jobgate.config import Settings
from jobgate.errors import BudgetExhausted, JobCancelled, StoreUnreachable
from jobgate.ids import now, uuid7
from jobgate.observability import metrics
from jobgate.pipelines import InputFile, Registry, StageContext
from jobgate.store import Database
from jobgate.store.repositories import idempotency, outcomes, tasks
from jobgate.store.repositories import workers as worker_repo
from jobgate.transport.base import Delivery, Transport
from jobgate.transport.outbox import OutboxRelay
from jobgate.transport.wakeups import PostgresWakeups
from jobgate.waits import end_task, finish_within, wait_at_most
from jobgate.worker import executors, liveness
from jobgate.worker.group_commit import GroupCommit, Regroup
from jobgate.worker.processes import ProcessDied, ProcessPool
from jobgate.worker.retention import Retention
from jobgate.worker.runtime import TaskRuntime

log = structlog.get_logger("jobgate.worker")
T = TypeVar("T")
CLAIM_RETRY_MAX_S = 2.0
# A stop is bounded whatever the store or broker does (a partition leaves their calls
# hanging, with no error to end them): the claim loop gets STOP_CLAIM_S to end, stages
# past the grace HAND_BACK_S to hand themselves back, and each clean-up step after
# that STOP_STEP_S. What a stop leaves undone, the lease or the lost-worker sweep does.
STOP_CLAIM_S = 2.0
HAND_BACK_S = 5.0
STOP_STEP_S = 1.0
"""The longest pause between claims that fail in a row (store out of reach)."""


class Worker:
    """A pool of `concurrency` stage runners.

    On the database transport it claims from the store when woken (by a commit in this
    process, a PostgreSQL notification, or its poll). With an external transport it
    claims when a broker token arrives, holds the token while the stage runs and
    acknowledges it once the outcome is committed; its outbox relay publishes the
    tokens that this process's commits leave.

    Args:
        settings: leases, polling, grace periods.
        db: the store.
        blobs: where input files and artifacts live.
        registry: the pipelines this worker can run (it claims only their tasks).
        concurrency: stages run at once.
        queues: the queues it takes from (default: `settings.worker_queues`).
        worker_id: a stable name (default: host-pid-random).
        transport: an external broker (default: the database itself); `db` must then
            have been opened with `outbox=True`.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        blobs: BlobStore,
        registry: Registry,
        concurrency: int,
        queues: list[str] | None = None,
        worker_id: str | None = None,
        transport: Transport | None = None,
    ) -> None:
        if transport is not None and not db.outbox:
            raise ValueError("a worker on an external transport needs Database(outbox=True)")
        self.settings = settings
        self.db = db
        self.blobs = blobs
        self.registry = registry
        self.concurrency = max(1, concurrency)
        self._retention = Retention(db, blobs, settings)
        self._sweeps = False  # whether the maintenance loop sweeps (and so purges) now
        self.queues = queues or settings.queue_names
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid7()[-6:]}"
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._running: dict[int, tuple[TaskRuntime, asyncio.Task[None]]] = {}
        self._slot_freed = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        # Sync stages, a thread each; one abandoned past its timeout keeps its slot.
        self._threads = executors.StageThreads(on_freed=self._slot_freed.set)
        # Subprocesses for `isolation="process"` stages, started when first needed.
        self.processes = ProcessPool(
            size=self.concurrency,
            max_tasks_per_child=settings.process_max_tasks_per_child,
            max_rss_mb=settings.process_max_rss_mb,
        )
        self._started_at = now()
        self._wakeups: PostgresWakeups | None = None
        self.transport = transport
        self.relay = (
            OutboxRelay(db, transport, poll_s=settings.worker_idle_poll_s) if transport else None
        )
        # Broker tokens not yet used, by queue, oldest first; and the token of each
        # running task, acknowledged when its outcome is committed.
        self._tokens: defaultdict[str, deque[Delivery]] = defaultdict(deque)
        self._token_of: dict[int, Delivery] = {}
        self._settling: set[asyncio.Task[None]] = set()
        # Claim without a token at the next chance; and keep doing so while such claims
        # come back full (after a broker outage or a poll that found work, tokens may be
        # missing for more tasks than one claim takes).
        self._recheck = True
        self._resync = False
        # Slots lent to submit statements (`lend`), and whether the claim loop waits for
        # a wake-up after a claim that found fewer tasks than it asked for.
        self._lent = 0
        self._idle = False
        # Whether any concurrency cap applies: then a finished stage may free a waiting one.
        self._capped = bool(settings.max_running_per_owner) or any(p.max_running for p in registry)
        groups = settings.worker_group_commit
        self._group = (
            GroupCommit(
                db,
                writers=groups,
                complete_many=None if db.is_sqlite else self._complete_many,
                finish_many=None if db.is_sqlite else self._finish_many,
            )
            if groups
            else None
        )

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Register in the workers table and start claiming."""
        await self._register()
        if not self.db.is_sqlite:
            # Tasks committed by any process wake this worker at once, not at its next poll.
            # It also names this worker in pg_stat_activity and elects the one sweeper.
            self._wakeups = PostgresWakeups(
                self.db.url,
                self.wake,
                worker_id=self.id,
                elect=True,
                check_s=self.settings.sweep_interval_s,
                depose_after_s=self.settings.worker_lost_after_s,
            )
            await self._wakeups.start()
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="jobgate-claim"),
            asyncio.create_task(self._lease_loop(), name="jobgate-leases"),
            asyncio.create_task(self._maintenance_loop(), name="jobgate-maintenance"),
        ]
        if self.transport is not None and self.relay is not None:
            await self.relay.start()
            self._loops.append(asyncio.create_task(self._consume_loop(), name="jobgate-tokens"))
        if self._retention.enabled:
            self._loops.append(
                asyncio.create_task(self._retention_loop(), name="jobgate-retention")
            )
        log.info(
            "worker_started", worker_id=self.id, queues=self.queues, concurrency=self.concurrency
        )

    def wake(self) -> None:
        """New tasks may be ready: claim now instead of at the next poll (with a
        broker: publish their tokens now; the tokens bring the claims)."""
        if self.relay is not None:
            self.relay.wake()
        else:
            self._wakeup.set()

    def lend(self) -> tasks.SlotLoan | None:
        """This worker's free slots, for a submit statement to start its jobs on
        (`SubmitGroup.lender`), reserved until `settle`.

        Only while the worker is idle: its last claim found fewer tasks than it asked
        for, and nothing woke it since, so no task of its queues is known to wait (new
        jobs then skip no one). Never with a concurrency cap or a broker: there the
        claim decides. None: the jobs queue, to be claimed.
        """
        if (
            not self._idle
            or self._wakeup.is_set()
            or self._stopping.is_set()
            or self._capped
            or self.transport is not None
            or self.db.is_sqlite
        ):
            return None
        free = self._free_slots()
        if free <= 0:
            return None
        self._lent += free
        return tasks.SlotLoan(
            worker_id=self.id,
            token_prefix=tasks.lease_prefix(),
            expires_at=now() + self.settings.lease_s,
            queues=frozenset(self.queues),
            pipelines=frozenset(self.registry.names()),
            slots=free,
        )

    def settle(self, loan: tasks.SlotLoan) -> None:
        """Run the tasks a submit statement started on `loan`, and free its other slots."""
        self._lent -= loan.slots
        if self._stopping.is_set():
            # Too late to run: unrenewed, their leases run out and the sweeper hands
            # them back, as after a crash.
            if loan.started:
                log.warning("lent_tasks_not_run", tasks=len(loan.started))
            return
        for task in loan.started:
            self._launch(task)
        if len(loan.started) < loan.slots:
            self._slot_freed.set()

    def expect_notice(self, notice: str) -> None:
        """A write that made tasks ready woke this worker (`wake`) once it committed, and
        its notification carries `notice`: that notification is then no news, and costs
        no second claim (which would find nothing, just as the first one's stage runs)."""
        if self._wakeups is not None:
            self._wakeups.expect(notice)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop claiming, let running stages finish within the grace, hand back the rest."""
        if self._stopping.is_set() and not self._loops:
            return
        self._stopping.set()
        self._wakeup.set()
        self._slot_freed.set()  # a claim loop waiting for a slot ends now, not when one frees
        self._recheck = False
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        claim_loop = self._loops[0] if self._loops else None
        if claim_loop is not None:
            # It ends at its next turn; one stuck in a claim the store never answers is
            # cancelled (whatever that claim took goes back with the lease).
            await _end(claim_loop, STOP_CLAIM_S)
        running = [task for _, task in self._running.values()]
        if running:
            log.info("worker_draining", running=len(running), grace_s=grace)
            _, pending = await asyncio.wait(running, timeout=grace)
            for runtime, task in list(self._running.values()):
                if task in pending:
                    runtime.handing_back = True
                    runtime.cancel()
                    self._interrupt(runtime)
            if pending:
                await asyncio.wait(pending, timeout=HAND_BACK_S)
        loops = self._loops[1:]
        for loop_task in loops:
            loop_task.cancel()
        if loops:
            # A loop cancelled in a store call may take as long as the store to end.
            await asyncio.wait(loops, timeout=STOP_STEP_S)
        self._loops = []
        # Settling deliveries with the broker takes up to 5 s of its own.
        await _bounded(self._close_transport(), "close_transport", 5 + STOP_STEP_S)
        await _bounded(self._unregister(), "unregister")
        await self.processes.close()
        if self._wakeups is not None:
            await _bounded(self._wakeups.aclose(), "close_wakeups")
            self._wakeups = None
        log.info("worker_stopped", worker_id=self.id)

    async def _unregister(self) -> None:
        with contextlib.suppress(Exception):
            async with self.db.write() as conn:
                await worker_repo.unregister(conn, self.id)

    async def run(self) -> None:
        """Run until SIGTERM or SIGINT, then drain (a second signal cuts the grace short)."""
        loop = asyncio.get_running_loop()
        signals = 0
        stop_now = asyncio.Event()

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                self._stopping.set()
            else:
                stop_now.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await self.start()
        await self._stopping.wait()
        stopper = asyncio.create_task(self.stop())
        cut = asyncio.create_task(stop_now.wait())
        await asyncio.wait([stopper, cut], return_when=asyncio.FIRST_COMPLETED)
        if not stopper.done():
            stopper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopper
            await self.stop(grace_s=0)
        cut.cancel()

    # -- loops -----------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        pipelines = self.registry.names()
        failures = 0  # claims failed in a row
        while not self._stopping.is_set():
            free = self._free_slots()
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            self._wakeup.clear()
            try:
                if self.transport is None:
                    claimed = await self._claim(self.queues, pipelines, free)
                else:
                    claimed = await self._claim_for_tokens(pipelines, free)
            except Exception:
                # Claim again after a pause: what it was woken for is still waiting,
                # and no further wake-up may come for it. The pause doubles while the
                # store stays out of reach, up to CLAIM_RETRY_MAX_S.
                failures += 1
                log.exception("claim_failed", failures=failures)
                self._recheck = True
                poll = self.settings.worker_poll_interval_s
                pause = poll * 2 ** min(failures - 1, 10)
                await asyncio.sleep(min(pause, max(CLAIM_RETRY_MAX_S, poll)))
                continue
            failures = 0
            for task in claimed:
                self._launch(task)
            if len(claimed) < free and not self._stopping.is_set():
                self._idle = True
                try:
                    if not await wait_at_most(self._wakeup, self._poll_interval()):
                        self._recheck = self._resync = True
                finally:
                    self._idle = False

    async def _claim(
        self, queues: Sequence[str], pipelines: Sequence[str], limit: int
    ) -> list[tasks.Claimed]:
        # A claim without caps is one statement on PostgreSQL, atomic by itself: no
        # BEGIN and COMMIT round trips between a submit and its stage starting.
        one_statement = not self.db.is_sqlite and not self._capped
        async with self.db.autocommit() if one_statement else self.db.write() as conn:
            return await tasks.claim(
                conn,
                worker_id=self.id,
                queues=queues,
                pipelines=pipelines,
                limit=limit,
                lease_s=self.settings.lease_s,
                at=now(),
                registry=self.registry,
                max_running_per_owner=self.settings.max_running_per_owner,
            )

    async def _claim_for_tokens(self, pipelines: Sequence[str], free: int) -> list[tasks.Claimed]:
        """Claim the best ready task of a token's queue for each token received so far.

        A token stands for "a task is ready in this queue", not for one task, so the
        store's order (priority, fair share, caps) decides what runs. A token that finds
        nothing is acknowledged, or handed back a second later if its queue still has
        tasks this worker may not take (caps, pipelines it does not run). After a poll
        timeout, or when one of its own stages ends while caps are set, the worker also
        claims without a token: tokens are wake-ups, the store is the truth.
        """
        claimed: list[tasks.Claimed] = []
        for queue, waiting in list(self._tokens.items()):
            count = min(len(waiting), free - len(claimed))
            if count <= 0:
                continue
            got = await self._claim([queue], pipelines, count)
            for task in got:
                self._token_of[task.task_id] = waiting.popleft()
            unused = [waiting.popleft() for _ in range(count - len(got))]
            if unused:
                await self._unclaimable(queue, unused)
            claimed.extend(got)
        if self._recheck and len(claimed) < free:
            wanted = free - len(claimed)
            found = await self._claim(self.queues, pipelines, wanted)
            claimed.extend(found)
            self._resync = self._resync and len(found) == wanted
            self._recheck = self._resync
        return claimed

    def _resume(self) -> None:
        """The broker is back after an outage: tokens published before it may be gone (a
        restart without persistence), or held on a connection the broker has not yet
        found dead; the tasks are in the store, so claim them from there."""
        if not self._stopping.is_set():
            log.info("worker_resync", worker_id=self.id)
            self._recheck = self._resync = True
            self._wakeup.set()

    async def _unclaimable(self, queue: str, unused: list[Delivery]) -> None:
        async with self.db.read() as conn:
            waiting = await tasks.ready_count(conn, queue, at=now())
        if not waiting:
            for token in unused:
                self._settle(token, ack=True)
            return
        loop = asyncio.get_running_loop()
        for token in unused:
            loop.call_later(1.0, self._settle, token, False)

    def _settle(self, token: Delivery, ack: bool) -> None:
        settle = asyncio.create_task(token.ack() if ack else token.reject())
        self._settling.add(settle)
        settle.add_done_callback(self._settling.discard)

    async def _consume_loop(self) -> None:
        assert self.transport is not None
        tokens = self.transport.consume(
            self.queues, prefetch=self.concurrency, on_resume=self._resume
        )
        async for token in tokens:
            if self._stopping.is_set():
                self._settle(token, ack=False)
                continue
            self._tokens[token.queue].append(token)
            self._wakeup.set()

    async def _close_transport(self) -> None:
        if self.transport is None:
            return
        for waiting in self._tokens.values():
            while waiting:
                self._settle(waiting.popleft(), ack=False)
        for token in self._token_of.values():
            self._settle(token, ack=False)
        self._token_of.clear()
        if self._settling:
            await asyncio.wait(list(self._settling), timeout=5)
        if self.relay is not None:
            await self.relay.aclose()
        await self.transport.aclose()

    def _poll_interval(self) -> float:
        """How long an idle claim loop waits for a wake-up before looking anyway.

        While PostgreSQL notifications arrive, a worker is woken for every committed task
        and for its own retries, so polling is only a safety net for lost notifications.
        """
        if self.transport is not None or (self._wakeups is not None and self._wakeups.listening):
            return max(self.settings.worker_poll_interval_s, self.settings.worker_idle_poll_s)
        return self.settings.worker_poll_interval_s

    async def _lease_loop(self) -> None:
        """Renew every held lease together and pass on cancellations and lost leases."""
        interval = min(0.5, self.settings.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            held = {runtime.task.lease_token: runtime for runtime, _ in self._running.values()}
            if not held:
                continue
            at = now()
            try:
                # One statement on PostgreSQL: no BEGIN and COMMIT round trips.
                renewing = self.db.write() if self.db.is_sqlite else self.db.autocommit()
                async with renewing as conn:
                    still, stopping = await tasks.renew(
                        conn,
                        {runtime.task.task_id: token for token, runtime in held.items()},
                        lease_s=self.settings.lease_s,
                        at=at,
                        worker_id=self.id,
                    )
            except Exception:
                log.exception("lease_renewal_failed")
                continue
            for token in still:
                # How long writes for the stage may be retried through a store outage.
                held[token].task.lease_expires_at = max(
                    held[token].task.lease_expires_at, at + self.settings.lease_s
                )
            for token, runtime in held.items():
                if runtime.finishing:
                    continue
                if token not in still:
                    if runtime.task.task_id in self._running:
                        log.warning(
                            "lease_lost", job_id=runtime.task.job_id, stage=runtime.task.stage
                        )
                        runtime.lease_lost = True
                        runtime.cancel()
                        self._interrupt(runtime)
                elif runtime.task.job_id in stopping and not runtime.cancel_requested():
                    runtime.cancel()
                    self._stop_soon(runtime)

    async def _maintenance_loop(self) -> None:
        """Heartbeat; sweep (expired leases and lost workers' stages go back to the queue);
        forget Idempotency-Keys older than their time to live. (Retention runs in a loop
        of its own, while this one sweeps: `_retention_loop`.)

        On PostgreSQL only the elected leader sweeps and purges, and a worker heartbeats
        every `worker_heartbeat_s` while its LISTEN connection shows it alive
        (docs/liveness.md).
        """
        timings = liveness.Timings.from_settings(self.settings)
        absences = liveness.Absences(timings)
        loop = asyncio.get_running_loop()
        last_beat = last_purge = now()
        beat_running = len(self._running)
        next_sweep = 0.0  # at the first tick
        swept_at = loop.time()
        unheard_since: float | None = None
        sweeping = False
        while True:
            pause = timings.tick_s
            if sweeping:  # wake for a lost worker's deadline, not a tick later
                pause = min(pause, max(0.05, next_sweep - now()))
            await self._pause(pause)
            sweeping = False
            try:
                at = now()
                wakeups = self._wakeups
                every = timings.fast_heartbeat_s
                if wakeups is not None and wakeups.vouched:
                    every = timings.heartbeat_s
                if len(self._running) != beat_running:
                    every = timings.fast_heartbeat_s  # `running` is what GET /v1/workers shows
                if at - last_beat >= every:
                    last_beat, beat_running = at, len(self._running)
                    await self._heartbeat(at)
                if wakeups is not None and wakeups.elected.is_set():
                    wakeups.elected.clear()
                    absences.reset()
                    next_sweep = 0.0  # a new leader looks at once
                if wakeups is not None and wakeups.notified_at > swept_at:
                    next_sweep = min(next_sweep, at + timings.busy_check_s)  # work arrives
                if wakeups is None or wakeups.listening:
                    unheard_since = None
                elif unheard_since is None:
                    unheard_since = at
                leader = wakeups is not None and wakeups.is_leader
                # Without a leader to hear from, a worker cut off from LISTEN sweeps itself.
                alone = unheard_since is not None and at - unheard_since >= timings.lost_after_s
                sweeping = wakeups is None or leader or alone
                self._sweeps = sweeping
                if not sweeping:
                    continue
                if at >= next_sweep:
                    swept_at = loop.time()
                    next_sweep = at + await self._sweep(at, absences, leader=leader)
                    next_sweep = min(next_sweep, absences.next_due() or next_sweep)
                if at - last_purge >= min(60.0, self.settings.idempotency_ttl_s):
                    last_purge = at
                    async with self.db.write() as conn:
                        await idempotency.purge(conn, before=at - self.settings.idempotency_ttl_s)
            except Exception:
                log.exception("maintenance_failed")

    async def _retention_loop(self) -> None:
        """Every `retention_interval_s`, while this worker sweeps (the leader on
        PostgreSQL), purge old jobs and collect unreferenced blobs: in a loop of its own,
        so that a long round never delays a heartbeat or a sweep."""
        await asyncio.sleep(min(60.0, self.settings.retention_interval_s))
        while True:
            if self._sweeps:
                try:
                    await self._retention.run(now())
                except Exception:
                    log.exception("retention_failed")
            await asyncio.sleep(self.settings.retention_interval_s)

    async def _sweep(self, at: float, absences: liveness.Absences, *, leader: bool) -> float:
        """Return expired leases, and lost workers' stages, to the queue.

        On PostgreSQL one cheap check (on the leader's own connection) comes first, and
        the sweep's transaction runs only when it found something to do.

        Returns:
            Seconds until the next sweep.
        """
        timings = absences.timings
        if self.db.is_sqlite:
            await self._requeue(at, silent_since=at - timings.lost_after_s)
            return timings.busy_check_s
        check = worker_repo.sweep_check(
            at=at,
            silent_before=at - timings.silent_after_s,
            busy_silent_before=at - timings.beat_grace_s,
            busy_every_s=timings.busy_check_s,
            idle_every_s=timings.idle_check_s,
        )
        if leader and self._wakeups is not None:
            row = await self._wakeups.lead(check)
            if row is None:  # no longer the leader
                return timings.busy_check_s
        else:
            async with self.db.read() as conn:
                row = dict((await conn.execute(check)).mappings().one())
        found = worker_repo.SweepCheck.from_row(row)
        lost = absences.lost(found.suspects, at=at, own_id=self.id)
        if lost or found.expired:
            # Re-checked under lock: a worker that heartbeat since the check is not lost.
            await self._requeue(at, silent_since=at - timings.beat_grace_s, among=lost)
        return found.next_check_s

    async def _requeue(
        self, at: float, *, silent_since: float, among: Sequence[str] | None = None
    ) -> None:
        async with self.db.write() as conn:
            lost = [
                worker_id
                for worker_id in await worker_repo.lost(
                    conn, silent_since=silent_since, among=among
                )
                if worker_id != self.id
            ]
            swept = await outcomes.sweep(
                conn,
                registry=self.registry,
                at=at,
                max_deliveries=self.settings.max_deliveries,
                lost_workers=lost,
            )
            await worker_repo.forget(conn, lost)
        if lost:
            log.warning("workers_lost", workers=lost, stages_requeued=swept)
        elif swept:
            log.info("leases_swept", count=swept)
        if swept:
            self.wake()

    async def _heartbeat(self, at: float) -> None:
        beat = worker_repo.beat(self.id, running=len(self._running), at=at)
        # On the LISTEN connection when it is up: one statement, no pool checkout.
        rows = await self._wakeups.fetch(beat) if self._wakeups is not None else None
        if rows is not None:
            alive = bool(rows)
        else:
            async with self.db.write() as conn:
                alive = (await conn.execute(beat)).first() is not None
        if not alive:  # declared lost (and its stages requeued) while it was cut off
            await self._register()

    async def _pause(self, seconds: float) -> None:
        """Sleep until the next tick, or until this worker is elected leader."""
        if self._wakeups is None:
            await asyncio.sleep(seconds)
            return
        await wait_at_most(self._wakeups.elected, seconds)

    async def _register(self) -> None:
        async with self.db.write() as conn:
            await worker_repo.register(
                conn,
                {
                    "id": self.id,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "queues": self.queues,
                    "pipelines": self.registry.names(),
                    "concurrency": self.concurrency,
                    "running": len(self._running),
                    "version": __version__,
                    "started_at": self._started_at,
                    "last_seen_at": now(),
                },
            )

    # -- running one task ------------------------------------------------------------

    def _launch(self, task: tasks.Claimed) -> None:
        runtime = TaskRuntime(self, task, asyncio.get_running_loop())
        runner = asyncio.create_task(self._run(runtime), name=f"stage-{task.job_id}-{task.stage}")
        self._running[task.task_id] = (runtime, runner)
        runner.add_done_callback(lambda _: self._finished(task.task_id))

    def _free_slots(self) -> int:
        """Slots for new stages: not running one, lent to a submit, or held by a thread
        stage abandoned past its timeout or cancel (it still runs)."""
        return self.concurrency - len(self._running) - self._lent - self._threads.abandoned

    def _finished(self, task_id: int) -> None:
        self._running.pop(task_id, None)
        token = self._token_of.pop(task_id, None)
        if token is not None:
            # The outcome is committed (or the lease is gone): the broker may forget it.
            self._settle(token, ack=True)
        self._slot_freed.set()
        if self._capped and not self._stopping.is_set():
            self._recheck = True  # a cap this stage held may let a waiting task run
            self._wakeup.set()
        # Otherwise a freed slot is no news: a claim loop short of tasks waits for a
        # wake-up (a task made ready), and one that filled every slot waits for a slot.

    def _stop_soon(self, runtime: TaskRuntime) -> None:
        """Cancellation: async stages get `CancelledError` now; sync ones get the grace.

        The flag comes first (`check_cancelled()` raises; a process stage's child is told).
        After `cancel_grace_s` the stage's task is cancelled: a thread is abandoned, a
        process stage's child is killed with its process group.
        """
        if runtime.task.task_id not in self._running:
            return
        runtime.cancel()
        stage = self.registry.get(runtime.task.pipeline).stages[runtime.task.stage]
        if stage.is_async:
            self._interrupt(runtime)
        else:
            asyncio.get_running_loop().call_later(
                self.settings.cancel_grace_s, self._interrupt, runtime
            )

    def _interrupt(self, runtime: TaskRuntime) -> None:
        """Cancel a stage's runner: once, and never while it writes its outcome.

        A second `CancelledError` landing in the outcome's write would drop it, and the
        task would stay leased until its lease ran out (a cancel seen by both the lease
        renewal and a progress flush did exactly that).
        """
        entry = self._running.get(runtime.task.task_id)
        if entry is None or entry[1].done() or runtime.finishing or runtime.interrupted:
            return
        runtime.interrupted = True
        entry[1].cancel()

    async def _run(self, runtime: TaskRuntime) -> None:
        task = runtime.task
        pipeline = self.registry.get(task.pipeline)
        stage = pipeline.stages[task.stage]
        bound = structlog.contextvars.bound_contextvars(
            job_id=task.job_id, stage=task.stage, attempt=task.attempt, worker_id=self.id
        )
        with bound:
            runtime.flusher = asyncio.create_task(self._flush_loop(runtime))
            started = now()
            outcome = "succeeded"
            try:
                files = [self._input_file(f) for f in task.files]
                item = task.item
                if stage.map_over == "files" and isinstance(item, dict):
                    item = self._input_file(item)
                ctx = StageContext(
                    job_id=task.job_id,
                    stage=task.stage,
                    attempt=task.attempt,
                    params=pipeline.parse_params(task.params),
                    files=files,
                    outputs=task.outputs,
                    runtime=runtime,
                    item=item,
                    item_key=task.item_key,
                )
                if runtime.cancel_requested():
                    raise JobCancelled()
                output = await executors.execute(stage, ctx, self._threads, self.processes)
            except asyncio.CancelledError:
                outcome = await self._interrupted(runtime)
            except JobCancelled:
                outcome = "cancelled"
                await self._write(
                    runtime,
                    lambda conn, r: outcomes.stopped(conn, task, r, at=now()),
                    readies=False,
                )
            except BudgetExhausted as exc:
                outcome = "failed"
                await self._fail(runtime, "budget_exceeded", exc.message, retryable=False)
            except executors.StageTimeout as exc:
                outcome = "failed"
                runtime.cancel()
                await self._fail(runtime, "timeout", str(exc), retryable=True)
            except (tasks.LeaseLost, StoreUnreachable) as exc:
                # Not the stage's failure: another worker has its task, or the store
                # could not record what it saved while its lease lasted. Nothing is
                # written; an expired lease puts the task back in the queue (the sweep).
                outcome = "lost"
                log.warning("stage_abandoned", reason=str(exc) or type(exc).__name__)
            except ProcessDied as exc:
                # A crash of the stage's own process is a lost delivery, bounded by
                # JOBGATE_MAX_DELIVERIES whatever the stage's retries.
                outcome = "lost"
                limit = self.settings.max_deliveries
                await self._fail(runtime, "lost", str(exc), retryable=True, runs_allowed=limit)
            except Exception as exc:
                outcome = "failed"
                log.warning("stage_raised", error=repr(exc), exc_info=True)
                kind = "stage_failed"
                await self._fail(runtime, kind, str(exc) or type(exc).__name__, retryable=True)
            else:
                await self._write(
                    runtime,
                    lambda conn, r: outcomes.complete(
                        conn,
                        task,
                        output,
                        r,
                        registry=self.registry,
                        at=now(),
                        aging_s=self.settings.priority_aging_s,
                    ),
                    grouped=True,
                    completion=outcomes.Completion(task, output),
                    readies=bool(pipeline.dependents(task.stage)),
                )
            finally:
                await _stop(runtime.flusher)
            log.info("stage_finished", outcome=outcome, duration_s=round(now() - started, 4))
            _observe(task.pipeline, task.stage, outcome, now() - started)

    async def _interrupted(self, runtime: TaskRuntime) -> str:
        task = runtime.task
        if runtime.lease_lost:
            return "lost"
        if runtime.handing_back:
            await self._write(runtime, lambda conn, r: tasks.release(conn, task, r, at=now()))
            return "released"
        await self._stopped(runtime)
        return "cancelled"

    async def _stopped(self, runtime: TaskRuntime) -> None:
        task = runtime.task
        await self._write(runtime, lambda conn, r: outcomes.stopped(conn, task, r, at=now()))

    async def _fail(
        self,
        runtime: TaskRuntime,
        kind: str,
        message: str,
        *,
        retryable: bool,
        runs_allowed: int | None = None,
    ) -> None:
        task = runtime.task
        error = {"type": kind, "message": message[:2000]}
        retry_in = await self._write(
            runtime,
            lambda conn, r: outcomes.fail(
                conn,
                task,
                error,
                r,
                retryable=retryable,
                registry=self.registry,
                at=now(),
                backoff_cap_s=self.settings.retry_backoff_max_s,
                aging_s=self.settings.priority_aging_s,
                runs_allowed=runs_allowed,
            ),
        )
        if retry_in is not None:
            # Claim the retry when it is due, not at the next (possibly long) poll.
            asyncio.get_running_loop().call_later(retry_in, self.wake)

    async def _write(
        self,
        runtime: TaskRuntime,
        outcome: Callable[[Any, tasks.Report], Awaitable[T]],
        *,
        grouped: bool = False,
        completion: outcomes.Completion | None = None,
        readies: bool = True,
    ) -> T | None:
        """Write a task's outcome, retrying transient store errors until the lease ends.

        Args:
            grouped: first try it in a group transaction with other outcomes ready now
                (`group_commit.py`); alone if the group's transaction fails.
            completion: the outcome is this successful run: in a group, with no report
                and no item, it is written with the group's others in one go.
            readies: the outcome may make tasks ready (a next stage, a retry, a task
                handed back): this worker then claims at once, not at the notification.
                A worker that claims for nothing costs an idle system's streams a round
                trip at the moment they deliver the job's end.

        Returns:
            What the outcome returned, or None when it could not be written.
        """
        # The outcome carries whatever is still buffered; no flush may race with it.
        # A flush under way is awaited, never cancelled, so its report is not lost; a
        # flusher only waiting is stopped without a wait (the loop turns it would take
        # come before the outcome's statement on every job's path).
        runtime.finishing = True
        runtime.finish_requested.set()
        runtime.dirty.set()
        if runtime.flusher is not None:
            if runtime.flushing:
                await asyncio.wait([runtime.flusher])
            else:
                runtime.flusher.cancel()
        delay = 0.05
        while True:
            report = runtime.take_report()
            try:
                if grouped and self._group is not None:
                    grouped = False
                    together = completion is not None and runtime.task.item_index is None
                    written: T = await self._group.write(
                        runtime.task.job_id,
                        runtime.task.task_id,
                        functools.partial(_with_report, outcome, report),
                        completion if together and not report else None,
                    )
                    return written
                async with self.db.write() as conn:
                    return await outcome(conn, report)
            except tasks.LeaseLost:
                log.warning("outcome_dropped_lease_lost")
                return None
            except Regroup:
                runtime.put_back(report)  # and write it alone, at once
            except Exception:
                runtime.put_back(report)
                if now() > runtime.task.lease_expires_at:
                    log.exception("outcome_not_written")
                    return None
                log.warning("outcome_write_retry", exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                if readies:
                    self.wake()

    async def _complete_many(
        self, conn: AsyncConnection, runs: Sequence[outcomes.Completion]
    ) -> list[tasks.LeaseLost | None]:
        return await outcomes.complete_many(
            conn, runs, registry=self.registry, at=now(), aging_s=self.settings.priority_aging_s
        )

    async def _finish_many(
        self, conn: AsyncConnection, runs: Sequence[outcomes.Completion]
    ) -> list[bool | tasks.LeaseLost]:
        return await outcomes.finish_many(conn, runs, registry=self.registry, at=now())

    async def _flush_loop(self, runtime: TaskRuntime) -> None:
        """Write buffered reports every flush interval; ends when the outcome is due."""
        while True:
            await runtime.dirty.wait()
            if runtime.finishing:
                return
            await wait_at_most(runtime.finish_requested, self.settings.event_flush_interval_s)
            if runtime.finishing:
                return
            runtime.dirty.clear()
            runtime.flushing = True
            try:
                await runtime.flush()
            except tasks.LeaseLost:
                runtime.lease_lost = True
                runtime.cancel()
                self._interrupt(runtime)
                return
            except Exception:
                log.warning("flush_failed", exc_info=True)
            finally:
                runtime.flushing = False
            if runtime.cancel_requested():
                self._stop_soon(runtime)

    def _input_file(self, info: dict[str, Any]) -> InputFile:
        path = self.blobs.local_path(info["sha256"])
        if path is None:
            raise RuntimeError("this blob store has no local paths; remote stores need a download")
        return InputFile(
            name=info["name"],
            sha256=info["sha256"],
            size=int(info["size"]),
            content_type=info["content_type"],
            path=path,
        )


def _with_report(
    outcome: Callable[[Any, tasks.Report], Awaitable[T]], report: tasks.Report, conn: Any
) -> Awaitable[T]:
    return outcome(conn, report)


async def _stop(task: asyncio.Task[None] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _observe(pipeline: str, stage: str, outcome: str, seconds: float) -> None:
    metrics.STAGE_DURATION.labels(pipeline=pipeline, stage=stage, outcome=outcome).observe(seconds)


async def _end(task: asyncio.Task[Any], within_s: float) -> None:
    """Let `task` end by itself within `within_s`, else cancel it (`end_task`)."""
    failure = await end_task(task, within_s)
    if failure is not None:
        log.warning("worker_loop_failed", error=repr(failure))


async def _bounded(step: Awaitable[None], name: str, within_s: float = STOP_STEP_S) -> None:
    """One clean-up step of a stop, given at most `within_s`."""
    if not await finish_within(step, within_s):
        log.warning("worker_stop_step_timed_out", step=name, after_s=within_s)
