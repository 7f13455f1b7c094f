"""The outbox relay's statements on PostgreSQL's generic plans: they run on
`Database.autocommit()` connections, which always use them, so none may scan the outbox
whole however many tokens wait in it."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import insert, text

from jobgate.store import Database
from jobgate.store.tables import outbox
from jobgate.transport import outbox as relay
from tests.engine.plans import generic_plans

pytestmark = pytest.mark.service("postgres")


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_relay_statements_use_indexes_on_the_generic_plan(database: Database) -> None:
    at = time.time()
    rows = [
        {"queue": "default", "available_at": at + (60 if n % 10 else -1)} for n in range(20_000)
    ]
    async with database.write() as conn:
        await conn.execute(insert(outbox), rows)
        await conn.execute(text("ANALYZE outbox"))
    statements = {
        "take": (relay._TAKE, f"{at}, {at + 30}, {relay.BATCH}"),
        "put back": (relay._PUT_BACK, f"ARRAY[1, 2, 3]::bigint[], {at}"),
        "delete": (relay._DELETE, "ARRAY[1, 2, 3]::bigint[]"),
    }
    for name, plan in (await generic_plans(database, statements)).items():
        assert "Seq Scan" not in plan, (name, plan)
