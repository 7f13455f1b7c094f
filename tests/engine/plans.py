"""PostgreSQL's generic plans of prepared statements, as `Database.autocommit()`
connections run them (`plan_cache_mode = force_generic_plan`)."""

from __future__ import annotations

from typing import Any

from jobgate.store import Database


async def generic_plans(
    database: Database, statements: dict[str, tuple[str, str]]
) -> dict[str, str]:
    """Each statement's generic plan (`EXPLAIN EXECUTE`), by name. A statement is its
    SQL with `$n` parameters and the `EXECUTE` arguments to plan it with."""
    plans: dict[str, str] = {}
    driver = await database.engine.raw_connection()
    try:
        connection: Any = driver.driver_connection
        await connection.execute("SET plan_cache_mode = force_generic_plan")
        for name, (sql, args) in statements.items():
            async with connection.transaction():
                await connection.execute("PREPARE planned AS " + sql)
                rows = await connection.fetch(f"EXPLAIN EXECUTE planned({args})")
                await connection.execute("DEALLOCATE planned")
            plans[name] = "\n".join(row[0] for row in rows)
    finally:
        driver.close()
    return plans
