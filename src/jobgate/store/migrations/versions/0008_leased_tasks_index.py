"""Only leased tasks are in the lease-expiry index.

The sweeper looks for leases that ran out (`lease_expires_at < now`); a waiting
task has no lease, yet every submitted task wrote a NULL entry into the index, and
a task handed back wrote another. A partial index of the leased tasks alone answers
the same query (a comparison is never true of NULL) for one index write less a task.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As in `jobgate.store.tables`, written out: a migration must not change with the code.
LEASED_TASK = "lease_expires_at IS NOT NULL"
NAME = "ix_tasks_lease_expires_at"


def upgrade() -> None:
    op.drop_index(NAME, table_name="tasks")
    op.create_index(
        NAME,
        "tasks",
        ["lease_expires_at"],
        postgresql_where=sa.text(LEASED_TASK),
        sqlite_where=sa.text(LEASED_TASK),
    )


def downgrade() -> None:
    op.drop_index(NAME, table_name="tasks")
    op.create_index(NAME, "tasks", ["lease_expires_at"])
