"""The transport Protocol: how "a stage task is ready in queue Q" reaches workers.

The store is the truth; a transport only carries wake-up tokens. Each task the store
makes ready puts one token for its queue in the outbox, in the same transaction; the
outbox relay publishes tokens (with broker confirms) and then deletes them. A worker
that receives a token claims the best ready task of that queue in the store (so
priorities, fair share and caps come from the store's ordering), runs it, commits its
outcome, and only then acknowledges the token. A token that finds nothing to claim is
acknowledged at once; a token lost or duplicated costs latency, never a job.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from jobgate.errors import JobgateError


class TransportError(JobgateError):
    """The broker could not take or hand out tokens (unreachable, refused, timed out)."""


class Delivery(Protocol):
    """One token handed to this consumer; it stays the consumer's until settled."""

    @property
    def queue(self) -> str:
        """The jobgate queue name (not the broker's key or queue name)."""
        ...

    async def ack(self) -> None:
        """Done with it: the broker forgets it. Never raises (a lost ack only means a
        redelivery, which finds nothing to claim)."""
        ...

    async def reject(self) -> None:
        """Give it back for redelivery to any consumer. Never raises."""
        ...


class Transport(Protocol):
    """A broker carrying wake-up tokens, one named queue per jobgate queue."""

    name: str

    async def connect(self) -> None:
        """Open connections and declare what `publish` needs.

        Raises:
            TransportError: the broker is unreachable.
        """
        ...

    async def publish(self, queues: Sequence[str]) -> None:
        """Put one token per entry of `queues` (repeats mean several tokens).

        Returns only once the broker has stored every token durably (publisher
        confirms, or the write acknowledged).

        Raises:
            TransportError: not every token was confirmed; the caller publishes them
                all again later (duplicates are harmless).
        """
        ...

    def consume(
        self,
        queues: Sequence[str],
        *,
        prefetch: int,
        on_resume: Callable[[], None] | None = None,
    ) -> AsyncIterator[Delivery]:
        """Tokens of `queues`, at most `prefetch` of them unsettled at once.

        The iterator outlives broker restarts: it reconnects by itself (with backoff)
        and goes on. Tokens a dead or closed consumer left unsettled are handed to
        another consumer. It ends when `aclose()` is called.

        `on_resume` is called each time the consumer is back after losing the broker
        (not when it first connects). Tokens may have gone missing meanwhile, or sit
        with the broker on a connection it has not yet found dead, so the caller should
        look at the store rather than wait for them.
        """
        ...

    async def ping(self) -> float:
        """Check that the broker answers (connecting first if need be), for readiness.

        Returns:
            The check's time in milliseconds.

        Raises:
            TransportError: the broker is unreachable, or the connection is down.
        """
        ...

    async def aclose(self) -> None:
        """Close connections; open `consume` iterators end. Unsettled tokens go back."""
        ...
