"""Idempotency keys: the same key from the same owner within the TTL replays the first answer.

A key is per owner: another owner's identical key is unrelated. The key row is written
in the same transaction as the jobs it names, so a key never points at jobs that were
rolled back, and jobs never exist without their key. Two concurrent requests with one
key race on the primary key: the loser's insert fails (`IntegrityError`) and its
transaction rolls back; retrying it finds the winner's row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.store.tables import idempotency_keys

MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Remembered:
    """What a key was first used for."""

    request_hash: str
    job_ids: list[str]
    created_at: float


def request_hash(kind: str, body: Any) -> str:
    """A stable digest of a request: its kind (route) and its canonical JSON body."""
    text = json.dumps([kind, body], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


async def lookup(
    conn: AsyncConnection, *, owner: str, key: str, at: float, ttl_s: float
) -> Remembered | None:
    """The live record of `key` for `owner`, or None (never used, or expired)."""
    row = (
        await conn.execute(
            select(
                idempotency_keys.c.request_hash,
                idempotency_keys.c.job_ids,
                idempotency_keys.c.created_at,
            ).where(idempotency_keys.c.owner == owner, idempotency_keys.c.key == key)
        )
    ).first()
    if row is None or row.created_at <= at - ttl_s:
        return None
    return Remembered(
        request_hash=row.request_hash, job_ids=list(row.job_ids), created_at=row.created_at
    )


async def remember(
    conn: AsyncConnection,
    *,
    owner: str,
    key: str,
    request_hash: str,
    job_ids: list[str],
    at: float,
    ttl_s: float,
) -> None:
    """Record `key` for `owner`, replacing an expired record of it.

    Raises:
        sqlalchemy.exc.IntegrityError: a live record of the key exists (a concurrent
            request won the race); retry the transaction.
    """
    await conn.execute(
        delete(idempotency_keys).where(
            idempotency_keys.c.owner == owner,
            idempotency_keys.c.key == key,
            idempotency_keys.c.created_at <= at - ttl_s,
        )
    )
    await conn.execute(
        insert(idempotency_keys).values(
            owner=owner, key=key, request_hash=request_hash, job_ids=job_ids, created_at=at
        )
    )


async def purge(conn: AsyncConnection, *, before: float) -> int:
    """Delete every record created before `before`; how many went."""
    result = await conn.execute(
        delete(idempotency_keys).where(idempotency_keys.c.created_at < before)
    )
    return int(result.rowcount or 0)
