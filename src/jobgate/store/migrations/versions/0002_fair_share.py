"""Fair share between owners: a per-owner clock and each job's place in it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "owner_clocks",
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("clock", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("owner", name="pk_owner_clocks"),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("fair_key", sa.Float(), nullable=True))
    # Existing jobs keep their arrival order.
    op.execute("UPDATE jobs SET fair_key = created_at")
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("fair_key", existing_type=sa.Float(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("fair_key")
    op.drop_table("owner_clocks")
