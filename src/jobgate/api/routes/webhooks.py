"""Webhooks: the caller's signing secret, and each job's delivery log and redelivery.

The secret is the caller's own (one per owner, made on first use); reading it needs
the role that may submit jobs, since it lets one sign webhooks. A job's deliveries are
scoped like the job: another owner's job is 404, exactly like an unknown one.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.api.deps import CurrentPrincipal, StateDep
from jobgate.api.models import WebhookDelivery, WebhookDeliveryList, WebhookSecret
from jobgate.api.schemas import problem_responses
from jobgate.errors import NotFound
from jobgate.ids import now
from jobgate.store import views
from jobgate.store.repositories import jobs as job_repo
from jobgate.store.repositories import webhooks as webhook_repo
from jobgate.webhooks import signing

router = APIRouter(tags=["webhooks"])

ROTATION_OVERLAP_S = 86_400.0
"""How long a rotated-out secret still signs deliveries, next to the new one."""


@router.get(
    "/v1/webhooks/secret",
    response_model=WebhookSecret,
    summary="The caller's webhook signing secret",
    responses=problem_responses(401, 403),
)
async def get_secret(state: StateDep, principal: CurrentPrincipal) -> dict[str, str]:
    """The secret deliveries of the caller's jobs are signed with (made on first use)."""
    principal.require_write()
    async with state.db.read() as conn:
        key = await webhook_repo.current_secret(conn, principal.id)
    if key is None:
        async with state.db.write() as conn:
            key = await webhook_repo.ensure_secret(
                conn, principal.id, new_key=signing.new_secret(), at=now()
            )
    return {"key": key}


@router.post(
    "/v1/webhooks/secret/rotate",
    response_model=WebhookSecret,
    summary="Rotate the caller's webhook signing secret",
    responses=problem_responses(401, 403),
)
async def rotate_secret(state: StateDep, principal: CurrentPrincipal) -> dict[str, str]:
    """A new secret; for 24 h deliveries carry a signature with the old one too."""
    principal.require_write()
    async with state.db.write() as conn:
        key = await webhook_repo.rotate_secret(
            conn,
            principal.id,
            new_key=signing.new_secret(),
            at=now(),
            overlap_s=ROTATION_OVERLAP_S,
        )
    return {"key": key}


@router.get(
    "/v1/jobs/{job_id}/webhooks",
    response_model=WebhookDeliveryList,
    summary="A job's webhook deliveries",
    responses=problem_responses(401, 404),
)
async def list_deliveries(
    job_id: str, state: StateDep, principal: CurrentPrincipal
) -> dict[str, Any]:
    """Every delivery of the job, oldest first, with what its last attempt came to."""
    async with state.db.read() as conn:
        await _check_job(conn, job_id, principal.owner_filter())
        rows = await webhook_repo.for_job(conn, job_id)
    return {"deliveries": [views.webhook_delivery(row) for row in rows]}


@router.post(
    "/v1/jobs/{job_id}/webhooks/{delivery_id}/redeliver",
    status_code=202,
    response_model=WebhookDelivery,
    summary="Send a webhook delivery again",
    responses=problem_responses(401, 403, 404),
)
async def redeliver(
    job_id: str, delivery_id: str, state: StateDep, principal: CurrentPrincipal
) -> dict[str, Any]:
    """Queue the delivery again, due now: same `webhook-id`, same body."""
    principal.require_write()
    async with state.db.write() as conn:
        await _check_job(conn, job_id, principal.owner_filter())
        row = await webhook_repo.redeliver(conn, job_id, delivery_id, at=now())
    return views.webhook_delivery(row)


async def _check_job(conn: AsyncConnection, job_id: str, owner: str | None) -> None:
    """Raise `NotFound` unless the job exists and (for a non-admin) is the caller's."""
    if not await job_repo.owned_ids(conn, [job_id], owner):
        raise NotFound(f"no job {job_id!r}")
