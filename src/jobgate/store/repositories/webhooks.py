"""Webhook deliveries and signing secrets.

A delivery is queued by `queue`, in the transaction that writes the job's terminal
event, so a finished job's webhook is never lost and never sent for a rolled-back end.
Senders `claim` due deliveries: the claim counts the attempt and pushes
`next_attempt_at` one lease ahead, so a sender that dies mid-send leaves a delivery
that falls due again by itself. Outcomes are `record`ed only by the claim that is
still current (its `attempts` count), so a sender whose lease lapsed writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, String, bindparam, delete, insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.errors import NotFound
from jobgate.ids import rfc3339, uuid7
from jobgate.store import pg, views
from jobgate.store.repositories import jobs as job_repo
from jobgate.store.tables import webhook_deliveries as deliveries
from jobgate.store.tables import webhook_secrets as secrets

EVENT_OF_STATUS = {"succeeded": "completed", "failed": "error", "cancelled": "cancelled"}
"""A job's terminal status, and the event (and webhook event type) that announces it."""

QUEUED = "jobgate_webhook_queued"
"""Set in a connection's `info` when its transaction queued a delivery; whoever watches
the pool's check-ins (the sender) knows then, after the commit, to look at once."""

STATUSES = ("pending", "succeeded", "failed", "dead")
MAX_ERROR_CHARS = 500
# pg_advisory_xact_lock(class, key): "jgwh", and the owner's hash, serialise the
# creation and rotation of one owner's secrets across processes.
_SECRET_LOCK_CLASS = 0x6A677768

_INSERT = insert(deliveries)


@dataclass(frozen=True)
class Due:
    """A claimed delivery: what to send, where, signed with which secrets.

    `attempts` is the count this claim made; `record` writes only while it is current.
    """

    id: str
    job_id: str
    owner: str
    url: str
    payload: str
    attempts: int
    round_attempts: int
    secrets: tuple[str, ...]


def new_id() -> str:
    """A delivery id (`webhook-id`): `msg_` and a UUIDv7's hex, sortable by creation."""
    return "msg_" + uuid7().replace("-", "")


async def queue(
    conn: AsyncConnection,
    job_id: str,
    status: str,
    webhook: Mapping[str, Any] | None,
    *,
    at: float,
) -> str | None:
    """Queue the delivery announcing that job `job_id` ended `status`, if its webhook
    asked for that event; call it after the job's row and terminal event are written.

    Returns:
        The delivery's id, or None when none is due.
    """
    event = EVENT_OF_STATUS.get(status)
    if not webhook or event is None or event not in webhook.get("events", ()):
        return None
    (snapshot,) = await job_repo.load(conn, [job_id])
    body = {"type": event, "timestamp": rfc3339(at), "data": {"job": views.job(snapshot)}}
    delivery_id = new_id()
    await conn.execute(
        _INSERT,
        {
            "id": delivery_id,
            "job_id": job_id,
            "owner": snapshot.job["owner"],
            "event": event,
            "url": str(webhook["url"]),
            # Stored as text, not JSON: every attempt must send (and sign) the same bytes.
            "payload": json.dumps(body, separators=(",", ":"), ensure_ascii=False),
            "status": "pending",
            "attempts": 0,
            "round_attempts": 0,
            "next_attempt_at": at,
            "created_at": at,
            "updated_at": at,
        },
    )
    conn.info[QUEUED] = True
    return delivery_id


async def claim(
    conn: AsyncConnection,
    *,
    at: float,
    lease_s: float,
    limit: int,
    new_key: Callable[[], str],
) -> list[Due]:
    """Take up to `limit` due deliveries for `lease_s` seconds, counting their attempt.

    Rows another sender is claiming right now are skipped (PostgreSQL `SKIP LOCKED`;
    SQLite has one writer), so two senders never hold one delivery at once. An owner
    without a secret yet gets one made by `new_key`.
    """
    rows = (
        await conn.execute(
            select(
                deliveries.c.id,
                deliveries.c.job_id,
                deliveries.c.owner,
                deliveries.c.url,
                deliveries.c.payload,
                deliveries.c.attempts,
                deliveries.c.round_attempts,
            )
            .where(deliveries.c.status == "pending", deliveries.c.next_attempt_at <= at)
            .order_by(deliveries.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ).all()
    if not rows:
        return []
    await conn.execute(
        update(deliveries)
        .where(deliveries.c.id.in_([row.id for row in rows]))
        .values(
            attempts=deliveries.c.attempts + 1,
            round_attempts=deliveries.c.round_attempts + 1,
            next_attempt_at=at + lease_s,
            updated_at=at,
        )
    )
    owners = {row.owner for row in rows}
    keys = await signing_secrets(conn, owners, at=at)
    for owner in owners - keys.keys():
        keys[owner] = [await ensure_secret(conn, owner, new_key=new_key(), at=at)]
    return [
        Due(
            id=row.id,
            job_id=row.job_id,
            owner=row.owner,
            url=row.url,
            payload=row.payload,
            attempts=row.attempts + 1,
            round_attempts=row.round_attempts + 1,
            secrets=tuple(keys.get(row.owner, ())),
        )
        for row in rows
    ]


_RECORD = (
    update(deliveries)
    .where(
        deliveries.c.id == bindparam("b_id", type_=String),
        deliveries.c.attempts == bindparam("b_attempts", type_=Integer),
        deliveries.c.status == "pending",
    )
    .returning(deliveries.c.id)
)


async def record(
    conn: AsyncConnection,
    due: Due,
    *,
    status: str,
    at: float,
    status_code: int | None,
    error: str | None,
    next_attempt_at: float | None = None,
) -> bool:
    """Write an attempt's outcome: `status` (pending again for a retry at
    `next_attempt_at`, or succeeded, failed, dead).

    Returns:
        False when the claim is no longer current (its lease lapsed and another sender
        claimed the delivery, or it was redelivered): nothing was written.
    """
    values: dict[str, Any] = {
        "status": status,
        "next_attempt_at": next_attempt_at if status == "pending" else None,
        "last_status_code": status_code,
        "last_error": error[:MAX_ERROR_CHARS] if error else None,
        "updated_at": at,
    }
    if status == "succeeded":
        values["delivered_at"] = at
    written = await conn.execute(
        _RECORD.values(**values), {"b_id": due.id, "b_attempts": due.attempts}
    )
    return written.first() is not None


async def for_job(conn: AsyncConnection, job_id: str) -> list[RowMapping]:
    """A job's deliveries, oldest first."""
    rows = await conn.execute(
        select(deliveries)
        .where(deliveries.c.job_id == job_id)
        .order_by(deliveries.c.created_at, deliveries.c.id)
    )
    return list(rows.mappings())


async def redeliver(
    conn: AsyncConnection, job_id: str, delivery_id: str, *, at: float
) -> RowMapping:
    """Queue a delivery of job `job_id` again, due now: same id, same body; its attempt
    count goes on, and it gets a new round of retries.

    Raises:
        NotFound: the job has no such delivery.
    """
    row = (
        (
            await conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id, deliveries.c.job_id == job_id)
                .values(status="pending", round_attempts=0, next_attempt_at=at, updated_at=at)
                .returning(*deliveries.c)
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"job {job_id} has no webhook delivery {delivery_id!r}")
    conn.info[QUEUED] = True
    return row


# -- secrets -------------------------------------------------------------------------


async def current_secret(conn: AsyncConnection, owner: str) -> str | None:
    """The owner's current secret (the one new deliveries are signed with first)."""
    key = await conn.scalar(
        select(secrets.c.key)
        .where(secrets.c.owner == owner, secrets.c.expires_at.is_(None))
        .order_by(secrets.c.created_at.desc())
        .limit(1)
    )
    return str(key) if key is not None else None


async def ensure_secret(conn: AsyncConnection, owner: str, *, new_key: str, at: float) -> str:
    """The owner's current secret, made from `new_key` if it has none (write transaction)."""
    await pg.lock_key(conn, _SECRET_LOCK_CLASS, owner)
    key = await current_secret(conn, owner)
    if key is None:
        await conn.execute(insert(secrets).values(owner=owner, key=new_key, created_at=at))
        key = new_key
    return key


async def rotate_secret(
    conn: AsyncConnection, owner: str, *, new_key: str, at: float, overlap_s: float
) -> str:
    """Make `new_key` the owner's secret; the one it replaces still signs for `overlap_s`.

    A secret replaced by an earlier rotation is dropped now, whatever its time left, so
    at most two secrets sign a delivery. Returns `new_key`.
    """
    await pg.lock_key(conn, _SECRET_LOCK_CLASS, owner)
    await conn.execute(
        delete(secrets).where(secrets.c.owner == owner, secrets.c.expires_at.is_not(None))
    )
    await conn.execute(
        update(secrets)
        .where(secrets.c.owner == owner, secrets.c.expires_at.is_(None))
        .values(expires_at=at + overlap_s)
    )
    await conn.execute(insert(secrets).values(owner=owner, key=new_key, created_at=at))
    return new_key


async def signing_secrets(
    conn: AsyncConnection, owners: Sequence[str] | set[str], *, at: float
) -> dict[str, list[str]]:
    """Each owner's secrets that sign a delivery sent at `at`, newest first."""
    found: dict[str, list[str]] = {}
    rows = await conn.execute(
        select(secrets.c.owner, secrets.c.key)
        .where(
            secrets.c.owner.in_(list(owners)),
            secrets.c.expires_at.is_(None) | (secrets.c.expires_at > at),
        )
        .order_by(secrets.c.owner, secrets.c.created_at.desc())
    )
    for owner, key in rows:
        found.setdefault(owner, []).append(key)
    return found
