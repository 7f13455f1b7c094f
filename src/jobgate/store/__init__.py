"""The store: tables, the engine, and repositories (plain async functions)."""

from jobgate.store.database import Database

__all__ = ["Database"]
