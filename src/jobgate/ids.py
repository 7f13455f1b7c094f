"""Sortable ids and clock helpers."""

from __future__ import annotations

import functools
import os
import time
from datetime import UTC, datetime


def uuid7() -> str:
    """A UUIDv7 (RFC 9562) as a string: time-ordered, 74 random bits."""
    value = bytearray((time.time_ns() // 1_000_000).to_bytes(6, "big"))
    value += os.urandom(10)
    value[6] = 0x70 | (value[6] & 0x0F)  # version 7
    value[8] = 0x80 | (value[8] & 0x3F)  # variant 0b10
    digits = value.hex()
    return "-".join((digits[:8], digits[8:12], digits[12:16], digits[16:20], digits[20:]))


def now() -> float:
    """Seconds since the epoch: how the store keeps every time."""
    return time.time()


def rfc3339(epoch: float | None) -> str | None:
    """An epoch time as RFC 3339 UTC with milliseconds, or None."""
    return None if epoch is None else _rfc3339(epoch)


# The jobs of one submit share their times: a batch's answer formats one time 100 times.
@functools.lru_cache(maxsize=4096)
def _rfc3339(epoch: float) -> str:
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
