"""The app factory: `create_app(settings)` builds the FastAPI app and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from jobgate import __version__
from jobgate.api import middleware, problems, schemas
from jobgate.api.limits import IpRateLimitMiddleware, RateLimits
from jobgate.api.routes import ROUTERS
from jobgate.api.state import AppState
from jobgate.api.streams import Hub
from jobgate.auth import jwt
from jobgate.blobs import open_blob_store
from jobgate.bus import from_url as open_bus
from jobgate.config import Settings
from jobgate.pipelines import Registry
from jobgate.store import Database
from jobgate.store.migrate import MigrationError, schema_problem, upgrade
from jobgate.transport import from_url
from jobgate.transport.outbox import OutboxRelay
from jobgate.webhooks import WebhookSender


def create_app(
    settings: Settings | None = None,
    *,
    registry: Registry | None = None,
    worker_concurrency: int | None = None,
) -> FastAPI:
    """The jobgate API.

    Args:
        settings: defaults to `Settings()` from the environment.
        registry: the pipelines (default: built-ins plus `JOBGATE_PIPELINES`).
        worker_concurrency: run an in-process worker of this concurrency (default:
            `settings.worker_concurrency`; 0 runs the API alone).
    """
    settings = settings or Settings()
    registry = registry or Registry.from_paths(settings.pipeline_paths)
    concurrency = settings.worker_concurrency if worker_concurrency is None else worker_concurrency

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.is_sqlite:
            await upgrade(settings.database_url)
        elif (problem := await schema_problem(settings.database_url)) is not None:
            raise MigrationError(problem)
        db = Database(
            settings.database_url,
            outbox=settings.external_transport,
            pool_size=settings.database_pool_size,
        )
        blobs = open_blob_store(settings.blobs_url)
        verifier = jwt.from_settings(settings)
        bus = open_bus(
            settings.bus_url,
            database_url=settings.database_url,
            namespace=settings.transport_namespace,
        )
        db.on_changes = bus.publish
        streams = Hub(
            db,
            bus,
            poll_s=settings.sse_poll_s,
            max_per_job=settings.sse_max_per_job,
            max_global_per_holder=settings.sse_max_per_user,
        )
        db.on_rows = streams.reported
        await bus.start()
        await streams.start()
        state = AppState(
            settings=settings,
            db=db,
            blobs=blobs,
            registry=registry,
            streams=streams,
            jwt=verifier,
            limits=RateLimits.from_settings(settings),
        )
        app.state.jobgate = state
        transport = from_url(settings.transport_url, namespace=settings.transport_namespace)
        state.transport = transport
        worker = None
        relay = None
        if concurrency > 0:
            from jobgate.worker import Worker

            worker = Worker(
                settings=settings,
                db=db,
                blobs=blobs,
                registry=registry,
                concurrency=concurrency,
                transport=transport,
            )
            state.wake = worker.wake
            state.expect_notice = worker.expect_notice
            state.submits.lender = worker
            await worker.start()
        elif transport is not None:
            # The API alone still publishes the tokens its own submits and retries leave.
            relay = OutboxRelay(db, transport, poll_s=settings.worker_idle_poll_s)
            state.wake = relay.wake
            await relay.start()
        if settings.webhook_concurrency > 0:
            state.webhooks = WebhookSender(db, settings)
            await state.webhooks.start()
        try:
            yield
        finally:
            await state.submits.aclose()
            if worker is not None:
                await worker.stop()
            if relay is not None:
                await relay.aclose()
                await relay.transport.aclose()
            if state.webhooks is not None:  # after the worker: its last ends queue some
                await state.webhooks.aclose()
            await streams.aclose()
            await bus.aclose()
            if verifier is not None:
                await verifier.aclose()
            await state.limits.aclose()
            await blobs.aclose()
            await db.aclose()

    app = FastAPI(
        title="jobgate",
        version=__version__,
        description="API gateway and orchestration for long-running ML jobs.",
        lifespan=lifespan,
    )
    problems.install(app)
    if settings.rate_limit_ip:
        # Inside the request-id middleware, ahead of routing and so of authentication.
        app.add_middleware(IpRateLimitMiddleware)
    middleware.install(app, settings)
    for router in ROUTERS:
        app.include_router(router)
    schemas.document_problems_only(app)
    return app
