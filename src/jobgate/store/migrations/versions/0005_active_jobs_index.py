"""An index of each owner's queued and running jobs, for the active-jobs cap.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As in `jobgate.store.tables`, written out: a migration must not change with the code.
ACTIVE_JOBS = "status IN ('queued', 'running')"


def upgrade() -> None:
    op.create_index(
        "ix_jobs_owner_active",
        "jobs",
        ["owner"],
        postgresql_where=sa.text(ACTIVE_JOBS),
        sqlite_where=sa.text(ACTIVE_JOBS),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_active", table_name="jobs")
