"""`JOBGATE_DATABASE_URL` as hosting providers hand it out names jobgate's async drivers."""

from __future__ import annotations

import pytest

from jobgate.config import Settings


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgresql://app:pw@db:5432/jobs", "postgresql+asyncpg://app:pw@db:5432/jobs"),
        (
            "postgres://app:pw@db/jobs?sslmode=require",
            "postgresql+asyncpg://app:pw@db/jobs?sslmode=require",
        ),
        ("sqlite:///var/lib/jobgate.db", "sqlite+aiosqlite:///var/lib/jobgate.db"),
        ("postgresql+asyncpg://db/jobs", "postgresql+asyncpg://db/jobs"),
        ("postgresql+psycopg://db/jobs", "postgresql+psycopg://db/jobs"),
    ],
)
def test_a_url_without_a_driver_gets_the_async_one(given: str, used: str) -> None:
    """`postgresql://` alone would pick psycopg, which jobgate does not install: `db
    upgrade` failed with `No module named 'psycopg'`. A driver given is kept."""
    assert Settings(database_url=given).database_url == used
