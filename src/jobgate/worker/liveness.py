"""When a worker counts as lost: the timings, and a sweeper's memory of absences.

The rules (docs/liveness.md explains them):

- On SQLite every worker heartbeats every `fast_heartbeat_s` and sweeps every
  `busy_check_s`; a worker silent for `lost_after_s` is lost.
- On PostgreSQL a worker's LISTEN connection vouches for it, so it heartbeats only every
  `heartbeat_s` while that connection is up (every `fast_heartbeat_s` while it is down).
  One worker, the leader, sweeps. It declares a worker lost when
  - its connection has been gone for `absent_grace_s`, as the leader saw it, and its
    last heartbeat is older than `beat_grace_s`; or
  - it holds a lease, the leader has seen it unseen for `beat_grace_s` for
    `absent_grace_s` (its lease renewals see it twice a second), connected or not (a
    worker cut off by a partition, whose session the server keeps); or
  - its last heartbeat is older than `silent_after_s`, connected or not (a hung worker).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from jobgate.config import Settings
from jobgate.store.repositories.workers import Suspect

# Without a single task there is nothing a lost worker could hold, so a leader that
# found the tasks table empty looks again after this long (or when a task is announced).
IDLE_CHECK_S = 30.0


@dataclass(frozen=True)
class Timings:
    """Every interval of heartbeating and sweeping, derived from the settings."""

    lost_after_s: float
    fast_heartbeat_s: float
    heartbeat_s: float
    absent_grace_s: float
    beat_grace_s: float
    silent_after_s: float
    busy_check_s: float
    idle_check_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Timings:
        lost_after = settings.worker_lost_after_s
        fast = max(0.2, min(5.0, lost_after / 3))
        heartbeat = max(fast, settings.worker_heartbeat_s)
        return cls(
            lost_after_s=lost_after,
            fast_heartbeat_s=fast,
            heartbeat_s=heartbeat,
            # Longer than a listener takes to reconnect (its backoff stops at 2 s), and
            # than the tick after which a worker that lost its listener heartbeats.
            absent_grace_s=lost_after / 3,
            # Two fast heartbeats: a worker whose listener is down but that still reaches
            # the database is never taken for lost.
            beat_grace_s=lost_after * 2 / 3,
            silent_after_s=heartbeat + lost_after,
            busy_check_s=settings.sweep_interval_s,
            idle_check_s=max(settings.sweep_interval_s, IDLE_CHECK_S),
        )

    @property
    def tick_s(self) -> float:
        """How often the maintenance loop looks at its clocks (no query by itself)."""
        return min(self.fast_heartbeat_s, self.busy_check_s)


class Absences:
    """A sweeper's memory of the workers it saw without a connection, and since when.

    A new leader starts with none, so it waits `absent_grace_s` before declaring a
    worker lost by its connection: after a PostgreSQL restart, workers reconnect within
    that grace.
    """

    def __init__(self, timings: Timings) -> None:
        self.timings = timings
        self._since: dict[str, float] = {}
        self._due: dict[str, float] = {}

    def reset(self) -> None:
        self._since.clear()
        self._due.clear()

    def next_due(self) -> float | None:
        """When the next worker seen absent would be lost if it stays away, if any: the
        sweeper looks again then rather than at its next check."""
        return min(self._due.values(), default=None)

    def lost(self, suspects: Iterable[Suspect], *, at: float, own_id: str) -> list[str]:
        """The suspects that are lost now, by the rules above."""
        rules = self.timings
        absent: dict[str, float] = {}
        due: dict[str, float] = {}
        found = []
        for suspect in suspects:
            if suspect.id == own_id:
                continue
            if suspect.last_seen_at < at - rules.silent_after_s:
                found.append(suspect.id)
                continue
            # A worker whose stages run renews their leases, and is seen, twice a
            # second: silent for longer, it is cut off or hung even if its connection
            # still shows (a partition drops packets; the server keeps the session).
            busy_and_silent = suspect.busy and suspect.last_seen_at < at - rules.beat_grace_s
            if suspect.connected and not busy_and_silent:
                continue
            since = absent[suspect.id] = self._since.get(suspect.id, at)
            lost_at = max(since + rules.absent_grace_s, suspect.last_seen_at + rules.beat_grace_s)
            if at >= lost_at:
                found.append(suspect.id)
            else:
                due[suspect.id] = lost_at
        self._since, self._due = absent, due
        return found
