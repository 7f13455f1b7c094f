"""The HTTP API: FastAPI app factory, dependencies, problem documents, routes."""
