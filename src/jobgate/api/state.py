"""What the lifespan builds once and every request shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from jobgate.api.limits import RateLimits
from jobgate.api.streams import Hub
from jobgate.api.submit_group import SubmitGroup
from jobgate.auth.jwt import JwtVerifier
from jobgate.blobs.base import BlobStore
from jobgate.config import Settings
from jobgate.observability.metrics import FinishedCounts
from jobgate.pipelines import Registry
from jobgate.store import Database
from jobgate.transport.base import Transport
from jobgate.webhooks import WebhookSender


@dataclass
class AppState:
    """The app's backends. `wake` tells in-process workers that new tasks are ready;
    `expect_notice` tells them the payload of the notification that will say so again
    (`PostgresWakeups.expect`), when the submit group woke them directly.

    `jwt` verifies bearer JWTs; None when no JWT secret or JWKS is configured.
    `limits` holds the rate limits and quotas (`api/limits.py`); `streams` the open
    event streams and their wake-ups (`api/streams.py`); `submits` writes concurrent
    one-statement submits together (`api/submit_group.py`).
    """

    settings: Settings
    db: Database
    blobs: BlobStore
    registry: Registry
    streams: Hub
    wake: Callable[[], None] = field(default=lambda: None)
    expect_notice: Callable[[str], None] = field(default=lambda _notice: None)
    jwt: JwtVerifier | None = None
    limits: RateLimits = field(default_factory=RateLimits)
    webhooks: WebhookSender | None = None  # None: JOBGATE_WEBHOOK_CONCURRENCY=0
    transport: Transport | None = None  # None: the database transport (the store)
    finished_jobs: FinishedCounts = field(default_factory=FinishedCounts)  # for /metrics
    submits: SubmitGroup = field(init=False)

    def __post_init__(self) -> None:
        self.submits = SubmitGroup(
            self.db,
            aging_s=self.settings.priority_aging_s,
            stride_s=self.settings.fair_share_stride_s,
            on_written=self._written,
        )

    def _written(self, notice: str) -> None:
        self.expect_notice(notice)
        self.wake()
