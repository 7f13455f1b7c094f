"""Repositories: plain async functions taking a connection first; they never commit."""
