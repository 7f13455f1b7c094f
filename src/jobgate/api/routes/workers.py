"""`GET /v1/workers` (admin): the live worker processes (docs/liveness.md)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import select

from jobgate.api.deps import CurrentPrincipal, StateDep
from jobgate.api.schemas import WorkerList, WorkerView, problem_responses
from jobgate.ids import now, rfc3339
from jobgate.store.repositories import workers as worker_repo
from jobgate.store.tables import workers

router = APIRouter(prefix="/v1/workers", tags=["admin"])


def worker_view(row: Any) -> WorkerView:
    """A `workers` row as the API shows it."""
    return WorkerView(
        id=row["id"],
        host=row["host"],
        pid=row["pid"],
        queues=list(row["queues"]),
        pipelines=list(row["pipelines"]),
        concurrency=row["concurrency"],
        running=row["running"],
        started_at=rfc3339(row["started_at"]) or "",
        last_seen_at=rfc3339(row["last_seen_at"]) or "",
    )


@router.get("", response_model=WorkerList, responses=problem_responses(401, 403))
async def list_workers(state: StateDep, principal: CurrentPrincipal) -> WorkerList:
    """Live workers: heartbeat within `JOBGATE_WORKER_LOST_AFTER_S`, or (PostgreSQL)
    LISTEN connection open and heartbeat within `JOBGATE_WORKER_HEARTBEAT_S` more."""
    principal.require_admin()
    alive = worker_repo.is_live(
        dialect=state.db.dialect,
        at=now(),
        lost_after_s=state.settings.worker_lost_after_s,
        heartbeat_s=state.settings.worker_heartbeat_s,
    )
    async with state.db.read() as conn:
        rows = (
            await conn.execute(
                select(workers).where(alive).order_by(workers.c.started_at, workers.c.id)
            )
        ).mappings()
        return WorkerList(workers=[worker_view(row) for row in rows])
