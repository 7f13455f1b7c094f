"""Claims read waiting tasks in order from a partial index of them alone.

The old index led with (queue, lease_token), so a claim that wants the best
`sort_key` of a queue could not read it in order: PostgreSQL sorted every waiting
task of the queue for each claim. Renewals and outcomes find tasks by id.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As in `jobgate.store.tables`, written out: a migration must not change with the code.
WAITING_TASK = "lease_token IS NULL"


def upgrade() -> None:
    op.create_index(
        "ix_tasks_ready",
        "tasks",
        ["queue", "sort_key", "id"],
        postgresql_where=sa.text(WAITING_TASK),
        sqlite_where=sa.text(WAITING_TASK),
    )
    op.drop_index("ix_tasks_queue_lease_token_sort_key", table_name="tasks")


def downgrade() -> None:
    op.create_index(
        "ix_tasks_queue_lease_token_sort_key", "tasks", ["queue", "lease_token", "sort_key"]
    )
    op.drop_index("ix_tasks_ready", table_name="tasks")
