"""Rate limits and quotas: per-user submits, per-IP requests, and the active-jobs cap.

Key contracts (docs/limits.md has the why of each):

- The submit limit (`JOBGATE_RATE_LIMIT_SUBMIT`) is a moving window per user, kept by
  `limits` in memory or in Redis. A submit is *checked* without counting after
  authentication and role (against this process's reading of under a second, when it
  has room), and its slots are *taken* (atomically, all n or none, reading the window
  left in the same call) only once every other check has passed and the
  Idempotency-Key lookup found no replay, just before its rows are written. So a refused
  request and a replay never count, and concurrent submits cannot together pass the
  limit: the take refuses the loser (429, nothing written, nothing counted).
- The active-jobs cap (`JOBGATE_MAX_ACTIVE_JOBS_PER_USER`) is counted at the check, and
  again, exactly, in the transaction that writes the jobs (or queues a retried job),
  under a lock of the owner's held to the commit: concurrent submits cannot pass it.
- The IP limit (`JOBGATE_RATE_LIMIT_IP`) counts every `/v1` request it lets through, before
  authentication is attempted, by `client_ip` (X-Forwarded-For only from trusted proxies).
- Storage failures fail open: the request goes through, a warning is logged, and the
  storage is left alone for `STORAGE_RETRY_S`.
- With no limit configured there is no storage and no I/O at all.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from jobgate import ids
from jobgate.api import problems
from jobgate.api.client_ip import Network, client_ip, ip_bucket, trusted_networks
from jobgate.api.permits import PermitBlocks, block_life_s
from jobgate.api.redis_takes import TAKE_AND_COUNT, RedisTakes
from jobgate.config import Settings
from jobgate.errors import RateLimited
from jobgate.store.repositories import idempotency
from jobgate.store.repositories import jobs as job_repo

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from jobgate.api.state import AppState
    from jobgate.auth import Principal
    from jobgate.store import Database

T = TypeVar("T")

STORAGE_TIMEOUT_S = 0.5
"""A Redis call slower than this counts as a storage failure (and fails open)."""
REDIS_POOL_SIZE = 16
"""Connections to the limits' Redis per API process; more checks at once wait for one."""
REDIS_POOL_WAIT_S = 5.0
"""How long a check waits for one of those connections. Longer than the storage timeout:
the wait measures this process's own load, not Redis, and must not fail the check open."""
VIEW_TTL_S = 1.0
"""How long a process trusts its last reading of a submit window with room, for the check."""
_SEEN_MAX = 100_000  # readings kept; older ones are dropped when there are more
_NAMES_MAX = 100_000  # Redis key names kept, by window and key
STORAGE_RETRY_S = 1.0
"""After a storage failure, limits are not enforced for this long before trying again."""
ACTIVE_RETRY_AFTER_S = 5
"""Retry-After of an active-jobs refusal: a hint, as nobody knows when jobs finish."""

log = structlog.get_logger("jobgate.limits")


# -- windows -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A moving window as seen at one moment: its size, its free slots, when a slot frees."""

    limit: int
    remaining: int
    reset_at: float
    """When the oldest entry leaves the window (the moment it was seen, if it is empty)."""

    def after_taking(self, cost: int, at: float, expiry: float) -> Window:
        """This window once `cost` slots were taken at `at`."""
        reset_at = self.reset_at if self.remaining < self.limit else at + expiry
        return Window(self.limit, max(0, self.remaining - cost), reset_at)

    def reset_in(self, now: float) -> int:
        """Whole seconds, rounded up, until a slot frees (0 when nothing is taken)."""
        return max(0, math.ceil(self.reset_at - now))

    def headers(self, now: float | None = None) -> dict[str, str]:
        """`RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`."""
        now = time.time() if now is None else now
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_in(now)),
        }

    def refusal(self, detail: str) -> RateLimited:
        """A 429 telling when a slot frees (Retry-After at least 1 s)."""
        now = time.time()
        return RateLimited(detail, retry_after=self.reset_in(now), headers=self.headers(now))


# -- storage -----------------------------------------------------------------------------


Take = Callable[[RateLimitItem, int, tuple[str, ...]], Awaitable[tuple[bool, float, int]]]
"""Take `cost` slots of a window (all or none), then count it: (taken, oldest entry, count)."""
TakeNow = Callable[[RateLimitItem, int, tuple[str, ...]], tuple[bool, float, int] | None]
"""`Take` done at once, without a call to the storage, or None when it needs one."""


def _needs_a_call(_item: RateLimitItem, _cost: int, _key: tuple[str, ...]) -> None:
    return None


@dataclass
class Backend:
    """A moving-window limiter, the storage errors that fail open, and how to close it.

    `take` does the limiter's `hit` and reads the window it leaves, in one storage call
    where the storage allows (one Redis round trip).
    """

    limiter: MovingWindowRateLimiter
    errors: tuple[type[Exception], ...]
    aclose: Callable[[], Awaitable[None]]
    take: Take
    held: Callable[[RateLimitItem, tuple[str, ...]], int] = lambda item, key: 0
    """Slots of a window this process holds ahead and has not handed out (`api/permits.py`)."""
    take_now: TakeNow = _needs_a_call
    """`take` without awaiting, where the storage allows: memory always, Redis from a
    block this process holds. Every request takes at least once: a take that needs no
    storage call costs no coroutines either."""


async def _nothing() -> None:
    return None


class SweepingMemoryStorage(MemoryStorage):
    """`limits`' memory storage for moving windows: each window an array of its entries'
    times, oldest first, swept out at most once a second, on the event loop.

    `limits` (5.8) keeps a window as a list of `Entry` objects, newest first: each take
    inserts at the list's head (a copy of the whole window, 37-51 µs a take in a window
    of 100,000 entries; `python -m bench.limit_takes`) and each entry costs 144 bytes.
    Here a take appends 8 bytes. `limits` also starts a sweep of every key, with a
    thread hop per key, whenever the previous sweep has finished: under load that is all
    the time, and the hops cost the event loop more than the limits themselves. Sweeping
    a window is a binary search, so it needs no thread. A window's count never depends
    on the sweep (expired entries are skipped when counted), only memory does.
    """

    SWEEP_INTERVAL_S = 1.0

    def __init__(self) -> None:
        super().__init__()
        self._next_sweep = 0.0
        self.windows: dict[str, tuple[array[float], int]] = {}
        """Per window key: its entries' times, oldest first, and its length in seconds."""

    async def _MemoryStorage__schedule_expiry(self) -> None:
        self._sweep_when_due()

    def _sweep_when_due(self) -> None:
        at = time.monotonic()
        if at >= self._next_sweep:
            self._next_sweep = at + self.SWEEP_INTERVAL_S
            self.sweep()

    def take_now(self, key: str, limit: int, expiry: int, cost: int) -> tuple[bool, float, int]:
        """Take `cost` entries if the window has room, then read it, at once and without
        a lock: nothing in between awaits, so on the event loop it is atomic.
        (taken, the oldest entry's time in the window, the entries in the window)."""
        self._sweep_when_due()
        now = time.time()
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = (array("d"), expiry)
        times = window[0]
        taken = False
        if cost <= limit:
            # The entry a full window would have to lose for `cost` more to fit.
            room_after = limit - cost
            if len(times) <= room_after or times[-room_after - 1] < now - expiry:
                times.extend(itertools.repeat(now, cost))
                taken = True
        return (taken, *_span(times, now - expiry, now))

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """`limits`' take, on this storage's windows."""
        return self.take_now(key, limit, expiry, amount)[0]

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """`limits`' window read, on this storage's windows: (its oldest entry's time, or
        now when empty; the entries in it)."""
        now = time.time()
        window = self.windows.get(key)
        return _span(window[0], now - expiry, now) if window else (now, 0)

    async def clear(self, key: str) -> None:
        """Forget `key`'s window and counters."""
        await super().clear(key)
        self.windows.pop(key, None)

    async def reset(self) -> int | None:
        """Forget every window and counter."""
        count = max(len(self.storage), len(self.windows))
        await super().reset()
        self.windows.clear()
        return count

    def sweep(self) -> None:
        """Drop expired entries, and the windows and counters left empty."""
        now = time.time()
        for key, (times, expiry) in list(self.windows.items()):
            # Oldest first, so the expired ones are a head.
            expired = bisect.bisect_right(times, now - expiry)
            if expired == len(times):
                del self.windows[key]
                self.locks.pop(key, None)
            elif expired:
                del times[:expired]
        for key, expires_at in list(self.expirations.items()):
            if expires_at <= now:
                self.storage.pop(key, None)
                del self.expirations[key]
                self.locks.pop(key, None)


def _span(times: array[float], start: float, now: float) -> tuple[float, int]:
    """(the oldest time after `start`, or `now` if none; how many there are)."""
    first = bisect.bisect_right(times, start)
    count = len(times) - first
    return (times[first] if count else now), count


def open_backend(
    url: str,
    *,
    namespace: str,
    take_ahead: bool = True,
    block_life: Callable[[int], float] = block_life_s,
) -> Backend:
    """The moving-window limiter over the storage `url` names.

    Args:
        url: `memory://` (this process only) or `redis://host:port/db` / `rediss://...`
            (shared by every process that uses it).
        namespace: prefix of the keys in Redis.
        take_ahead: on Redis, take a busy window's slots in blocks ahead (`api/permits.py`).
        block_life: on Redis, how long a block of slots taken ahead is handed out, for
            a window's length in seconds (`api/permits.py`).

    Raises:
        ValueError: the URL names no known storage.
    """
    scheme, separator, _ = url.partition("://")
    scheme = scheme.lower()
    if separator and scheme == "memory":
        memory = SweepingMemoryStorage()
        limiter = MovingWindowRateLimiter(memory)

        def take_in_memory_now(
            item: RateLimitItem, cost: int, key: tuple[str, ...]
        ) -> tuple[bool, float, int]:
            return memory.take_now(item.key_for(*key), item.amount, item.get_expiry(), cost)

        async def take_in_memory(
            item: RateLimitItem, cost: int, key: tuple[str, ...]
        ) -> tuple[bool, float, int]:
            return take_in_memory_now(item, cost, key)

        return Backend(limiter, (), _nothing, take_in_memory, take_now=take_in_memory_now)
    if separator and scheme in ("redis", "rediss"):
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.exceptions import RedisError

        # Blocking: a check past the pool's size waits for a connection. redis-py's plain
        # pool refuses it at once, which `_guard` would take for an outage and fail open
        # on: a burst of submits would pass uncounted. So would a wait as short as the
        # storage timeout, on a loaded process (a burst whose event loop is busy).
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_POOL_SIZE,
            timeout=REDIS_POOL_WAIT_S,
            socket_connect_timeout=STORAGE_TIMEOUT_S,
            socket_timeout=STORAGE_TIMEOUT_S,
        )
        # Our own pool (`limits` passes it to redis-py), so that shutdown can close it.
        options: dict[str, Any] = {"connection_pool": pool}
        storage: Storage = RedisStorage(
            f"async+{url}", implementation="redispy", key_prefix=namespace, **options
        )
        takes = RedisTakes(Redis(connection_pool=pool).register_script(TAKE_AND_COUNT))
        blocks = PermitBlocks(takes, life_s=block_life, ahead=take_ahead)

        names: dict[tuple[RateLimitItem, tuple[str, ...]], str] = {}

        def name_of(item: RateLimitItem, key: tuple[str, ...]) -> str:
            name = names.get((item, key))
            if name is None:
                if len(names) >= _NAMES_MAX:
                    names.clear()
                name = names[item, key] = f"{namespace}:{item.key_for(*key)}"
            return name

        async def take_in_redis(
            item: RateLimitItem, cost: int, key: tuple[str, ...]
        ) -> tuple[bool, float, int]:
            return await blocks.take(name_of(item, key), item.amount, item.get_expiry(), cost)

        def take_in_redis_now(
            item: RateLimitItem, cost: int, key: tuple[str, ...]
        ) -> tuple[bool, float, int] | None:
            return blocks.take_held(name_of(item, key), cost)

        def held(item: RateLimitItem, key: tuple[str, ...]) -> int:
            return blocks.held(name_of(item, key))

        async def close() -> None:
            await blocks.give_back()
            await pool.aclose()

        return Backend(
            MovingWindowRateLimiter(storage),
            (RedisError, OSError),
            close,
            take_in_redis,
            held,
            take_in_redis_now,
        )
    raise ValueError(f"unknown limits URL {url!r}: use memory:// or redis://host:port/db")


def _item(limit: str) -> RateLimitItem | None:
    return parse(limit) if limit.strip() else None


# -- the limits of one process -----------------------------------------------------------


class RateLimits:
    """The rate limits and quotas of one API process, built once from the settings.

    Args:
        submit: jobs per user in a moving window (None: no limit).
        ip: `/v1` requests per client IP in a moving window (None: no limit).
        max_active_jobs: queued+running jobs per owner (0: unlimited).
        trusted_proxies: peers whose X-Forwarded-For is believed.
        backend: where windows are kept (needed when `submit` or `ip` is set).
    """

    def __init__(
        self,
        *,
        submit: RateLimitItem | None = None,
        ip: RateLimitItem | None = None,
        max_active_jobs: int = 0,
        trusted_proxies: Sequence[Network] = (),
        backend: Backend | None = None,
    ) -> None:
        if (submit or ip) and backend is None:
            raise ValueError("a rate limit needs a storage backend")
        self.submit = submit
        self.ip = ip
        self.max_active_jobs = max_active_jobs
        self.trusted_proxies = tuple(trusted_proxies)
        self._backend = backend
        self._retry_at = 0.0
        # owner -> (when it was read, monotonic; their submit window then)
        self._seen: dict[str, tuple[float, Window]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimits:
        """The limits `settings` configure; storage is opened only if a rate limit is set."""
        submit, ip = _item(settings.rate_limit_submit), _item(settings.rate_limit_ip)
        backend = None
        if submit or ip:
            backend = open_backend(
                settings.limits_url,
                namespace=settings.limits_namespace,
                take_ahead=settings.limits_take_ahead,
            )
        return cls(
            submit=submit,
            ip=ip,
            max_active_jobs=settings.max_active_jobs_per_user,
            trusted_proxies=trusted_networks(settings.trusted_proxies),
            backend=backend,
        )

    async def aclose(self) -> None:
        """Close the storage's connections."""
        if self._backend is not None:
            await self._backend.aclose()

    @property
    def checks_submits(self) -> bool:
        """Whether a submit needs any check at all."""
        return self.submit is not None or self.max_active_jobs > 0

    async def submit_window(self, owner: str) -> Window | None:
        """`owner`'s submit window now; None without a submit limit or when storage fails."""
        if self.submit is None:
            return None
        return await self._window(self.submit, "submit", owner)

    async def take_submits(self, owner: str, cost: int) -> tuple[bool, Window | None]:
        """Take `cost` submit slots at once, or none (False) if they are not all free; and
        the window as the take left it (None without a limit, or when storage fails)."""
        if self.submit is None:
            return True, None
        key = ("submit", owner)
        answer = self._take_now(self.submit, cost, key)
        if answer is None:
            answer = await self._take_by_call(self.submit, cost, key)
        taken, window = answer
        if window is not None:
            self._remember(owner, window)
        return taken, window

    async def checked_window(self, owner: str, cost: int = 1) -> Window | None:
        """`owner`'s submit window for the check before the body: this process's last
        reading when it is under `VIEW_TTL_S` old and has room for `cost`, else a fresh one.

        A reading with room is trusted for the check only (the take is always exact): in
        that second other processes may have filled the window, and then the take refuses
        the request. A full reading is never trusted, as slots free by themselves.
        """
        seen = self._seen.get(owner)
        if seen is not None:
            read_at, last = seen
            if time.monotonic() - read_at < VIEW_TTL_S and last.remaining >= cost:
                return last
        window = await self.submit_window(owner)
        if window is not None:
            self._remember(owner, window)
        return window

    def _remember(self, owner: str, window: Window) -> None:
        if len(self._seen) >= _SEEN_MAX:
            at = time.monotonic()
            self._seen = {o: v for o, v in self._seen.items() if at - v[0] < VIEW_TTL_S}
            if len(self._seen) >= _SEEN_MAX:
                self._seen.clear()
        self._seen[owner] = (time.monotonic(), window)

    async def admit_submit(self, db: Database, owner: str) -> SubmitQuota:
        """Read `owner`'s submit window and active jobs, counting nothing."""
        window = await self.checked_window(owner)
        active = None
        if self.max_active_jobs > 0:
            async with db.read() as conn:
                active = await job_repo.count_active(conn, owner)
        return SubmitQuota(self, owner, window, active)

    async def hold_active_room(self, conn: AsyncConnection, owner: str) -> None:
        """In a write transaction, refuse one more active job of `owner` past the
        active-jobs cap (a retry queues its job again, as a submit does). The count is
        exact: it holds the owner's lock to the commit (`count_active_locked`).

        Raises:
            RateLimited: 429, with Retry-After.
        """
        await SubmitQuota(self, owner).hold_active(conn)

    def admitted_now(self, scope: Scope) -> bool:
        """Count one request from the scope's client, if that needs no storage call (no
        IP limit; memory; a slot of a block held): whether it was admitted. False: not
        counted, `admit_ip` decides."""
        if self.ip is None:
            return True
        assert self._backend is not None
        key = ("ip", ip_bucket(client_ip(scope, self.trusted_proxies)))
        answer = self._backend.take_now(self.ip, 1, key)
        return answer is not None and answer[0]

    async def admit_ip(self, scope: Scope) -> Window | None:
        """Count one request from the scope's client: None if admitted, else its window."""
        if self.ip is None:
            return None
        key = ("ip", ip_bucket(client_ip(scope, self.trusted_proxies)))
        taken, window = await self._take_by_call(self.ip, 1, key)
        if taken:
            return None
        return window or Window(self.ip.amount, 0, time.time() + 1)

    async def _window(self, item: RateLimitItem, *key: str) -> Window | None:
        assert self._backend is not None
        limiter = self._backend.limiter
        stats = await self._guard(lambda: limiter.get_window_stats(item, *key), None, "window")
        if stats is None:
            return None
        now = time.time()
        # Slots this process holds ahead are free to its own requests.
        remaining = min(item.amount, max(0, stats.remaining) + self._backend.held(item, key))
        # An empty window has no oldest entry: `limits` then reports a time to ignore.
        reset_at = stats.reset_time if remaining < item.amount else now
        return Window(item.amount, remaining, reset_at)

    def _take_now(
        self, item: RateLimitItem, cost: int, key: tuple[str, ...]
    ) -> tuple[bool, Window | None] | None:
        """`_take_by_call`, when the storage needs no call for it (`Backend.take_now`);
        else None."""
        assert self._backend is not None
        result = self._backend.take_now(item, cost, key)
        return None if result is None else _taken(item, result)

    async def _take_by_call(
        self, item: RateLimitItem, cost: int, key: tuple[str, ...]
    ) -> tuple[bool, Window | None]:
        """Take `cost` slots through the storage (`Backend.take`), failing open."""
        assert self._backend is not None
        take = self._backend.take
        result = await self._guard(lambda: take(item, cost, key), None, "take")
        return (True, None) if result is None else _taken(item, result)

    async def _guard(self, call: Callable[[], Awaitable[T]], fallback: T, operation: str) -> T:
        """`call()`, or `fallback` (fail open) while the storage fails."""
        assert self._backend is not None
        if time.monotonic() < self._retry_at:
            return fallback
        try:
            return await call()
        except self._backend.errors as exc:
            # Fail open: refusing every submit because Redis blinked would turn a
            # limiter hiccup into an outage. Back off, so a dead Redis costs one
            # timeout per STORAGE_RETRY_S rather than one per request.
            self._retry_at = time.monotonic() + STORAGE_RETRY_S
            log.warning(
                "rate_limit_storage_failed",
                operation=operation,
                error=type(exc).__name__,
                detail=str(exc),
                retry_in_s=STORAGE_RETRY_S,
            )
            return fallback


def _taken(item: RateLimitItem, result: tuple[bool, float, int]) -> tuple[bool, Window]:
    """A take's answer, and the window it left."""
    taken, oldest, count = result
    remaining = max(0, item.amount - count)
    reset_at = oldest + item.get_expiry() if count else time.time()
    return taken, Window(item.amount, remaining, reset_at)


# -- one submit request ------------------------------------------------------------------


@dataclass
class SubmitQuota:
    """One submit request's limits: checked before its body is read, taken before it is written.

    Attributes:
        window: the owner's submit window at the check (None: no limit, or storage down).
        active: the owner's queued+running jobs at the check (None: no cap).
        cost: jobs this request submits (`require` sets it).
        deferred: refused at the check, but with an Idempotency-Key already used: left to
            the key lookup (a replay passes, counting nothing) and to the take.
        taken: whether `reserve` took the slots.
        left: the window as the take left it (exact, read in the take's call).
    """

    limits: RateLimits
    owner: str
    window: Window | None = None
    active: int | None = None
    cost: int = 1
    deferred: bool = False
    taken: bool = False
    taken_at: float = field(default=0.0, repr=False)
    left: Window | None = None

    async def require_fresh(self, cost: int) -> None:
        """`require`, after reading the window again if this process's last reading
        (which the check may have used) is short of `cost`: slots free by themselves."""
        if not self.deferred and self.window is not None and cost > self.window.remaining:
            self.window = await self.limits.submit_window(self.owner) or self.window
        self.require(cost)

    def require(self, cost: int) -> None:
        """Refuse a request of `cost` jobs that the window or the active cap cannot take.

        Raises:
            RateLimited: 429, with Retry-After and the window's RateLimit headers.
        """
        self.cost = cost
        if self.deferred:
            return
        window = self.window
        if window is not None and cost > window.remaining:
            if cost > window.limit:
                detail = f"{cost} jobs are more than the submit limit of {window.limit} allows"
            else:
                detail = (
                    f"submit limit reached: {cost} needed, {window.remaining} of "
                    f"{window.limit} left; a slot frees in {max(1, window.reset_in(time.time()))} s"
                )
            raise window.refusal(detail)
        self._require_active()

    async def hold_active(self, conn: AsyncConnection) -> None:
        """The active-jobs cap again, exactly, in the transaction that writes the jobs:
        the count holds the owner's lock to the commit, so concurrent submits of one
        owner, in any process, cannot together pass the cap. A no-op without a cap.

        Raises:
            RateLimited: 429, with Retry-After and the window's RateLimit headers.
        """
        if self.limits.max_active_jobs > 0:
            self.active = await job_repo.count_active_locked(conn, self.owner)
            self._require_active()

    def _require_active(self) -> None:
        cost = self.cost
        cap = self.limits.max_active_jobs
        if self.active is not None and self.active + cost > cap:
            raise RateLimited(
                f"{self.active} of at most {cap} jobs are queued or running; "
                f"{cost} more would pass the cap",
                retry_after=ACTIVE_RETRY_AFTER_S,
                headers=self.headers(),
            )

    @property
    def active_hold(self) -> Callable[[AsyncConnection], Awaitable[None]] | None:
        """`hold_active`, when there is an active-jobs cap."""
        return self.hold_active if self.limits.max_active_jobs > 0 else None

    @property
    def reservation(self) -> Callable[[], Awaitable[None]] | None:
        """`reserve`, when there is a window to take slots from."""
        return self.reserve if self.window is not None else None

    async def reserve(self) -> None:
        """Take the request's slots, atomically across processes.

        Raises:
            RateLimited: another request took them since the check (nothing is taken).
        """
        at = time.time()
        taken, left = await self.limits.take_submits(self.owner, self.cost)
        if taken:
            self.taken, self.taken_at, self.left = True, at, left
            if left is None:  # the storage failed (open): no window to tell of
                self.window = None
            return
        window = left or self.window
        assert window is not None
        raise window.refusal(
            f"submit limit reached: {self.cost} needed, {window.remaining} of {window.limit} left"
        )

    def headers(self) -> dict[str, str]:
        """The RateLimit headers of this request's answer (none without a window)."""
        if self.left is not None:
            return self.left.headers()
        if self.window is None:
            return {}
        window = self.window
        if self.taken and self.limits.submit is not None:
            expiry = self.limits.submit.get_expiry()
            window = window.after_taking(self.cost, self.taken_at, expiry)
        return window.headers()


async def check_submit(request: Request, state: AppState, principal: Principal) -> SubmitQuota:
    """Check one job against the caller's submit limit and active cap (429 if refused).

    The answer to this request carries the window's RateLimit headers from here on,
    whatever it turns out to be (`problems.problem` adds `request.state.response_headers`).
    """
    limits = state.limits
    if not limits.checks_submits:
        return SubmitQuota(limits, principal.id)
    quota = await limits.admit_submit(state.db, principal.id)
    request.state.response_headers = quota.headers  # for an error answer: the window then
    try:
        quota.require(1)
    except RateLimited:
        # A retry of a submit that went through is a replay (or a 409): neither counts,
        # so let it reach the key lookup. Anything else is refused by the take (429).
        key = request.headers.get("idempotency-key")
        if not await idempotency_key_known(state, principal.id, key):
            raise
        quota.deferred = True
    return quota


async def idempotency_key_known(state: AppState, owner: str, key: str | None) -> bool:
    """Whether `owner` used `key` on a submit still remembered: a retry of that submit
    is its replay (or a 409), creates nothing, and so spends no quota or budget."""
    if not key or len(key) > idempotency.MAX_KEY_LENGTH:
        return False
    async with state.db.read() as conn:
        found = await idempotency.lookup(
            conn, owner=owner, key=key, at=ids.now(), ttl_s=state.settings.idempotency_ttl_s
        )
    return found is not None


# -- the IP limit ------------------------------------------------------------------------


def _is_v1(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class IpRateLimitMiddleware:
    """Count every `/v1` request against its client IP's limit before anything else runs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 429 when the client's window is full, else pass the request on."""
        if scope["type"] == "http" and _is_v1(scope["path"]):
            limits: RateLimits = scope["app"].state.jobgate.limits
            refused = None if limits.admitted_now(scope) else await limits.admit_ip(scope)
            if refused is not None:
                exc = refused.refusal("too many requests from this address")
                response = problems.from_error(Request(scope), exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
