"""`ProcessPool`: sync stages with `isolation="process"`, each attempt in a worker subprocess.

Design. Each child is `python -m jobgate.worker._child`, started with
`asyncio.create_subprocess_exec` in its own session (so its whole process group can be
killed) and spoken to with one JSON object a line over its stdin and stdout. This was
chosen over `multiprocessing` because:

- the parent reads the children's pipes on the event loop: no thread blocks per stage,
  and cancellation, timeouts and crashes are plain awaits (an exit code, an EOF);
- nothing is pickled: the child re-imports the stage function by module and pipeline
  name, the context travels as JSON, as it is stored;
- a fresh interpreter (like the "spawn" start method) inherits nothing of the worker's
  threads, sockets or database connections, which `fork` from a threaded asyncio
  process would;
- the protocol is small and testable, and the child's exit code is the loop's to report.

Protocol (parent -> child): `run` (the stage and its context), `cancel` (the job's
cancellation flag, for `ctx.check_cancelled()`), `reply` (answers to `cost` and
`artifact` requests). Child -> parent: `progress`, `log` (fire and forget), `cost`,
`artifact` (the child waits for the reply), `done` (the output, or the error's message).
Closing the child's stdin makes it exit.

A child runs one stage at a time and is reused for `max_tasks_per_child` stages. It is
killed (its process group) on a timeout, an exhausted budget, an unreadable message or
when the worker gives up on the stage (cancellation after the grace, a lost lease, a
shutdown); a dead child fails the attempt and the next stage gets a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel

from jobgate.errors import BudgetExhausted, JobCancelled, StoreUnreachable
from jobgate.pipelines import InputFile, Stage, StageContext
from jobgate.pipelines.context import StageRuntime
from jobgate.store.repositories import tasks
from jobgate.worker import protocol
from jobgate.worker.executors import StageTimeout, to_json

log = structlog.get_logger("jobgate.worker.processes")

# The longest line a child may send (a stage's output travels in one line).
MESSAGE_LIMIT = 32 * 1024 * 1024
# How often a running stage's cancellation flag and timeout are looked at.
_POLL_S = 0.05
# How long an idle child gets to exit after its stdin closes, before it is killed.
_EXIT_GRACE_S = 2.0


class ProcessDied(Exception):
    """The process running the stage died before it answered."""


class StageRaised(Exception):
    """The stage raised in its process; the message is the exception's own."""


class _Child:
    """One stage subprocess and its pipes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stages_run = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def send(self, message: dict[str, Any]) -> None:
        """Write one message; `ConnectionError` if the child is gone."""
        stdin = self.proc.stdin
        if stdin is None or stdin.is_closing():
            raise ConnectionResetError("the stage's process closed its input")
        stdin.write(protocol.encode(message).encode())
        await stdin.drain()

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None when the child closed its output (it died)."""
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        return protocol.decode(line) if line else None

    def close_input(self) -> None:
        """Ask the child to exit: it does when its stdin closes."""
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()

    def kill(self) -> None:
        """SIGKILL the child's whole process group (it leads its own session)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class ProcessPool:
    """Reusable stage subprocesses for one worker, started when first needed.

    Args:
        size: the most children at once (the worker's concurrency).
        max_tasks_per_child: stages a child runs before it is replaced.
        max_rss_mb: the memory a child may allocate, in MB (0: no limit).
    """

    def __init__(self, *, size: int, max_tasks_per_child: int = 100, max_rss_mb: int = 0) -> None:
        self.size = max(1, size)
        self.max_tasks_per_child = max(1, max_tasks_per_child)
        self.max_rss_mb = max(0, max_rss_mb)
        self._idle: list[_Child] = []
        self._live: set[_Child] = set()
        self._reapers: set[asyncio.Task[None]] = set()
        self._freed = asyncio.Event()
        self._runs = 0
        self._closed = False

    def pids(self) -> list[int]:
        """The process ids of the children alive now (idle or running a stage)."""
        return sorted(child.pid for child in self._live)

    async def run(self, stage: Stage, ctx: StageContext) -> Any:
        """Run the stage in a child and return its output, as JSON data.

        Raises:
            StageTimeout: the attempt ran longer than `stage.timeout_s` (the child is killed).
            JobCancelled: the stage stopped at `ctx.check_cancelled()`.
            BudgetExhausted: a cost report passed the job's budget (the child is killed).
            ProcessDied: the child died (crash, signal, out of memory).
            StageRaised: the stage raised; the message is the exception's.
            asyncio.CancelledError: the worker gave up on the stage (the child is killed).
        """
        runtime: StageRuntime = ctx._runtime
        child = await self._acquire()
        self._runs += 1
        run_id = self._runs
        reusable = False
        try:
            try:
                await child.send(_run_message(run_id, stage, ctx, runtime))
            except ConnectionError:
                raise ProcessDied(await _death(child)) from None
            done = await self._serve(child, run_id, stage, runtime)
            reusable = not done.get("recycle")
            return _outcome(done)
        finally:
            self._release(child, reusable)

    async def close(self) -> None:
        """Stop every child: idle ones exit, busy ones are killed; all are reaped."""
        self._closed = True
        for child in list(self._live):
            if child in self._idle:
                self._retire(child)
            else:
                self._kill(child)
        self._idle.clear()
        while self._reapers:
            await asyncio.gather(*self._reapers, return_exceptions=True)

    # -- children ------------------------------------------------------------------------

    async def _acquire(self) -> _Child:
        while True:
            if self._closed:
                raise RuntimeError("the worker's process pool is closed")
            while self._idle:
                child = self._idle.pop()
                if child.alive:
                    return child
                self._kill(child)
            if len(self._live) < self.size:
                return await self._spawn()
            self._freed.clear()
            await self._freed.wait()

    async def _spawn(self) -> _Child:
        # The child imports what this process can: the same `sys.path`.
        paths = [p or os.getcwd() for p in sys.path if isinstance(p, str)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "jobgate.worker._child",
            str(self.max_rss_mb),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=MESSAGE_LIMIT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
        )
        child = _Child(proc)
        self._live.add(child)
        log.debug("stage_process_started", pid=child.pid)
        return child

    def _release(self, child: _Child, reusable: bool) -> None:
        child.stages_run += 1
        if not reusable or not child.alive:
            self._kill(child)
        elif self._closed or child.stages_run >= self.max_tasks_per_child:
            self._retire(child)
        else:
            self._idle.append(child)
        self._freed.set()

    def _kill(self, child: _Child) -> None:
        self._live.discard(child)
        child.kill()
        child.close_input()
        self._reap(child, grace_s=0)

    def _retire(self, child: _Child) -> None:
        self._live.discard(child)
        child.close_input()
        self._reap(child, grace_s=_EXIT_GRACE_S)

    def _reap(self, child: _Child, grace_s: float) -> None:
        reaper = asyncio.get_running_loop().create_task(_reap(child, grace_s))
        self._reapers.add(reaper)
        reaper.add_done_callback(self._reapers.discard)

    # -- one stage -----------------------------------------------------------------------

    async def _serve(
        self, child: _Child, run_id: int, stage: Stage, runtime: StageRuntime
    ) -> dict[str, Any]:
        """Answer the child's messages until its `done`; forward cancellation; time out."""
        loop = asyncio.get_running_loop()
        deadline = None if stage.timeout_s is None else loop.time() + stage.timeout_s
        cancel_sent = runtime.cancel_requested()
        reading = asyncio.ensure_future(child.receive())
        try:
            while True:
                wait_s = _POLL_S if deadline is None else min(_POLL_S, deadline - loop.time())
                await asyncio.wait({reading}, timeout=max(0.0, wait_s))
                if not cancel_sent and runtime.cancel_requested():
                    cancel_sent = True
                    with contextlib.suppress(ConnectionError):
                        await child.send({"op": "cancel", "run": run_id})
                if reading.done():
                    try:
                        message = reading.result()
                    except ValueError as exc:
                        raise StageRaised(
                            f"the stage's process sent an unreadable message: {exc}"
                        ) from None
                    if message is None:
                        raise ProcessDied(await _death(child))
                    if message.get("op") == "done":
                        return message
                    await _answer(child, message, runtime)
                    reading = asyncio.ensure_future(child.receive())
                elif deadline is not None and loop.time() >= deadline:
                    raise StageTimeout(
                        f"stage {stage.name!r} ran longer than {stage.timeout_s:g} s"
                    )
        finally:
            if not reading.done():
                reading.cancel()


async def _answer(child: _Child, message: dict[str, Any], runtime: StageRuntime) -> None:
    """Feed one report into the task's runtime; answer the requests that wait."""
    op = message.get("op")
    if op == "progress":
        runtime.report_progress(float(message["fraction"]), message.get("message"))
    elif op == "log":
        runtime.report_log(str(message.get("level", "info")), str(message.get("text", "")))
    elif op == "cost":
        # BudgetExhausted propagates: the stage is stopped (its child killed), never answered.
        runtime.report_cost(float(message["usd"]), str(message.get("item", "")))
        reply: dict[str, Any] = {"ok": True, "job_cost": runtime.job_cost()}
        await _reply(child, message, reply)
    elif op == "artifact":
        path = Path(str(message["path"]))
        try:
            value = await runtime.save_artifact(
                str(message["name"]), path, message.get("content_type"), bool(message["primary"])
            )
            reply = {"ok": True, "value": value}
        except (tasks.LeaseLost, StoreUnreachable):
            raise  # not the stage's failure: the stage is stopped (its child killed)
        except Exception as exc:
            reply = {"ok": False, "error": str(exc) or type(exc).__name__}
        finally:
            if message.get("spooled"):
                await asyncio.to_thread(path.unlink, missing_ok=True)
        await _reply(child, message, reply)
    else:
        log.warning("stage_process_unknown_message", op=op)


async def _reply(child: _Child, request: dict[str, Any], reply: dict[str, Any]) -> None:
    with contextlib.suppress(ConnectionError):
        await child.send({"op": "reply", "rid": request["rid"], **reply})


def _run_message(run_id: int, stage: Stage, ctx: StageContext, runtime: StageRuntime) -> Any:
    """What the child needs to find the stage and build its `StageContext`."""
    params_model = None
    if isinstance(ctx.params, BaseModel):
        model = type(ctx.params)
        params_model = [model.__module__, model.__qualname__]
    item = ctx.item
    return {
        "op": "run",
        "run": run_id,
        "cancelled": runtime.cancel_requested(),
        "module": getattr(stage.fn, "__module__", None) or "__main__",
        "qualname": getattr(stage.fn, "__qualname__", ""),
        "pipeline": stage.pipeline,
        "stage": stage.name,
        "job_id": ctx.job_id,
        "attempt": ctx.attempt,
        "params": to_json(ctx.params),
        "params_model": params_model,
        "files": [_file_info(f) for f in ctx.files],
        "outputs": ctx.outputs,
        "item": _file_info(item) if isinstance(item, InputFile) else item,
        "item_is_file": isinstance(item, InputFile),
        "item_key": ctx.item_key,
        "job_cost": runtime.job_cost(),
    }


def _file_info(f: InputFile) -> dict[str, Any]:
    return {
        "name": f.name,
        "sha256": f.sha256,
        "size": f.size,
        "content_type": f.content_type,
        "path": str(f.path),
    }


def _outcome(done: dict[str, Any]) -> Any:
    """The output of a `done` message, or the exception it stands for."""
    if done.get("ok"):
        return done.get("output")
    kind, message = done.get("kind"), str(done.get("message") or "the stage failed")
    if kind == "cancelled":
        raise JobCancelled()
    if kind == "budget":
        raise BudgetExhausted(message)
    if done.get("traceback"):
        log.info("stage_process_traceback", traceback=done["traceback"])
    raise StageRaised(message)


async def _death(child: _Child) -> str:
    """Why the child is gone, once it is: its exit code (and signal)."""
    try:
        code = await asyncio.wait_for(child.proc.wait(), _EXIT_GRACE_S)
    except TimeoutError:
        child.kill()
        code = await child.proc.wait()
    detail = f"exit code {code}"
    if code < 0:
        with contextlib.suppress(ValueError):
            detail += f", {signal.Signals(-code).name}"
    return f"the stage's process died ({detail})"


async def _reap(child: _Child, grace_s: float) -> None:
    """Wait for the child to end (killing it after `grace_s`), then kill what it left."""
    try:
        await asyncio.wait_for(child.proc.wait(), grace_s or None)
    except TimeoutError:
        child.kill()
        await child.proc.wait()
    # Processes the stage started in the child's session go with it.
    child.kill()
    log.debug("stage_process_ended", pid=child.pid, exit_code=child.proc.returncode)
