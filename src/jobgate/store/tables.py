"""The tables: the single source of truth. Times are epoch seconds (float)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)
Json = JSON().with_variant(JSONB(), "postgresql")
ACTIVE_STATUSES = ("queued", "running")
ACTIVE_JOBS = "status IN ({})".format(", ".join(f"'{status}'" for status in ACTIVE_STATUSES))
"""A job that is not finished, as SQL (literal, so that a partial index matches it)."""
WAITING_TASK = "lease_token IS NULL"
"""A task no worker holds (it may still wait for its `available_at`)."""
LEASED_TASK = "lease_expires_at IS NOT NULL"
"""A task out on a lease: the sweeper's index holds only these."""
# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL wants 64 bits.
AutoId = BigInteger().with_variant(Integer(), "sqlite")

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("pipeline", String(64), nullable=False),
    Column("pipeline_version", String(64), nullable=False),
    Column("owner", String(255), nullable=False),
    Column("status", String(16), nullable=False),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("priority", Integer, nullable=False, default=0),
    Column("params", Json, nullable=False),
    Column("files", Json, nullable=False),
    Column("correlation_id", String(255)),
    Column("webhook", Json),
    Column("estimated_usd", Float, nullable=False, default=0.0),
    Column("actual_usd", Float, nullable=False, default=0.0),
    Column("budget_usd", Float, nullable=False),
    Column("progress", Float, nullable=False, default=0.0),
    Column("stage", String(64)),
    Column("result", Json),
    Column("error", Json),
    Column("records_expected", Integer, nullable=False, default=0),
    Column("records_succeeded", Integer, nullable=False, default=0),
    Column("records_failed", Integer, nullable=False, default=0),
    Column("last_seq", Integer, nullable=False, default=0),
    # The job's place in its owner's fair-share order (docs/scheduling.md).
    Column("fair_key", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Index(None, "owner", "created_at"),
    Index(None, "status", "created_at"),
    Index(None, "created_at"),
    # The active-jobs cap counts these; only queued and running jobs are in it.
    Index(
        "ix_jobs_owner_active",
        "owner",
        postgresql_where=text(ACTIVE_JOBS),
        sqlite_where=text(ACTIVE_JOBS),
    ),
)

# `stages`, `tasks` and `events` name their job without a foreign key: they are the rows
# every submit and outcome writes, a foreign key's check was a third of a batch submit's
# time in PostgreSQL, and the code writes them only in their job's transaction or for a
# job it holds (a job is deleted only by retention, with these rows, in one transaction
# holding the job: `store/repositories/retention.py`). docs/performance.md, "Rows
# without foreign keys".
stages = Table(
    "stages",
    metadata,
    Column("job_id", String(36), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempt", Integer, nullable=False, default=0),
    Column("progress", Float, nullable=False, default=0.0),
    Column("is_map", Boolean, nullable=False, default=False),
    Column("items_total", Integer, nullable=False, default=0),
    Column("items_succeeded", Integer, nullable=False, default=0),
    Column("items_failed", Integer, nullable=False, default=0),
    Column("output", Json),
    Column("error", Json),
    Column("started_at", Float),
    Column("finished_at", Float),
)

# One row per runnable unit: a stage, or one item of a map stage. A row exists while
# the unit waits or runs; its outcome is written to `stages` / `records` and the row goes.
tasks = Table(
    "tasks",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("job_id", String(36), nullable=False),
    Column("stage", String(64), nullable=False),
    Column("item_index", Integer),
    Column("queue", String(64), nullable=False),
    Column("owner", String(255), nullable=False),
    Column("pipeline", String(64), nullable=False),
    # The claim order: enqueue time minus priority x aging seconds (docs/scheduling.md).
    Column("sort_key", Float, nullable=False),
    Column("available_at", Float, nullable=False),
    Column("attempt", Integer, nullable=False, default=0),
    Column("deliveries", Integer, nullable=False, default=0),
    Column("leased_by", String(255)),
    Column("lease_token", String(36)),
    Column("lease_expires_at", Float),
    Column("created_at", Float, nullable=False),
    # Claims walk this in order: only tasks waiting to be claimed are in it.
    Index(
        "ix_tasks_ready",
        "queue",
        "sort_key",
        "id",
        postgresql_where=text(WAITING_TASK),
        sqlite_where=text(WAITING_TASK),
    ),
    Index(None, "job_id"),
    Index(
        None,
        "lease_expires_at",
        postgresql_where=text(LEASED_TASK),
        sqlite_where=text(LEASED_TASK),
    ),
)

records = Table(
    "records",
    metadata,
    Column("job_id", String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("stage", String(64), primary_key=True),
    Column("item_index", Integer, primary_key=True),
    Column("key", String(512), nullable=False),
    Column("status", String(16), nullable=False),
    Column("data", Json),
    Column("error", Json),
    Column("attempt", Integer, nullable=False, default=1),
    Column("created_at", Float, nullable=False),
)

events = Table(
    "events",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("job_id", String(36), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("type", String(32), nullable=False),
    Column("data", Json, nullable=False),
    Column("created_at", Float, nullable=False),
    Index(None, "job_id", "seq", unique=True),
)

blobs = Table(
    "blobs",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("content_type", String(255), nullable=False),
    Column("created_at", Float, nullable=False),
    # Garbage collection (store/repositories/retention.py): when the blob was first seen
    # unreferenced, and its file's stamp then; cleared whenever the blob is recorded again.
    Column("gc_marked_at", Float),
    Column("gc_stamp", BigInteger),
)

# Who may use a blob by its hash: its uploaders. Jobs grant access through their files.
blob_grants = Table(
    "blob_grants",
    metadata,
    Column("sha256", String(64), ForeignKey("blobs.sha256", ondelete="CASCADE"), primary_key=True),
    Column("owner", String(255), primary_key=True),
    Column("created_at", Float, nullable=False),
    Index(None, "created_at"),  # retention purges the oldest
)

artifacts = Table(
    "artifacts",
    metadata,
    Column("job_id", String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(255), primary_key=True),
    Column("sha256", String(64), ForeignKey("blobs.sha256"), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("content_type", String(255), nullable=False),
    Column("is_primary", Boolean, nullable=False, default=False),
    Column("stage", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Index(None, "sha256"),  # garbage collection asks whether any artifact is a blob's
)

# What the jobs purged by retention had cost, per owner and calendar month (UTC), so that
# usage and the monthly spend cap still count them.
purged_usage = Table(
    "purged_usage",
    metadata,
    Column("owner", String(255), primary_key=True),
    Column("month", Float, primary_key=True),
    Column("jobs", BigInteger, nullable=False),
    Column("spent_usd", Float, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("prefix", String(16), nullable=False, index=True),
    Column("key_hash", String(64), nullable=False),
    Column("name", String(255)),
    Column("owner", String(255), nullable=False),
    Column("roles", Json, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),
    Column("revoked_at", Float),
    Column("last_used_at", Float),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("owner", String(255), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("job_ids", Json, nullable=False),
    Column("created_at", Float, nullable=False, index=True),
)

# Each owner's fair-share clock: the virtual start time its next job gets.
owner_clocks = Table(
    "owner_clocks",
    metadata,
    Column("owner", String(255), primary_key=True),
    Column("clock", Float, nullable=False),
)

# Wake-up tokens waiting to be published to an external transport (the outbox): one
# per task made ready, written in the same transaction, deleted once the broker has it.
outbox = Table(
    "outbox",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("queue", String(64), nullable=False),
    Column("available_at", Float, nullable=False),
    Index(None, "available_at"),
)

workers = Table(
    "workers",
    metadata,
    Column("id", String(255), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("queues", Json, nullable=False),
    Column("pipelines", Json, nullable=False),
    Column("concurrency", Integer, nullable=False),
    Column("running", Integer, nullable=False, default=0),
    Column("version", String(64), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("last_seen_at", Float, nullable=False),
)

# Webhook deliveries (the webhooks' outbox): one per terminal event a job's webhook asked
# for, written in the transaction that finished the job. `payload` is the exact body, so
# every attempt sends the same bytes; `next_attempt_at` is also the sender's lease.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("job_id", String(36), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("owner", String(255), nullable=False),
    Column("event", String(16), nullable=False),
    Column("url", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    # Attempts since the delivery was made or last redelivered: what the retry limit counts.
    Column("round_attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float),
    Column("last_status_code", Integer),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("delivered_at", Float),
    Index(None, "status", "next_attempt_at"),
    Index(None, "job_id", "created_at"),
)

# Each owner's webhook signing secrets: the current one (`expires_at` null) and, for a
# while after a rotation, the one it replaced.
webhook_secrets = Table(
    "webhook_secrets",
    metadata,
    Column("owner", String(255), primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),
)
