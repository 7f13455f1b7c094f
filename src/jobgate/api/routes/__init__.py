"""The routes, one module per noun; each exposes `router`."""

from fastapi import APIRouter

from jobgate.api.routes import (
    api_keys,
    artifacts,
    blobs,
    events,
    files,
    health,
    jobs,
    me,
    pipelines,
    webhooks,
    workers,
)

ROUTERS: list[APIRouter] = [
    health.router,
    pipelines.router,
    jobs.router,
    events.router,
    files.router,
    artifacts.router,
    blobs.router,
    me.router,
    workers.router,
    api_keys.router,
    webhooks.router,
]
