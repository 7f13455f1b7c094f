"""`GET /v1/me`: who the caller is, the limits that apply to it, and its usage."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.api.deps import CurrentPrincipal, StateDep
from jobgate.api.schemas import Limits, Me, Usage, problem_responses
from jobgate.config import Settings
from jobgate.ids import month_start, now
from jobgate.store.repositories.jobs import ACTIVE
from jobgate.store.tables import jobs, purged_usage

router = APIRouter(prefix="/v1/me", tags=["identity"])


def limits_of(settings: Settings) -> Limits:
    """The limits every caller gets (per-user limits are settings-wide for now)."""
    return Limits(
        max_jobs_per_request=settings.max_jobs_per_request,
        max_upload_bytes=settings.max_upload_bytes,
        max_upload_parts=settings.max_upload_parts,
        job_budget_usd=settings.job_budget_usd,
        list_max_limit=settings.list_max_limit,
        sse_max_per_job=settings.sse_max_per_job,
        sse_max_per_user=settings.sse_max_per_user,
        max_active_jobs_per_user=settings.max_active_jobs_per_user or None,
        rate_limit_submit=settings.rate_limit_submit or None,
        monthly_budget_usd=settings.user_monthly_budget_usd or None,
    )


async def usage_of(conn: AsyncConnection, owner: str) -> Usage:
    """The owner's active jobs, all its jobs, and what they cost (in all, this month),
    the jobs purged by retention included."""
    active = func.sum(case((jobs.c.status.in_(sorted(ACTIVE)), 1), else_=0))
    this_month = jobs.c.created_at >= month_start(now())  # (purged jobs: `purged_usage`)
    month_spent = func.sum(case((this_month, jobs.c.actual_usd), else_=0.0))
    row = (
        await conn.execute(
            select(
                func.count().label("total"),
                func.coalesce(active, 0).label("active"),
                func.coalesce(func.sum(jobs.c.actual_usd), 0.0).label("spent"),
                func.coalesce(month_spent, 0.0).label("month_spent"),
            ).where(jobs.c.owner == owner)
        )
    ).one()
    month = month_start(now())
    purged_month = func.sum(case((purged_usage.c.month >= month, purged_usage.c.spent_usd)))
    purged = (
        await conn.execute(
            select(
                func.coalesce(func.sum(purged_usage.c.jobs), 0).label("total"),
                func.coalesce(func.sum(purged_usage.c.spent_usd), 0.0).label("spent"),
                func.coalesce(purged_month, 0.0).label("month_spent"),
            ).where(purged_usage.c.owner == owner)
        )
    ).one()
    return Usage(
        active_jobs=int(row.active),
        jobs_total=int(row.total) + int(purged.total),
        spent_usd=float(row.spent) + float(purged.spent),
        month_spent_usd=float(row.month_spent) + float(purged.month_spent),
    )


@router.get("", response_model=Me, responses=problem_responses(401))
async def me(state: StateDep, principal: CurrentPrincipal) -> Me:
    """The caller's id and roles, its limits and its usage."""
    async with state.db.read() as conn:
        usage = await usage_of(conn, principal.id)
    window = await state.limits.submit_window(principal.id)
    if window is not None:
        usage.submits_in_window = window.limit - window.remaining
        usage.submit_remaining = window.remaining
    return Me(
        id=principal.id,
        roles=sorted(principal.roles),
        limits=limits_of(state.settings),
        usage=usage,
    )
