"""The peers: what to install (pinned), which driver runs them, and with which settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DRIVERS = Path(__file__).resolve().parent / "drivers"

# uv resolves every venv as PyPI stood then (`--exclude-newer`), so the transitive
# dependencies are reproducible too, not only the pins below.
EXCLUDE_NEWER = "2026-11-29T19:00:00Z"

REDIS_URL = "redis://127.0.0.1:6379/11"  # a database of its own: flushed before each measurement
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
PG_DSN = "postgresql://postgres@127.0.0.1:5432/bench_procrastinate"
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
SERVER_URLS = {"redis": REDIS_URL, "rabbitmq": AMQP_URL, "postgresql": PG_ADMIN_DSN}


@dataclass(frozen=True)
class Venv:
    """A virtualenv under `.bench-venvs/<name>`, with these exact requirements."""

    name: str
    requirements: tuple[str, ...]


@dataclass(frozen=True)
class Peer:
    """One column of the comparison: a library on one broker, with its settings."""

    name: str
    venv: Venv
    driver: str
    settings: str
    broker: str = "redis"
    drain_n: int = 5000
    env: dict[str, str] = field(default_factory=dict)

    @property
    def driver_path(self) -> Path:
        return DRIVERS / self.driver


CELERY = Venv("celery", ("celery[redis]==5.7.0", "kombu==5.7.0", "redis==8.1.0"))
RQ = Venv("rq", ("rq==2.12.0", "redis==8.1.0"))
ARQ = Venv("arq", ("arq==0.28.0", "redis==5.3.1", "hiredis==3.5.0"))
DRAMATIQ = Venv("dramatiq", ("dramatiq[rabbitmq,redis]==2.2.1", "pika==1.4.4", "redis==8.1.0"))
TASKIQ = Venv("taskiq", ("taskiq==0.13.0", "taskiq-redis==1.2.4", "redis==8.1.0"))
PROCRASTINATE = Venv(
    "procrastinate",
    ("procrastinate==3.10.0", "psycopg[binary,pool]==3.3.9", "redis==8.1.0"),
)

_CELERY = (
    "prefork pool, `--concurrency 2` (1 parent + 2 children), prefetch multiplier 4, "
    "early acks, JSON (all defaults); Redis result backend, results kept"
)
_DRAMATIQ = (
    "`dramatiq` CLI, 2 processes x 8 threads, default middleware (prefetch 16 a process); "
    "Results middleware on Redis, results kept"
)

PEERS: tuple[Peer, ...] = (
    Peer(
        "celery-redis",
        CELERY,
        "celery_driver.py",
        f"Redis broker; {_CELERY}",
        "redis",
        drain_n=2000,
    ),
    Peer(
        "celery-rabbitmq",
        CELERY,
        "celery_driver.py",
        f"RabbitMQ broker; {_CELERY}",
        "rabbitmq",
        2000,
    ),
    Peer(
        "rq",
        RQ,
        "rq_driver.py",
        "2 `rq worker` processes, default `rq.Worker` (forks a work horse per job; the job "
        "module is preloaded with `--config`), results kept (default TTL)",
        drain_n=500,
    ),
    Peer(
        "arq",
        ARQ,
        "arq_driver.py",
        "2 `arq` worker processes, defaults: `max_jobs` 10, `poll_delay` 0.5 s, results "
        "kept; arq's per-job INFO log lines off",
        drain_n=2000,
    ),
    Peer(
        "dramatiq-rabbitmq",
        DRAMATIQ,
        "dramatiq_driver.py",
        f"RabbitMQ broker; {_DRAMATIQ}",
        "rabbitmq",
    ),
    Peer("dramatiq-redis", DRAMATIQ, "dramatiq_driver.py", f"Redis broker; {_DRAMATIQ}", "redis"),
    Peer(
        "taskiq",
        TASKIQ,
        "taskiq_driver.py",
        "taskiq-redis `RedisStreamBroker` (Redis Streams, acked), `taskiq worker --workers 2`, "
        "100 async tasks a process (default); `RedisAsyncResultBackend`, results kept",
    ),
    Peer(
        "procrastinate",
        PROCRASTINATE,
        "procrastinate_driver.py",
        "PostgreSQL (database `bench_procrastinate`), 1 `procrastinate worker --concurrency 10`, "
        "LISTEN/NOTIFY (default), jobs kept (no deletion on completion, default)",
        broker="postgresql",
        drain_n=2000,
    ),
)

BY_NAME = {peer.name: peer for peer in PEERS}


def servers_of(peer: Peer) -> list[str]:
    """The servers a peer needs: its broker, and Redis (counter, results) always."""
    return sorted({"redis", peer.broker})
