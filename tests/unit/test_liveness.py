"""When a sweeper declares a worker lost (docs/liveness.md), without a database."""

from __future__ import annotations

from jobgate.config import Settings
from jobgate.store.repositories.workers import Suspect, application_name
from jobgate.worker.liveness import Absences, Timings

TIMINGS = Timings.from_settings(Settings.model_construct())  # the defaults
AT = 1_000_000.0


def _gone(worker_id: str, seen_at: float) -> Suspect:
    return Suspect(worker_id, seen_at, connected=False)


def test_the_default_timings() -> None:
    """With the 15 s lost window: heartbeats every 60 s while connected, else every 5 s;
    a closed connection counts after 5 s, a heartbeat after 10 s."""
    assert (TIMINGS.heartbeat_s, TIMINGS.fast_heartbeat_s) == (60.0, 5.0)
    assert (TIMINGS.absent_grace_s, TIMINGS.beat_grace_s) == (5.0, 10.0)
    assert (TIMINGS.busy_check_s, TIMINGS.idle_check_s, TIMINGS.tick_s) == (2.0, 30.0, 2.0)
    assert TIMINGS.silent_after_s == 75.0


def test_a_worker_whose_connection_closed_is_lost_once_the_grace_has_passed() -> None:
    """Seen without a connection for `absent_grace_s`, last heartbeat older than
    `beat_grace_s`: lost; not before."""
    absences = Absences(TIMINGS)
    gone = _gone("w", AT - 40)
    assert absences.lost([gone], at=AT, own_id="me") == []
    assert absences.lost([gone], at=AT + 4, own_id="me") == []
    assert absences.lost([gone], at=AT + 5, own_id="me") == ["w"]


def test_a_worker_that_still_heartbeats_without_its_connection_is_not_lost() -> None:
    """A worker whose LISTEN connection is down heartbeats every 5 s: never lost."""
    absences = Absences(TIMINGS)
    for second in range(0, 60, 2):
        last_beat = AT + second - second % 5
        assert absences.lost([_gone("w", last_beat)], at=AT + second, own_id="me") == []


def test_a_killed_worker_that_had_just_heartbeat_is_lost_after_the_heartbeat_grace() -> None:
    """Its connection missed for long enough, but its heartbeat is recent: it waits for
    `beat_grace_s` after that heartbeat."""
    absences = Absences(TIMINGS)
    gone = _gone("w", AT)
    assert absences.lost([gone], at=AT + 1, own_id="me") == []
    assert absences.lost([gone], at=AT + 7, own_id="me") == []
    assert absences.lost([gone], at=AT + 10.5, own_id="me") == ["w"]


def test_a_reconnected_worker_starts_a_new_absence() -> None:
    """A connection back in time clears the absence: the grace counts again from the
    next time it is missing."""
    absences = Absences(TIMINGS)
    gone = _gone("w", AT - 40)
    absences.lost([gone], at=AT, own_id="me")
    assert absences.lost([], at=AT + 4, own_id="me") == []
    assert absences.lost([gone], at=AT + 6, own_id="me") == []
    assert absences.lost([gone], at=AT + 11, own_id="me") == ["w"]


def test_a_new_leader_waits_the_grace_before_trusting_missing_connections() -> None:
    """After a restart of PostgreSQL workers reconnect within the grace; a new leader
    (with no memory) does not take them for lost meanwhile."""
    absences = Absences(TIMINGS)
    gone = _gone("w", AT - 40)
    absences.lost([gone], at=AT, own_id="me")
    absences.reset()
    assert absences.lost([gone], at=AT + 5, own_id="me") == []


def test_a_long_silent_worker_is_lost_connected_or_not() -> None:
    """No heartbeat for `heartbeat_s + lost_after_s`: lost at once (hung, or its row
    outlived it)."""
    hung = Suspect("hung", AT - 76, connected=True)
    ghost = Suspect("ghost", AT - 76, connected=False)
    assert Absences(TIMINGS).lost([hung, ghost], at=AT, own_id="me") == ["hung", "ghost"]


def test_a_busy_worker_silent_past_the_grace_is_lost_though_connected() -> None:
    """A worker holding a lease renews (and is seen) twice a second: one unseen for the
    beat grace, watched that long for the absence grace, is lost with its connection
    still showing (a partition: the server keeps the session). One just claimed, not
    yet renewed, is spared by the watch; an idle connected worker is never suspect."""
    absences = Absences(TIMINGS)
    cut_off = Suspect("cut-off", AT - 11, connected=True, busy=True)
    idle = Suspect("idle", AT - 11, connected=True, busy=False)
    assert absences.lost([cut_off, idle], at=AT, own_id="me") == []  # watched from now
    assert absences.next_due() == AT + 5
    assert absences.lost([cut_off, idle], at=AT + 5, own_id="me") == ["cut-off"]
    renewed = Suspect("cut-off", AT + 4, connected=True, busy=True)
    fresh = Absences(TIMINGS)
    fresh.lost([cut_off], at=AT, own_id="me")
    assert fresh.lost([renewed], at=AT + 5, own_id="me") == []


def test_a_sweeper_never_declares_itself_lost() -> None:
    absences = Absences(TIMINGS)
    me = _gone("me", AT - 100)
    absences.lost([me], at=AT, own_id="me")
    assert absences.lost([me], at=AT + 10, own_id="me") == []


def test_application_names_fit_and_stay_apart() -> None:
    """63 bytes of printable ASCII at most; ids that would not survive are hashed."""
    assert application_name("host-12-abc") == "jobgate-worker:host-12-abc"
    long_ids = ["x" * 100 + "-1", "x" * 100 + "-2", "héllo", "h?llo"]
    names = [application_name(i) for i in long_ids]
    assert len(set(names)) == len(names)
    for name in names:
        assert name.isascii()
        assert name.isprintable()
        assert len(name) <= 63


def test_the_sweeper_knows_when_the_next_absent_worker_would_be_lost() -> None:
    """So it looks again right then, not at its next check."""
    absences = Absences(TIMINGS)
    assert absences.next_due() is None
    absences.lost([_gone("w", AT - 40), _gone("v", AT - 2)], at=AT, own_id="me")
    assert absences.next_due() == AT + 5  # "w": 5 s of absence; "v": 10 s after AT - 2
    absences.lost([_gone("v", AT - 2)], at=AT + 5, own_id="me")
    assert absences.next_due() == AT + 8
