"""What the lifespan builds once and every request shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from jobgate.blobs.base import BlobStore
from jobgate.config import Settings
from jobgate.pipelines import Registry
from jobgate.store import Database


@dataclass
class AppState:
    """The app's backends. `wake` tells in-process workers that new tasks are ready."""

    settings: Settings
    db: Database
    blobs: BlobStore
    registry: Registry
    wake: Callable[[], None] = field(default=lambda: None)
