"""The event bus's contract: it wakes event streams; it never carries the truth.

A write transaction that appends events to jobs' logs leaves, once committed, a
`Changes` map (job id -> the job's last `seq`) that the process hands to its bus. Every
API process subscribed to the bus learns of it and wakes the streams of those jobs,
which then read the events themselves from the store, by `seq`. So a notification that
is lost (a broker restarting, a process dying between commit and publish) only delays a
stream until its next wake-up or the hub's periodic check; it never loses an event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Protocol

import structlog

Changes = Mapping[str, int]
"""Job id -> that job's last event `seq` after a commit."""

Listener = Callable[[Changes | None], None]
"""Called with the changes another (or this) process published, or with None when
notifications may have been missed (a reconnect): then anything may have changed."""

log = structlog.get_logger("jobgate.bus")

# Notification payloads stay far below PostgreSQL's 8000-byte limit.
MAX_PAYLOAD_BYTES = 7000
ORIGIN_MARK = "~"


class EventBus(Protocol):
    """Wakes event streams in every API process when jobs gain events."""

    def publish(self, changes: Changes) -> None:
        """Announce committed changes. Never blocks and never raises: delivery happens
        in the background, and a bus that is down drops nothing the store holds."""

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` for every announcement, from the event loop (before `start`)."""

    async def start(self) -> None:
        """Connect (and keep reconnecting in the background)."""

    async def ping(self) -> float:
        """Round-trip the backend; the latency in milliseconds (raises when down)."""

    async def aclose(self) -> None:
        """Stop; sends still queued are dropped (the store has the events)."""


def merge(into: dict[str, int], changes: Changes) -> None:
    """Fold `changes` into `into`, keeping each job's highest `seq`."""
    for job_id, seq in changes.items():
        if seq > into.get(job_id, 0):
            into[job_id] = seq


def encode(changes: Changes, origin: str = "") -> list[str]:
    """`changes` as payloads of `job_id:seq,...`, each under `MAX_PAYLOAD_BYTES`; with
    an `origin`, each payload starts with `~origin,` (see `origin_of`)."""
    payloads: list[str] = []
    head = [f"{ORIGIN_MARK}{origin}"] if origin else []
    parts: list[str] = list(head)
    size = sum(len(part) + 1 for part in parts)
    for job_id, seq in changes.items():
        part = f"{job_id}:{seq}"
        if len(parts) > len(head) and size + len(part) + 1 > MAX_PAYLOAD_BYTES:
            payloads.append(",".join(parts))
            parts = list(head)
            size = sum(len(p) + 1 for p in parts)
        parts.append(part)
        size += len(part) + 1
    if len(parts) > len(head):
        payloads.append(",".join(parts))
    return payloads


def origin_of(payload: str) -> str | None:
    """The origin `encode` put in front of `payload`, if any. A bus hands its own
    process's changes to its listeners at once (`Listeners.soon`), so it ignores its
    own payloads when the server echoes them back. Older decoders skip the part as
    malformed."""
    if not payload.startswith(ORIGIN_MARK):
        return None
    return payload[len(ORIGIN_MARK) :].split(",", 1)[0]


def decode(payload: str) -> dict[str, int]:
    """The changes in one payload; malformed parts are skipped (a wake-up is a hint)."""
    changes: dict[str, int] = {}
    for part in payload.split(","):
        job_id, _, seq = part.rpartition(":")
        if job_id and seq.isdigit():
            number = int(seq)
            if number > changes.get(job_id, 0):
                changes[job_id] = number
    return changes


class Listeners:
    """The subscribed listeners, called one by one; one that raises cannot stop the rest."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def add(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def soon(self, changes: Changes) -> None:
        """Call the listeners with `changes` on the event loop, soon after (not from
        inside the publisher's call): this process's streams need no server's echo."""
        if not self._listeners:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop, so no stream to wake
            return
        loop.call_soon(self, dict(changes))

    def __call__(self, changes: Changes | None) -> None:
        for listener in self._listeners:
            try:
                listener(changes)
            except Exception:  # a listener's bug must not stop delivery to the others
                log.exception("bus_listener_failed")
