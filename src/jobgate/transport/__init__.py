"""Delivering "a stage task is ready" to workers. The store stays the truth.

Today the only transport is the database itself: workers claim from the `tasks` table.
On PostgreSQL, `LISTEN/NOTIFY` wakes them the moment a task is committed, instead of at
their next poll.
"""
