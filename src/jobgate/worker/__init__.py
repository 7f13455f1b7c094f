"""The worker: claims stage tasks, runs stage code under leases, records outcomes.

`Worker` is imported on first use, so that a stage's subprocess
(`jobgate.worker._child`) starts without loading the store and the API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobgate.worker.worker import Worker

__all__ = ["Worker"]


def __getattr__(name: str) -> Any:
    if name == "Worker":
        from jobgate.worker.worker import Worker

        return Worker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
