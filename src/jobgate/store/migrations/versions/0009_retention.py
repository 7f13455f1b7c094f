"""Retention: finished jobs may be purged, and blobs nothing refers to collected.

Blobs get the garbage collector's mark (when first seen unreferenced, and the file's
stamp then); artifacts get an index on their blob, which the collector asks about, and
upload grants one on their age, which retention purges by; `purged_usage` keeps what
purged jobs had cost, per owner and month.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.add_column(sa.Column("gc_marked_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("gc_stamp", sa.BigInteger(), nullable=True))
    op.create_index("ix_artifacts_sha256", "artifacts", ["sha256"])
    op.create_index("ix_blob_grants_created_at", "blob_grants", ["created_at"])
    op.create_table(
        "purged_usage",
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("month", sa.Float(), nullable=False),
        sa.Column("jobs", sa.BigInteger(), nullable=False),
        sa.Column("spent_usd", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("owner", "month", name="pk_purged_usage"),
    )


def downgrade() -> None:
    op.drop_table("purged_usage")
    op.drop_index("ix_blob_grants_created_at", table_name="blob_grants")
    op.drop_index("ix_artifacts_sha256", table_name="artifacts")
    with op.batch_alter_table("blobs") as batch:
        batch.drop_column("gc_stamp")
        batch.drop_column("gc_marked_at")
