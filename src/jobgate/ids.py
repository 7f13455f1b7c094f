"""Sortable ids and clock helpers."""

from __future__ import annotations

import functools
import os
import time
from datetime import UTC, datetime

# The random part of ids comes from the OS's generator 256 ids at a time: a batch submit
# makes 100 ids, and one `getrandom` call each was 7 % of its CPU in the API process.
_POOL_IDS = 256
# Each pooled value: 74 random bits with the version (7) and variant (0b10) bits set.
_KEEP = (1 << 80) - 1 & ~(0xF << 76 | 0b11 << 62)
_VERSION_7_VARIANT_10 = 0x7 << 76 | 0b10 << 62
_pool: list[int] = []


def _fill_pool() -> None:
    drawn = os.urandom(10 * _POOL_IDS)
    values = [
        int.from_bytes(drawn[i : i + 10]) & _KEEP | _VERSION_7_VARIANT_10
        for i in range(0, len(drawn), 10)
    ]
    # `list.extend` and `list.pop` are atomic: no two threads take the same value.
    _pool.extend(values)


# A forked child must not hand out the values its parent has yet to use.
os.register_at_fork(after_in_child=_pool.clear)


def uuid7() -> str:
    """A UUIDv7 (RFC 9562) as a string: time-ordered, 74 random bits."""
    try:
        random_part = _pool.pop()
    except IndexError:
        _fill_pool()
        random_part = _pool.pop()
    digits = ((time.time_ns() // 1_000_000) << 80 | random_part).to_bytes(16).hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def now() -> float:
    """Seconds since the epoch: how the store keeps every time."""
    return time.time()


MIN_EPOCH = -62_135_596_800.0
"""0001-01-01T00:00:00Z, the earliest time a `datetime` holds, as epoch seconds."""

MAX_EPOCH = 253_402_300_799.0
"""9999-12-31T23:59:59Z, the latest whole second a `datetime` holds, as epoch seconds."""


def rfc3339(epoch: float | None) -> str | None:
    """An epoch time as RFC 3339 UTC with milliseconds, or None.

    A time outside years 1 to 9999 (which no `datetime` holds) is shown as the nearest
    end of that range: a row stored with one must not make its listing fail.
    """
    return None if epoch is None else _rfc3339(epoch)


# The jobs of one submit share their times: a batch's answer formats one time 100 times.
@functools.lru_cache(maxsize=4096)
def _rfc3339(epoch: float) -> str:
    if not MIN_EPOCH <= epoch <= MAX_EPOCH:
        epoch = MAX_EPOCH if epoch > 0 else MIN_EPOCH
    moment = datetime.fromtimestamp(epoch, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    """RFC 3339 text (or an epoch number) as epoch seconds; naive times are UTC."""
    try:
        return float(text)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "+"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def month_start(epoch: float) -> float:
    """The epoch seconds at which `epoch`'s calendar month (UTC) began."""
    day = datetime.fromtimestamp(epoch, UTC)
    return day.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
