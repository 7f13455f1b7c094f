"""The event bus: wakes SSE streams in every API process when jobs gain events.

`from_url` picks the backend from `JOBGATE_BUS_URL`: `memory` (one process),
`postgres` (`LISTEN/NOTIFY` on the store's server) or `redis://…` (pub/sub). Left empty
it follows the database: SQLite gets `memory`, PostgreSQL gets `postgres`.
"""

from __future__ import annotations

from jobgate.bus.base import Changes, EventBus, Listener


def from_url(url: str, *, database_url: str, namespace: str = "jobgate") -> EventBus:
    """The bus `url` names (see the module's docstring).

    Raises:
        ValueError: the URL names no known bus, or `postgres` without a PostgreSQL store.
    """
    url = url.strip()
    is_postgres = database_url.startswith("postgresql")
    if not url:
        url = "postgres" if is_postgres else "memory"
    scheme = url.partition("://")[0].lower()
    if url == "memory":
        from jobgate.bus.memory import MemoryBus

        return MemoryBus()
    if url in ("postgres", "postgresql"):
        if not is_postgres:
            raise ValueError("JOBGATE_BUS_URL=postgres needs a PostgreSQL JOBGATE_DATABASE_URL")
        from jobgate.bus.postgres import PostgresBus

        return PostgresBus(database_url)
    if scheme in ("redis", "rediss"):
        from jobgate.bus.redis import RedisBus

        return RedisBus(url, namespace=namespace)
    raise ValueError(f"unknown event bus URL {url!r}: use 'memory', 'postgres' or a redis:// URL")


__all__ = ["Changes", "EventBus", "Listener", "from_url"]
