"""Running one stage function: on the event loop (async), in a thread or in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import json
import math
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from jobgate.pipelines import Stage, StageContext

if TYPE_CHECKING:
    from jobgate.worker.processes import ProcessPool


STAGE_THREAD_PREFIX = "jobgate-stage"


class StageThreads:
    """Sync stages, each in a thread of its own, started at once.

    A thread cannot be stopped: a stage abandoned by its timeout or its cancel runs on
    until its function returns. In a shared pool such threads would hold the threads
    later stages queue for, and those stages' timeouts would run out in the queue. So
    each stage gets its own thread, and `abandoned` counts those still running, which
    the worker keeps off its free slots (they still use what a slot stands for).
    """

    def __init__(self, on_freed: Callable[[], None]) -> None:
        self.abandoned = 0
        self._on_freed = on_freed
        self._names = itertools.count(1)

    async def run(self, call: Callable[[], Any]) -> Any:
        """`call()` in a new thread; its result (or exception) once it returns."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def target() -> None:
            try:
                outcome: tuple[Any, BaseException | None] = (call(), None)
            except BaseException as exc:  # handed to the awaiting task, as an executor does
                outcome = (None, exc)
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(self._returned, future, outcome)

        name = f"{STAGE_THREAD_PREFIX}-{next(self._names)}"
        threading.Thread(target=target, name=name).start()
        try:
            return await future
        except asyncio.CancelledError:
            if future.cancelled():  # the stage was abandoned; its thread runs on
                self.abandoned += 1
            raise

    def _returned(
        self, future: asyncio.Future[Any], outcome: tuple[Any, BaseException | None]
    ) -> None:
        if future.cancelled():
            self.abandoned -= 1
            self._on_freed()
            return
        result, error = outcome
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def stuck_stage_threads(wait_s: float) -> list[threading.Thread]:
    """Stage threads still alive after `wait_s`: sync stages that ignored their cancel.

    Call it once the workers stopped. The interpreter joins such threads at exit, so
    one that never looks at its cancel would keep the stopped process up for good."""
    deadline = time.monotonic() + wait_s
    alive = [t for t in threading.enumerate() if t.name.startswith(STAGE_THREAD_PREFIX)]
    for thread in alive:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t for t in alive if t.is_alive()]


class StageTimeout(Exception):
    """The stage ran longer than its timeout."""


class OutputNotSerializable(Exception):
    """The stage returned something that is not JSON."""


def call_arguments(stage: Stage, ctx: StageContext) -> dict[str, Any]:
    """The keyword arguments a stage function takes: dependency outputs, and `item`."""
    kwargs = {name: ctx.outputs.get(name) for name in stage.dependency_args}
    if stage.takes_item:
        kwargs["item"] = ctx.item
    return kwargs


async def execute(
    stage: Stage,
    ctx: StageContext,
    threads: StageThreads,
    processes: ProcessPool | None = None,
) -> Any:
    """Run the stage under its timeout and return its output, as JSON-ready data.

    `isolation="process"` stages run in `processes` (see `jobgate.worker.processes`).

    Raises:
        StageTimeout: the attempt ran longer than `stage.timeout_s`.
        OutputNotSerializable: the output is not JSON.
        Exception: whatever the stage raised.
    """
    if stage.isolation == "process":
        if processes is None:
            raise RuntimeError("isolation='process' needs the worker's process pool")
        return await processes.run(stage, ctx)
    kwargs = call_arguments(stage, ctx)
    try:
        async with asyncio.timeout(stage.timeout_s):
            if stage.is_async:
                output = await stage.fn(ctx, **kwargs)
            else:
                call = functools.partial(contextvars.copy_context().run, stage.fn, ctx, **kwargs)
                output = await threads.run(call)
    except TimeoutError:
        raise StageTimeout(f"stage {stage.name!r} ran longer than {stage.timeout_s:g} s") from None
    return to_json(output)


def to_json(value: Any) -> Any:
    """The value as plain JSON data that every store keeps, or `OutputNotSerializable`.

    Pydantic models are dumped. NaN and ±Infinity, which JSON has no words for, become
    null, as the API shows them (a metric gone NaN after hours of training is no reason
    to fail the job; PostgreSQL cannot store them). A NUL character (U+0000) in a string
    is refused: PostgreSQL cannot store it, and changing text is not ours to do.
    """
    try:
        try:
            text = json.dumps(value, default=_dump_model, allow_nan=False)
        except ValueError:
            text = json.dumps(_finite(value), default=_dump_model, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise OutputNotSerializable(f"the stage's output is not JSON-serialisable: {exc}") from None
    if _NUL.search(text):
        raise OutputNotSerializable(
            "the stage's output holds a NUL character (U+0000), which cannot be stored"
        )
    return json.loads(text)


# \u0000 in JSON text, not preceded by an escaping backslash (`\\u0000` is text).
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float (in dicts, lists, tuples, models) None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, BaseModel):
        return _finite(value.model_dump(mode="python"))
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _dump_model(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
