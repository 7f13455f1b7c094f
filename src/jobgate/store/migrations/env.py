"""Alembic environment: run by `jobgate.store.migrate`, or by the `alembic` command.

`jobgate.store.migrate` hands over an open connection in `config.attributes`; the
`alembic` command (with an ini file naming `sqlalchemy.url`) gets an engine built here.
Either way each migration runs in its own transaction, and SQLite uses batch mode,
since it can only alter a table by copying it.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from jobgate.store import migrate
from jobgate.store.tables import metadata

config = context.config


def run_migrations(connection: Connection) -> None:
    """Run the pending migrations on `connection`."""
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        transaction_per_migration=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline(url: str) -> None:
    """Print the migrations' SQL instead of running it (`alembic upgrade --sql`)."""
    context.configure(
        url=url,
        target_metadata=metadata,
        render_as_batch=url.startswith("sqlite"),
        transaction_per_migration=True,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_with_url(url: str) -> None:
    """Open an engine on `url` and run the pending migrations."""
    engine = migrate.migration_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


_connection = config.attributes.get("connection")
if isinstance(_connection, Connection):
    run_migrations(_connection)
else:
    _url = config.get_main_option("sqlalchemy.url")
    if not _url:
        raise RuntimeError("Set sqlalchemy.url, or run migrations with `jobgate db upgrade`")
    if context.is_offline_mode():
        run_migrations_offline(_url)
    else:
        asyncio.run(run_migrations_with_url(_url))
