"""Following a job: resuming event streams and polling, as decisions without I/O.

`Client` and `AsyncClient` run the same loop around a `Resumer`: open the stream with
`Resumer.headers()`, feed every `ServerSentEvent` to `accept()`, and when the connection
drops (or the server closes it early) sleep `backoff()` seconds and open it again. The
resumed stream starts after `Last-Event-ID`, and `accept()` drops anything at or below it,
so the caller sees every event once, in order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from jobgate.client._calls import EVENT_STREAM
from jobgate.client._errors import (
    ProblemError,
    RateLimitedError,
    ServerError,
    TransportError,
    WaitTimeout,
    error_for,
    media_type,
    unexpected_answer,
)
from jobgate.client._models import Event, Job
from jobgate.client._sse import ServerSentEvent

Clock = Callable[[], float]


@dataclass(frozen=True)
class Reconnect:
    """How a dropped event stream is resumed.

    Args:
        first_delay: seconds before the first reconnection (the server's `retry:` wins).
        max_delay: the cap of the doubling delay between attempts.
        give_up_after: seconds without any event or heartbeat after which
            `TransportError` is raised instead of trying again.
    """

    first_delay: float = 0.25
    max_delay: float = 5.0
    give_up_after: float = 60.0


def deadline_after(timeout: float | None, clock: Clock = time.monotonic) -> float | None:
    """The clock time `timeout` seconds from now (None: never)."""
    return None if timeout is None else clock() + timeout


class Resumer:
    """The state of one followed stream: the last id seen, and the reconnection backoff."""

    def __init__(
        self,
        policy: Reconnect,
        *,
        last_event_id: str | None = None,
        heartbeats: bool = False,
        ends: bool = True,
        deadline: float | None = None,
        what: str = "the event stream",
        clock: Clock = time.monotonic,
    ) -> None:
        self.policy = policy
        self.last_event_id = last_event_id
        self.heartbeats = heartbeats
        self.ends = ends
        self.deadline = deadline
        self.what = what
        self.finished = False
        """True once the job's stream is over: its terminal event, or a finished `state`."""
        self.job: Job | None = None
        """The job as last seen in a `state` event."""
        self._clock = clock
        self._down_since: float | None = None
        self._delay: float | None = None
        self._server_retry: float | None = None

    def headers(self) -> dict[str, str]:
        """The headers of the next (re)connection."""
        headers = {"Accept": EVENT_STREAM, "Cache-Control": "no-cache"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        return headers

    def read_timeout(self, default: float | None) -> float | None:
        """How long a read may wait: the stream timeout, cut short by the deadline."""
        if self.deadline is None:
            return default
        remaining = max(0.001, self.deadline - self._clock())
        return remaining if default is None else min(default, remaining)

    def refusal(self, response: httpx.Response) -> ProblemError:
        """The error an answer that is not an event stream stands for (body already read)."""
        if response.is_error:
            return error_for(response)
        # A server without streams may just answer the JSON page.
        return unexpected_answer(response, EVENT_STREAM)

    def note_place(self, last_event_id: str) -> None:
        """The stream's last event id as the decoder has it, also from an `id:` sent
        alone (no event): a fresh `/v1/events` stream says where it starts that way, so
        a reconnection before any event resumes from there, losing nothing."""
        if last_event_id and not _at_or_before(last_event_id, self.last_event_id):
            self.last_event_id = last_event_id

    def accept(self, sse: ServerSentEvent) -> Event | None:
        """The event to hand to the caller, or None (a duplicate, or a skipped heartbeat).

        Raises:
            WaitTimeout: the deadline has passed (a busy stream never times out a read).
        """
        if self.deadline is not None and self._clock() >= self.deadline:
            raise WaitTimeout(f"{self.what} did not end in time", job=self.job)
        self._down_since = self._delay = None  # the connection is alive: reset the backoff
        if sse.retry is not None:
            self._server_retry = sse.retry / 1000
        if sse.id is not None:
            if _at_or_before(sse.id, self.last_event_id):
                return None
            self.last_event_id = sse.id
        try:
            data = json.loads(sse.data) if sse.data.strip() else {}
        except ValueError:
            data = {"text": sse.data}
        event = Event(type=sse.event, id=sse.id, data=data if isinstance(data, dict) else {})
        if self.ends and event.terminal:
            self.finished = True
        if event.type == "state":
            self.job = event.job
            self.finished = self.ends and self.job is not None and self.job.finished
        if event.type == "heartbeat" and not self.heartbeats:
            return None
        return event

    def backoff(self, failure: Exception | None) -> float:
        """Seconds to wait before reconnecting after `failure` (None: the server hung up).

        Raises:
            ProblemError: `failure` is a refusal that retrying will not change.
            TransportError: the stream has been down for `give_up_after` seconds.
            WaitTimeout: the deadline has passed.
        """
        if isinstance(failure, ProblemError) and not _retryable(failure):
            raise failure
        now = self._clock()
        if self.deadline is not None and now >= self.deadline:
            raise WaitTimeout(f"{self.what} did not end in time", job=self.job) from failure
        if self._down_since is None:
            self._down_since = now
        if now - self._down_since >= self.policy.give_up_after:
            cause = f": {failure}" if failure is not None else ""
            raise TransportError(
                f"{self.what} could not be resumed for {self.policy.give_up_after:g} s{cause}"
            ) from failure
        first = self._server_retry if self._server_retry is not None else self.policy.first_delay
        delay = min(self.policy.max_delay, first if self._delay is None else self._delay * 2)
        self._delay = delay
        retry_after = getattr(failure, "retry_after", None)
        if isinstance(retry_after, float | int):
            delay = max(delay, float(retry_after))
        limit = self._down_since + self.policy.give_up_after
        if self.deadline is not None:
            limit = min(limit, self.deadline)
        return max(0.0, min(delay, limit - now))


def is_event_stream(response: httpx.Response) -> bool:
    """True for a successful `text/event-stream` answer."""
    return response.is_success and media_type(response) == EVENT_STREAM


def _retryable(error: ProblemError) -> bool:
    """Refusals that a later attempt may not meet: too many streams, a server restarting."""
    return isinstance(error, RateLimitedError | ServerError) or error.status in (502, 504)


def _at_or_before(event_id: str, last: str | None) -> bool:
    if not last or not (event_id.isdigit() and last.isdigit()):
        return False
    return int(event_id) <= int(last)


class Poller:
    """Polling a job until it finishes, for servers (or proxies) without event streams."""

    def __init__(
        self,
        deadline: float | None,
        *,
        interval: float = 0.5,
        max_interval: float = 5.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.deadline = deadline
        self.interval = interval
        self.max_interval = max_interval
        self._clock = clock

    def delay(self, job: Job) -> float | None:
        """None if `job` is finished, else seconds to wait before reading it again.

        Raises:
            WaitTimeout: the deadline has passed.
        """
        if job.finished:
            return None
        now = self._clock()
        if self.deadline is not None and now >= self.deadline:
            raise WaitTimeout(f"job {job.id} did not finish in time (it is {job.status})", job=job)
        delay = self.interval
        self.interval = min(self.max_interval, self.interval * 1.5)
        if self.deadline is not None:
            delay = min(delay, self.deadline - now)
        return max(0.0, delay)
