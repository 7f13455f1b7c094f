"""The child side of `isolation="process"`: runs one stage at a time for a `ProcessPool`.

Started as `python -m jobgate.worker._child MAX_RSS_MB` in its own session. It speaks
the line-based JSON protocol described in `jobgate.worker.processes` on the stdin and
stdout it was started with; the stage's own `print()`s go to stderr, and its stdin is
/dev/null. A reader thread takes the parent's messages (runs, cancellations, replies),
the main thread runs stages. When the parent closes the pipe the child exits at once,
so a worker that dies leaves no stage process behind.
"""

from __future__ import annotations

import importlib
import os
import queue
import resource
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel

from jobgate.errors import BudgetExhausted, JobCancelled
from jobgate.pipelines.context import ArtifactSource, StageContext
from jobgate.pipelines.files import InputFile
from jobgate.pipelines.pipeline import Pipeline, Stage
from jobgate.worker import protocol
from jobgate.worker.executors import call_arguments, to_json


class _Channel:
    """Both directions of the pipe to the parent; `send` and `request` are thread-safe."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._replies: dict[int, queue.SimpleQueue[dict[str, Any]]] = {}
        self._next_rid = 0
        self.runs: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.current_run = -1

    def send(self, message: dict[str, Any]) -> None:
        line = protocol.encode(message)
        with self._lock:
            self._out.write(line)
            self._out.flush()

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send `message` and wait for the parent's reply to it."""
        slot: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        with self._lock:
            self._next_rid += 1
            rid = self._next_rid
            self._replies[rid] = slot
        self.send({**message, "rid": rid})
        return slot.get()

    def read_forever(self, source: IO[str]) -> None:
        """The reader thread: dispatch the parent's messages; exit the process at EOF."""
        for line in source:
            message = protocol.decode(line)
            op = message.get("op")
            if op == "run":
                self.current_run = int(message["run"])
                if message.get("cancelled"):
                    self.cancelled.set()
                else:
                    self.cancelled.clear()
                self.runs.put(message)
            elif op == "cancel" and message.get("run") == self.current_run:
                self.cancelled.set()
            elif op == "reply":
                with self._lock:
                    slot = self._replies.pop(int(message["rid"]), None)
                if slot is not None:
                    slot.put(message)
        # The parent closed the pipe (it is done with us, or it died): stop at once.
        sys.stderr.flush()
        os._exit(0)


class _ChildRuntime:
    """`StageRuntime` for a stage in this process: reports travel to the parent."""

    def __init__(self, channel: _Channel, job_cost: float) -> None:
        self._channel = channel
        self._job_cost = job_cost

    def report_progress(self, fraction: float, message: str | None) -> None:
        self._channel.send({"op": "progress", "fraction": fraction, "message": message})

    def report_log(self, level: str, text: str) -> None:
        self._channel.send({"op": "log", "level": level, "text": text})

    def report_cost(self, usd: float, item: str) -> None:
        # Waits for the parent, so nothing runs past an exhausted budget: the parent
        # stops this process instead of answering.
        reply = self._channel.request({"op": "cost", "usd": usd, "item": item})
        self._job_cost = float(reply.get("job_cost", self._job_cost))
        if not reply.get("ok"):
            raise BudgetExhausted(str(reply.get("error", "the job's budget is exhausted")))

    def cancel_requested(self) -> bool:
        return self._channel.cancelled.is_set()

    def job_cost(self) -> float:
        return self._job_cost

    def save_artifact_blocking(
        self, name: str, source: ArtifactSource, content_type: str | None, primary: bool
    ) -> dict[str, Any]:
        spooled = isinstance(source, bytes)
        if isinstance(source, bytes):
            with tempfile.NamedTemporaryFile(prefix="jobgate-artifact-", delete=False) as spool:
                spool.write(source)
            path = spool.name
        else:
            path = str(Path(source).resolve())
        reply = self._channel.request(
            {
                "op": "artifact",
                "name": name,
                "path": path,
                "spooled": spooled,
                "content_type": content_type,
                "primary": primary,
            }
        )
        if not reply.get("ok"):
            raise RuntimeError(str(reply.get("error", "the artifact was not saved")))
        result: dict[str, Any] = reply["value"]
        return result

    async def save_artifact(
        self, name: str, source: ArtifactSource, content_type: str | None, primary: bool
    ) -> dict[str, Any]:
        raise RuntimeError("process stages are sync: use ctx.save_artifact(...)")


_stages: dict[tuple[str, str, str], Stage] = {}


def find_stage(module: str, pipeline: str, stage: str, qualname: str) -> Stage:
    """The stage `pipeline`/`stage`, found in the module that defines its function.

    The module is imported, then searched for a `Stage` of that pipeline and name (a
    decorated module-level function) or for the `Pipeline` holding it (stages made in
    closures). Raises `LookupError` with what was searched.
    """
    key = (module, pipeline, stage)
    if key in _stages:
        return _stages[key]
    if module == "__main__":
        raise LookupError(
            f"stage {stage!r} is defined in __main__, which a subprocess cannot import"
        )
    namespace = vars(importlib.import_module(module))
    found: list[Stage] = []
    for value in list(namespace.values()):
        if isinstance(value, Stage) and value.pipeline == pipeline and value.name == stage:
            found.append(value)
        elif isinstance(value, Pipeline) and value.name == pipeline and stage in value.stages:
            found.append(value.stages[stage])
    if not found:
        raise LookupError(f"no stage {stage!r} of pipeline {pipeline!r} in module {module!r}")
    found.sort(key=lambda s: getattr(s.fn, "__qualname__", "") != qualname)
    _stages[key] = found[0]
    return found[0]


def _input_file(info: dict[str, Any]) -> InputFile:
    return InputFile(
        name=info["name"],
        sha256=info["sha256"],
        size=int(info["size"]),
        content_type=info["content_type"],
        path=Path(info["path"]),
    )


def _run(channel: _Channel, message: dict[str, Any], max_rss_mb: int) -> dict[str, Any]:
    """Run one stage; the `done` message that answers it (never a traceback as error)."""
    try:
        stage = find_stage(
            message["module"], message["pipeline"], message["stage"], message["qualname"]
        )
        item = message.get("item")
        if message.get("item_is_file"):
            item = _input_file(message["item"])
        ctx = StageContext(
            job_id=message["job_id"],
            stage=stage.name,
            attempt=int(message["attempt"]),
            params=_params(message),
            files=[_input_file(f) for f in message["files"]],
            outputs=message["outputs"],
            runtime=_ChildRuntime(channel, float(message["job_cost"])),
            item=item,
            item_key=message.get("item_key"),
        )
        output = to_json(stage.fn(ctx, **call_arguments(stage, ctx)))
    except JobCancelled:
        return {"op": "done", "ok": False, "kind": "cancelled", "message": "cancelled"}
    except BudgetExhausted as exc:
        return {"op": "done", "ok": False, "kind": "budget", "message": exc.message}
    except MemoryError:
        limit = f" (JOBGATE_PROCESS_MAX_RSS_MB={max_rss_mb})" if max_rss_mb else ""
        return {
            "op": "done",
            "ok": False,
            "kind": "error",
            "message": f"MemoryError: the stage's process ran out of memory{limit}",
            "recycle": True,
        }
    except Exception as exc:
        return {
            "op": "done",
            "ok": False,
            "kind": "error",
            "message": str(exc) or type(exc).__name__,
            "traceback": traceback.format_exc(limit=20)[-8000:],
        }
    return {"op": "done", "ok": True, "output": output}


def _params(message: dict[str, Any]) -> Any:
    """The params as stage code sees them: the pipeline's model instance, or a dict."""
    model = message.get("params_model")
    if model is None:
        return dict(message["params"])
    value: Any = importlib.import_module(model[0])
    for part in str(model[1]).split("."):
        value = getattr(value, part)
    if not (isinstance(value, type) and issubclass(value, BaseModel)):
        raise LookupError(f"{model[0]}:{model[1]} is not a pydantic model")
    return value.model_validate(message["params"])


def _limit_memory(max_rss_mb: int) -> None:
    """Cap the memory this process may allocate, so a greedy stage fails, not the host."""
    if max_rss_mb <= 0:
        return
    limit = max_rss_mb * 1024 * 1024
    # RLIMIT_DATA covers the heap and private mappings on Linux (>= 4.7), close to RSS;
    # elsewhere the address space is the nearest limit.
    which = resource.RLIMIT_DATA if sys.platform.startswith("linux") else resource.RLIMIT_AS
    resource.setrlimit(which, (limit, limit))


def main(argv: list[str]) -> None:
    """Take the protocol pipes, then run stages until the parent closes stdin."""
    max_rss_mb = int(argv[0]) if argv else 0
    # The protocol keeps private copies of stdin/stdout; fd 1 becomes stderr so the
    # stage's prints cannot corrupt it, and fd 0 becomes /dev/null.
    proto_in = os.fdopen(os.dup(0), "r", encoding="utf-8")
    proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    _limit_memory(max_rss_mb)
    channel = _Channel(proto_out)
    threading.Thread(
        target=channel.read_forever, args=(proto_in,), name="jobgate-child-reader", daemon=True
    ).start()
    while True:
        message = channel.runs.get()
        done = _run(channel, message, max_rss_mb)
        channel.send({**done, "run": message["run"]})


if __name__ == "__main__":
    main(sys.argv[1:])
