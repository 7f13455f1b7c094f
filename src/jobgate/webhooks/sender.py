"""`WebhookSender`: sends due webhook deliveries, signed, and records what came of them.

Every process that runs the API or a worker runs one. Senders share the work through
the store: a claim leases deliveries (`FOR UPDATE SKIP LOCKED` on PostgreSQL, the one
writer on SQLite) by pushing their `next_attempt_at` one lease ahead, so no two senders
hold one delivery; one that dies mid-send leaves it to fall due again. A delivery
queued by this process wakes the sender when its transaction commits (the store's
connection pool tells, see `start`); others are found by polling.

An attempt, all in (resolving, connecting, sending, the answer's headers), lasts at
most `JOBGATE_WEBHOOK_TIMEOUT_S`. A 2xx answer is success; 410 Gone and a refused
target fail the delivery for good; anything else is retried with exponential backoff
and full jitter, up to `JOBGATE_WEBHOOK_MAX_ATTEMPTS` attempts, then the delivery is
dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import httpx
import structlog
from sqlalchemy import event

from jobgate import __version__
from jobgate.config import Settings
from jobgate.ids import now
from jobgate.store import Database
from jobgate.store.repositories import webhooks as webhook_repo
from jobgate.waits import end_task, wait_at_most
from jobgate.webhooks import signing, ssrf

log = structlog.get_logger("jobgate.webhooks")

USER_AGENT = f"jobgate-webhooks/{__version__}"
LEASE_MARGIN_S = 30.0
"""How much longer than an attempt a claim lasts: time to record the outcome."""
CLAIM_LOOP_STOP_S = 1.0
"""How long a stop waits for the claim loop to end before cancelling it."""
_GONE = 410


class WebhookSender:
    """Sends due deliveries, at most `settings.webhook_concurrency` at once.

    Args:
        db: the store.
        settings: the `webhook_*` settings.
        resolver: host name to addresses (default: the system's, off the loop).
        clock: epoch seconds now (tests move it).
        jitter: a number in [0, 1) scaling each retry's delay (full jitter).
        lease_s: how long a claim holds a delivery (default: the timeout + 30 s).
        transport: the HTTP transport (tests); the default connects directly.
    """

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        resolver: ssrf.Resolver = ssrf.resolve,
        clock: Callable[[], float] = now,
        jitter: Callable[[], float] = random.random,
        lease_s: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.policy = ssrf.Policy.from_settings(settings)
        self.resolver = resolver
        self.clock = clock
        self.jitter = jitter
        self.timeout_s = settings.webhook_timeout_s
        self.lease_s = lease_s if lease_s is not None else self.timeout_s + LEASE_MARGIN_S
        self.concurrency = max(1, settings.webhook_concurrency)
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            # No proxy from the environment: the connection must go to the checked address.
            trust_env=False,
            timeout=httpx.Timeout(self.timeout_s),
            # No connection reuse: a pooled connection is keyed by address, and one made
            # for (and verified as) one host must never carry another host's delivery.
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=0),
            headers={"User-Agent": USER_AGENT},
        )
        self._wakeup = asyncio.Event()
        self._closing = False
        self._saturated = False
        self._timers: set[asyncio.TimerHandle] = set()
        self._task: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start sending; deliveries this process queues from now on wake it at once."""
        self._loop = asyncio.get_running_loop()
        # A connection returns to the pool after its transaction has ended: if that
        # transaction queued a delivery, it is committed (or gone) now, so look.
        event.listen(self.db.engine.sync_engine, "checkin", self._on_checkin)
        self._task = asyncio.create_task(self._run(), name="jobgate-webhook-sender")

    def wake(self) -> None:
        """Deliveries may be due: look now instead of at the next poll."""
        self._wakeup.set()

    async def aclose(self, grace_s: float | None = None) -> None:
        """Stop claiming, give sends under way `grace_s` (default: the attempt timeout,
        which bounds them) to finish and be recorded, then cancel the rest: their
        leases lapse and another sender sends them again."""
        self._closing = True
        self._wakeup.set()
        for timer in self._timers:
            timer.cancel()
        if self._task is not None:
            # It ends at its next turn; one stuck in a claim the store never answers
            # (a partition) is cancelled: what it claimed goes back with the lease.
            await end_task(self._task, CLAIM_LOOP_STOP_S)
            self._task = None
        if self._sending:
            grace = self.timeout_s + 1.0 if grace_s is None else grace_s
            _, pending = await asyncio.wait(set(self._sending), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if event.contains(self.db.engine.sync_engine, "checkin", self._on_checkin):
            event.remove(self.db.engine.sync_engine, "checkin", self._on_checkin)
        await self._client.aclose()

    async def __aenter__(self) -> WebhookSender:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def send_due(self) -> int:
        """Claim what is due now and send it, waiting for every send to be recorded
        (without starting the background loop); how many were claimed."""
        batch = await self._claim(self.concurrency)
        await asyncio.gather(*(self._deliver(due) for due in batch))
        return len(batch)

    # -- the loop --------------------------------------------------------------------

    def _on_checkin(self, _dbapi_connection: Any, record: Any) -> None:
        if record.info.pop(webhook_repo.QUEUED, False) and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self._loop.call_soon_threadsafe(self._wakeup.set)

    async def _run(self) -> None:
        delay = 0.1
        while not self._closing:
            self._wakeup.clear()
            free = self.concurrency - len(self._sending)
            if free > 0:
                try:
                    batch = await self._claim(free)
                except Exception as exc:
                    log.warning("webhook_claim_failed", error=repr(exc), retry_in_s=delay)
                    await wait_at_most(self._wakeup, delay)
                    delay = min(delay * 2, 5.0)
                    continue
                delay = 0.1
                for due in batch:
                    task = asyncio.create_task(self._deliver(due), name="jobgate-webhook")
                    self._sending.add(task)
                    task.add_done_callback(self._sent)
                self._saturated = len(batch) == free
                if self._saturated:
                    continue  # more may be due; a finished send wakes the loop if full
            else:
                self._saturated = True
            await wait_at_most(self._wakeup, self.settings.webhook_poll_s)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if self._saturated:
            self._wakeup.set()

    async def _claim(self, limit: int) -> list[webhook_repo.Due]:
        async with self.db.write() as conn:
            return await webhook_repo.claim(
                conn,
                at=self.clock(),
                lease_s=self.lease_s,
                limit=limit,
                new_key=signing.new_secret,
            )

    # -- one attempt -----------------------------------------------------------------

    async def _deliver(self, due: webhook_repo.Due) -> None:
        bound = structlog.contextvars.bound_contextvars(
            delivery_id=due.id, job_id=due.job_id, attempt=due.attempts
        )
        with bound:
            started = time.perf_counter()
            try:
                status_code, retry_after = await self._attempt(due)
            except ssrf.Refused as exc:
                log.warning("webhook_refused", reason=exc.reason)
                await self._record(due, "failed", None, f"refused: {exc.reason}")
                return
            except _Permanent as exc:
                log.warning("webhook_failed", error=str(exc))
                await self._record(due, "failed", None, str(exc))
                return
            except (TimeoutError, httpx.TimeoutException):
                await self._retry(due, None, f"timed out after {self.timeout_s:g} s", None)
                return
            except (httpx.TransportError, OSError) as exc:
                await self._retry(due, None, _describe(exc), None)
                return
            except Exception as exc:
                log.exception("webhook_attempt_crashed")
                await self._retry(due, None, _describe(exc), None)
                return
            elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
            if 200 <= status_code < 300:
                log.info("webhook_delivered", status_code=status_code, duration_ms=elapsed_ms)
                await self._record(due, "succeeded", status_code, None)
            elif status_code == _GONE:
                log.warning("webhook_gone", status_code=status_code)
                await self._record(due, "failed", status_code, "410 Gone: not retried")
            else:
                error = f"HTTP {status_code}"
                if 300 <= status_code < 400:
                    error += " (redirects are not followed)"
                await self._retry(due, status_code, error, retry_after)

    async def _attempt(self, due: webhook_repo.Due) -> tuple[int, float | None]:
        """POST the delivery once; its status code and any `Retry-After` (seconds)."""
        try:
            url = httpx.URL(due.url)
        except httpx.InvalidURL as exc:
            raise _Permanent(f"invalid URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise _Permanent(f"cannot deliver to a {url.scheme or 'relative'} URL")
        host = url.raw_host.decode("ascii")
        port = url.port or (443 if url.scheme == "https" else 80)
        body = due.payload.encode()
        timestamp = int(self.clock())
        headers = {
            "Content-Type": "application/json",
            # The original host, while the connection goes to the pinned address.
            "Host": url.netloc.decode("ascii"),
            **signing.headers(due.id, timestamp, body, due.secrets),
        }
        async with asyncio.timeout(self.timeout_s):
            address = await ssrf.pin(host, port, self.policy, self.resolver)
            request = self._client.build_request(
                "POST",
                url.copy_with(host=address),
                content=body,
                headers=headers,
                # TLS: SNI and the certificate check use the host, not the address.
                extensions={"sni_hostname": host},
            )
            response = await self._client.send(request, stream=True)
            await response.aclose()  # the body is not read: only the status matters
        return response.status_code, _retry_after(response)

    async def _retry(
        self,
        due: webhook_repo.Due,
        status_code: int | None,
        error: str,
        retry_after: float | None,
    ) -> None:
        if due.round_attempts >= self.settings.webhook_max_attempts:
            log.warning("webhook_dead", error=error, attempts=due.attempts)
            await self._record(due, "dead", status_code, error)
            return
        delay = self.backoff(due.round_attempts)
        if retry_after is not None:
            delay = min(self.settings.webhook_retry_max_s, max(delay, retry_after))
        log.info("webhook_attempt_failed", error=error, retry_in_s=round(delay, 3))
        await self._record(due, "pending", status_code, error, next_attempt_at=self.clock() + delay)
        # This sender knows when the retry is due: no poll has to find it.
        if self._loop is not None and not self._closing:
            loop = self._loop
            self._timers = {t for t in self._timers if t.when() > loop.time()}
            self._timers.add(loop.call_later(delay, self._wakeup.set))

    def backoff(self, attempt: int) -> float:
        """Seconds before the retry after attempt `attempt` (1, 2, ...): a random share
        (full jitter) of base x 2^(attempt-1), capped."""
        base = self.settings.webhook_retry_base_s
        ceiling = min(self.settings.webhook_retry_max_s, base * 2 ** min(attempt - 1, 62))
        return float(self.jitter() * ceiling)

    async def _record(
        self,
        due: webhook_repo.Due,
        status: str,
        status_code: int | None,
        error: str | None,
        *,
        next_attempt_at: float | None = None,
    ) -> None:
        try:
            async with self.db.write() as conn:
                current = await webhook_repo.record(
                    conn,
                    due,
                    status=status,
                    at=self.clock(),
                    status_code=status_code,
                    error=error,
                    next_attempt_at=next_attempt_at,
                )
        except Exception as exc:
            # The lease lapses and the delivery is sent again: at least once.
            log.warning("webhook_outcome_not_written", error=repr(exc))
            return
        if not current:
            log.info("webhook_outcome_stale", status=status)


class _Permanent(Exception):
    """A delivery no retry can help (its URL cannot be sent to)."""


def _retry_after(response: httpx.Response) -> float | None:
    if response.status_code not in (429, 503):
        return None
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
