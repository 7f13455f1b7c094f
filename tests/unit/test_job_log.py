"""`JobLog`: the tail of a job's log that its streams share, and when it may answer."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from jobgate.api.streams import JobLog


def _rows(first: int, last: int) -> list[dict[str, Any]]:
    return [{"seq": n, "type": "progress", "data": {}} for n in range(first, last + 1)]


def test_it_answers_only_what_it_knows_up_to_the_newest_announced() -> None:
    log = JobLog()
    assert log.after(0) is None  # nothing read yet: ask the store
    log.keep(_rows(1, 5), complete=True)
    assert [r["seq"] for r in log.after(2) or []] == [3, 4, 5]
    assert log.after(5) == []
    log.latest = 7  # the bus announced 6 and 7: the cache cannot say
    assert log.after(5) is None
    log.keep(_rows(6, 7), complete=True)
    assert [r["seq"] for r in log.after(5) or []] == [6, 7]
    assert log.after(0) is not None


def test_a_reconnected_bus_makes_it_ask_the_store_again() -> None:
    log = JobLog()
    log.keep(_rows(1, 3), complete=True)
    log.stale = True
    assert log.after(3) is None
    log.keep([], complete=True)
    assert log.after(3) == []


def test_a_read_far_behind_replaces_the_cache_and_one_overlapping_extends_it() -> None:
    log = JobLog()
    log.keep(_rows(50, 60), complete=True)
    log.keep(_rows(1, 10), complete=False)  # a stream resumed from far back
    assert [r["seq"] for r in log.rows] == list(range(1, 11))
    log.keep(_rows(5, 12), complete=True)
    assert [r["seq"] for r in log.rows] == list(range(1, 13))


@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 600)), max_size=30))
def test_cached_rows_are_always_one_run_of_consecutive_numbers(
    reads: list[tuple[int, int]],
) -> None:
    log = JobLog()
    for after, count in reads:
        log.keep(_rows(after + 1, after + count), complete=True)
        seqs = [r["seq"] for r in log.rows]
        assert len(seqs) <= 1000
        if seqs:
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
