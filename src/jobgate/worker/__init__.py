"""The worker: claims stage tasks, runs stage code under leases, records outcomes."""

from jobgate.worker.worker import Worker

__all__ = ["Worker"]
