"""Sortable ids and clock helpers."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime


def uuid7() -> str:
    """A UUIDv7 (RFC 9562) as a string: time-ordered, 74 random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    digits = f"{value:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def now() -> float:
    """Seconds since the epoch: how the store keeps every time."""
    return time.time()


def rfc3339(epoch: float | None) -> str | None:
    """An epoch time as RFC 3339 UTC with milliseconds, or None."""
    if epoch is None:
        return None
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
