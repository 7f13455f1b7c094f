"""Ids and times: UUIDv7s as RFC 9562 lays them out; RFC 3339 text of epoch times."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from jobgate.ids import parse_rfc3339, rfc3339, uuid7


def test_uuid7_is_a_version_7_uuid_that_starts_with_the_time() -> None:
    before = time.time_ns() // 1_000_000
    ids = [uuid7() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert before <= parsed.int >> 80 <= after
    assert ids == sorted(ids, key=lambda text: uuid.UUID(text).int >> 80)
    # 74 random bits: every one of them takes both values over 2,000 ids.
    random_bits = [
        uuid.UUID(t).int & ~(((1 << 48) - 1) << 80 | 0xF << 76 | 0b11 << 62) for t in ids
    ]
    seen_set = 0
    seen_clear = 0
    for bits in random_bits:
        seen_set |= bits
        seen_clear |= ~bits
    mask = ((1 << 12) - 1) << 64 | ((1 << 62) - 1)
    assert seen_set & mask == mask
    assert seen_clear & mask == mask


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_rfc3339_is_datetimes_own_text_in_utc(epoch: float) -> None:
    expected = datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds")
    assert rfc3339(epoch) == expected.replace("+00:00", "Z")
    assert rfc3339(epoch) == rfc3339(epoch)  # the cached answer is the same
    assert abs(parse_rfc3339(rfc3339(epoch) or "") - epoch) < 0.001


def test_rfc3339_of_none_is_none() -> None:
    assert rfc3339(None) is None


def test_uuid7_in_a_forked_child_differs_from_its_parent() -> None:
    """The child does not reuse random bytes the parent drew but has not yet spent."""
    uuid7()  # the parent now holds unspent random bytes
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send its next id's random part, then leave at once
        os.write(write, uuid7().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent = uuid7()
    assert uuid.UUID(child).int & (1 << 74) - 1 != uuid.UUID(parent).int & (1 << 74) - 1


def test_rfc3339_shows_times_outside_years_1_to_9999_at_the_nearest_end() -> None:
    """No `datetime` holds them; they are shown, not refused with an error."""
    assert rfc3339(253_402_387_139.0) == "9999-12-31T23:59:59.000Z"
    assert rfc3339(1e300) == "9999-12-31T23:59:59.000Z"
    assert rfc3339(-1e300) == "0001-01-01T00:00:00.000Z"
