"""Settings: environment variables (and `.env`) prefixed `JOBGATE_`.

Build them with `Settings()` (or `get_settings()`) where they are needed, never at
import time, so that tests and embedders can build their own.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The drivers a URL without one means: jobgate installs these, not psycopg or pysqlite.
_ASYNC_DRIVERS = {
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}
DEV_SIGNING_KEY = "dev-only-signing-key-change-me"
MIN_SECRET_CHARS = 32
_HOST = re.compile(r"(?i)[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
# Secrets copied from documentation: refused in prod however long they are.
WELL_KNOWN_JWT_SECRETS = frozenset(
    {
        "secret",
        "changeme",
        "change-me",
        "your-jwt-secret",
        "your-super-secret-jwt-token-with-at-least-32-characters-long",
        "super-secret-jwt-token-with-at-least-32-characters-long",
        DEV_SIGNING_KEY,
    }
)


class Settings(BaseSettings):
    """Every setting jobgate reads; `.env.example` documents each one."""

    model_config = SettingsConfigDict(
        env_prefix="JOBGATE_", env_file=".env", extra="ignore", env_file_encoding="utf-8"
    )

    env: Literal["dev", "prod"] = "dev"
    data_dir: Path = Path(".jobgate")
    database_url: str = ""
    database_pool_size: int = Field(20, ge=1)
    gc_threshold: int = Field(
        50_000, ge=0, description="allocations between young GC collections (0: Python's)"
    )
    http_keep_alive_s: int = Field(
        30, ge=1, description="how long `serve` keeps an idle client connection open"
    )
    transport_url: str = "database"
    transport_namespace: str = "jobgate"
    bus_url: str = ""
    blobs_url: str = ""
    limits_url: str = "memory://"
    limits_namespace: str = Field("jobgate-limits", min_length=1)
    limits_take_ahead: bool = True
    pipelines: str = ""
    public_url: str = "http://127.0.0.1:8000"

    signing_key: str = DEV_SIGNING_KEY
    signed_url_ttl_s: int = Field(3600, ge=1)
    stream_token_ttl_s: int = Field(300, ge=1)
    auth_jwt_secret: str = ""
    auth_jwks_url: str = ""
    auth_supabase_url: str = Field(
        "", description="derives auth_jwks_url and auth_issuer unless they are set"
    )
    auth_audience: str = ""
    auth_issuer: str = ""
    auth_leeway_s: float = Field(30.0, ge=0)
    auth_roles_claim: str = Field("roles", min_length=1, description="a name or a dotted path")
    auth_jwks_min_refresh_s: float = Field(60.0, ge=0)
    auth_jwks_cache_s: float = Field(600.0, gt=0)

    max_jobs_per_request: int = Field(100, ge=1)
    max_upload_bytes: int = Field(100_000_000, ge=1)
    max_upload_parts: int = Field(100, ge=1)
    max_json_bytes: int = Field(
        10_000_000, ge=1, description="a JSON body is parsed whole in memory: its largest size"
    )
    body_idle_timeout_s: float = Field(
        60.0, gt=0, description="408 when no byte of a request body arrives for this long"
    )
    list_max_limit: int = Field(50, ge=1)
    job_budget_usd: float = Field(2000.0, ge=0)
    user_monthly_budget_usd: float = Field(
        0.0, ge=0, description="what one owner's jobs of a calendar month (UTC) may cost; 0: no cap"
    )
    idempotency_ttl_s: int = Field(86_400, ge=1)
    job_retention_days: float = Field(
        0.0, ge=0, description="finished jobs older than this are purged; 0: kept for ever"
    )
    blob_gc_grace_s: float = Field(
        3600.0, ge=0, description="blobs unreferenced this long are deleted; 0: never"
    )
    retention_interval_s: float = Field(
        300.0, gt=0, description="how often a worker purges old jobs and collects blobs"
    )
    rate_limit_submit: str = Field("", description="jobs per user, e.g. 60/minute; empty: none")
    max_active_jobs_per_user: int = Field(0, ge=0, description="queued+running; 0: unlimited")
    rate_limit_ip: str = Field("", description="/v1 requests per client IP; empty: none")
    trusted_proxies: str = Field("", description="comma-separated IPs/CIDRs whose XFF is used")

    worker_concurrency: int = Field(4, ge=0)
    worker_queues: str = "default"
    worker_poll_interval_s: float = Field(0.5, gt=0)
    worker_idle_poll_s: float = Field(
        60.0, gt=0, description="the poll while PostgreSQL notifications wake the worker"
    )
    lease_s: float = Field(30.0, gt=0)
    cancel_grace_s: float = Field(5.0, ge=0)
    shutdown_grace_s: float = Field(30.0, ge=0)
    retry_backoff_max_s: float = Field(300.0, gt=0)
    priority_aging_s: float = Field(
        10.0, ge=0, description="each priority point counts as this many seconds of waiting"
    )
    max_running_per_owner: int = Field(0, ge=0, description="0: no cap")
    fair_share_stride_s: float = Field(
        1.0, ge=0, description="each job moves its owner's fair-share clock this far"
    )
    sweep_interval_s: float = Field(2.0, gt=0)
    worker_lost_after_s: float = Field(15.0, gt=0)
    max_deliveries: int = Field(5, ge=1)
    event_flush_interval_s: float = Field(0.1, gt=0)
    process_max_tasks_per_child: int = Field(100, ge=1)
    process_max_rss_mb: int = Field(0, ge=0)
    worker_heartbeat_s: float = Field(
        60.0, gt=0, description="heartbeats of a worker its PostgreSQL connection vouches for"
    )
    worker_group_commit: int = Field(
        2, ge=0, description="transactions writing finished stages together at once (0: one each)"
    )

    webhook_timeout_s: float = Field(10.0, gt=0, description="one delivery attempt, all in")
    webhook_retry_base_s: float = Field(30.0, gt=0)
    webhook_retry_max_s: float = Field(3600.0, gt=0)
    webhook_max_attempts: int = Field(8, ge=1)
    webhook_poll_s: float = Field(
        120.0,
        gt=0,
        description="how often senders look for deliveries no process woke them for",
    )
    webhook_concurrency: int = Field(
        16, ge=0, description="deliveries sent at once by this process (0: it sends none)"
    )
    webhook_allow_private: bool = False
    webhook_allowlist: str = Field(
        "", description="comma-separated hosts or CIDRs a webhook may target even if private"
    )

    sse_heartbeat_s: float = Field(30.0, gt=0)
    sse_max_per_job: int = Field(10, ge=1)
    sse_max_per_user: int = Field(
        20, ge=1, description="GET /v1/events streams one caller may hold open per process"
    )
    sse_poll_s: float = Field(
        5.0, gt=0, description="how often open streams check the store, whatever the bus says"
    )
    metrics_token: str = ""
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: str = "INFO"

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("rate_limit_submit", "rate_limit_ip")
    @classmethod
    def _one_rate_limit(cls, value: str) -> str:
        value = value.strip()
        if value:
            # Imported here: `limits` is slow to import and most commands never need it.
            from limits import parse_many

            try:
                items = parse_many(value)
            except ValueError:
                items = []
            if len(items) != 1 or items[0].amount < 1:
                raise ValueError(f"{value!r} is not one rate limit like '60/minute' or '5/hour'")
        return value

    @field_validator("bus_url")
    @classmethod
    def _bus(cls, value: str) -> str:
        value = value.strip()
        scheme = value.partition("://")[0].lower()
        if value not in ("", "memory", "postgres", "postgresql") and scheme not in (
            "redis",
            "rediss",
        ):
            raise ValueError(f"{value!r} is not 'memory', 'postgres' or a redis:// URL")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        for part in value.split(","):
            if part.strip():
                ipaddress.ip_network(part.strip(), strict=False)  # ValueError names the part
        return value

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        """`postgres://`, `postgresql://` and `sqlite://` (the forms hosting providers
        hand out) name jobgate's async drivers; an explicit `+driver` is kept."""
        scheme, sep, rest = value.partition("://")
        if sep and scheme in _ASYNC_DRIVERS:
            return f"{_ASYNC_DRIVERS[scheme]}://{rest}"
        return value

    @field_validator("webhook_allowlist")
    @classmethod
    def _hosts_or_networks(cls, value: str) -> str:
        for part in value.split(","):
            part = part.strip()
            if part and not _HOST.fullmatch(part):
                ipaddress.ip_network(part, strict=False)  # ValueError names the part
        return value

    @model_validator(mode="after")
    def _defaults_and_secrets(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite+aiosqlite:///{self.data_dir / 'jobgate.db'}"
        if not self.blobs_url:
            self.blobs_url = (self.data_dir / "blobs").resolve().as_uri()
        weak_key = self.signing_key == DEV_SIGNING_KEY or len(self.signing_key) < 32
        if self.env == "prod" and weak_key:
            raise ValueError(
                "JOBGATE_SIGNING_KEY must be set to a random value of at least 32 characters "
                "when JOBGATE_ENV=prod"
            )
        if self.env == "prod" and self.auth_jwt_secret and _weak_secret(self.auth_jwt_secret):
            raise ValueError(
                "JOBGATE_AUTH_JWT_SECRET must be at least 32 characters and not an example "
                "from documentation when JOBGATE_ENV=prod"
            )
        retention_s = self.job_retention_days * 86_400
        if retention_s and retention_s < self.idempotency_ttl_s:
            raise ValueError(
                "JOBGATE_JOB_RETENTION_DAYS must keep jobs at least as long as "
                "JOBGATE_IDEMPOTENCY_TTL_S remembers the keys that name them"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def external_transport(self) -> bool:
        """Whether tasks reach workers through a broker (and so through the outbox)."""
        return self.transport_url not in ("", "database")

    @property
    def queue_names(self) -> list[str]:
        return [q.strip() for q in self.worker_queues.split(",") if q.strip()]

    @property
    def pipeline_paths(self) -> list[str]:
        return [p.strip() for p in self.pipelines.split(",") if p.strip()]


def _weak_secret(secret: str) -> bool:
    return len(secret) < MIN_SECRET_CHARS or secret.strip().lower() in WELL_KNOWN_JWT_SECRETS


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
