"""The reads of live streams on PostgreSQL's generic plans: `Database.autocommit()`
connections always use them, so none may scan the event log or the jobs."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from jobgate.api import streams
from jobgate.ids import now, uuid7
from jobgate.pipelines import Registry
from jobgate.store import Database, pg
from jobgate.store.repositories import events as event_repo
from jobgate.store.repositories import jobs as job_repo
from tests.engine.plans import generic_plans

pytestmark = pytest.mark.service("postgres")
REGISTRY = Registry.from_paths([])


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


def _prepared(statement: Any, values: dict[str, Any]) -> tuple[str, str]:
    """(SQL, `EXECUTE` arguments) of a statement built once (`pg.fetch`)."""
    plan = pg._plan(statement)
    args = [plan.fixed[name] if name in plan.fixed else values[name] for name in plan.names]
    return plan.sql, ", ".join(_literal(arg) for arg in args)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_stream_reads_use_indexes_on_the_generic_plan(database: Database) -> None:
    """With thousands of jobs and events from many owners, a global stream's page (with
    and without its proof of wholeness, for everyone or one owner) and a job's page
    read by index: no sequential scan in PostgreSQL's generic plan."""
    new = [
        job_repo.NewJob(
            id=uuid7(),
            pipeline=REGISTRY.get("noop"),
            owner=f"owner-{n % 50}",
            params={},
            files=[],
            priority=0,
            budget_usd=1.0,
            estimated_usd=0.0,
        )
        for n in range(3000)
    ]
    async with database.write() as conn:
        for start in range(0, len(new), 500):
            await job_repo.create(conn, new[start : start + 500], at=now())
        await conn.execute(text("ANALYZE"))
    owner = "owner-7"
    statements = {
        "whole page": (streams._WHOLE_PAGES[False], "100"),
        "whole page, one owner": (streams._WHOLE_PAGES[True], f"100, '{owner}'"),
        "job page": _prepared(event_repo._PAGE, {"job_id": new[5].id, "after": 0, "limit": 100}),
    }
    for (bounded, owned), query in streams._GLOBAL_PAGES.items():
        values = {"after": 100, "bound": 700, "owner": owner}
        statements[f"global page, bounded={bounded}, owned={owned}"] = _prepared(query, values)
    for name, plan in (await generic_plans(database, statements)).items():
        assert "Seq Scan" not in plan, (name, plan)
