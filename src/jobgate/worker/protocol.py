"""The line protocol between a `ProcessPool` and its children: one JSON object a line.

Kept apart (and small) so that both sides import it without the rest of the worker.
"""

from __future__ import annotations

import json
from typing import Any


def encode(message: dict[str, Any]) -> str:
    """One message as a line; ASCII-only JSON, so a line never holds a raw newline."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=True) + "\n"


def decode(line: str | bytes) -> dict[str, Any]:
    """The message a line holds (an object, or `ValueError`)."""
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("a protocol message must be a JSON object")
    return value
