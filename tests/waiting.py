"""Waiting for a worker's state, for tests that need it in one."""

from __future__ import annotations

import asyncio

from jobgate.worker import Worker


async def idle(worker: Worker) -> None:
    """Until the worker's last claim found fewer tasks than it asked for, and it waits
    for a wake-up that has not come (then it lends its free slots to submits)."""
    async with asyncio.timeout(10):
        while not worker._idle or worker._wakeup.is_set():
            await asyncio.sleep(0.01)
