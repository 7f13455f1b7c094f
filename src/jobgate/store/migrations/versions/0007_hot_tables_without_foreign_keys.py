"""Stages, tasks and events reference their job without a foreign key.

Every submit writes a job with its stages, first events and first tasks in one
statement, and every outcome appends events: PostgreSQL checked each of those rows'
job with a trigger (a locking read of `jobs` per row), about a third of a batch
submit's time in the database. The code writes a job's rows in the job's own
transaction and never deletes a job, so the constraint guarded nothing the code can
do (docs/performance.md, "Rows without foreign keys").

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("stages", "tasks", "events")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"fk_{table}_job_id_jobs", type_="foreignkey")


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.create_foreign_key(
                f"fk_{table}_job_id_jobs", "jobs", ["job_id"], ["id"], ondelete="CASCADE"
            )
