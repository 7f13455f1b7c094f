"""Pages with their totals, read in one statement."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Table, func, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection


async def paged_total(
    conn: AsyncConnection,
    rows: Sequence[RowMapping],
    table: Table,
    conditions: Sequence[Any],
    offset: int,
) -> int:
    """How many rows match, given a page read with `count(*) OVER ()` as `total`.

    Read in the page's own statement, the count agrees with the page: two statements
    see two snapshots under READ COMMITTED, and rows committed between them made a
    `total` that contradicted its page. A page past the end has no row to carry it:
    then (only) it is counted apart.
    """
    if rows:
        return int(rows[0]["total"])
    if offset == 0:
        return 0
    counted = await conn.execute(select(func.count()).select_from(table).where(*conditions))
    return int(counted.scalar_one())


def without_total(row: Mapping[Any, Any]) -> dict[str, Any]:
    """`row` without the page's `total` column."""
    return {k: v for k, v in row.items() if k != "total"}
