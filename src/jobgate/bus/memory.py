"""The in-process bus of the embedded default: one process, no server."""

from __future__ import annotations

from jobgate.bus.base import Changes, Listener, Listeners


class MemoryBus:
    """Publishing calls this process's listeners, on the event loop, soon after.

    Only streams in this process are woken: with workers in other processes (on SQLite
    too), streams learn of their events from the hub's periodic check instead.
    """

    def __init__(self) -> None:
        self._listeners = Listeners()

    def publish(self, changes: Changes) -> None:
        self._listeners.soon(changes)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.add(listener)

    async def start(self) -> None:
        return None

    async def ping(self) -> float:
        return 0.0

    async def aclose(self) -> None:
        return None
