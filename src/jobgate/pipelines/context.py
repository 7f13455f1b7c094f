"""`StageContext`: what stage code is handed. The worker supplies the runtime behind it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from jobgate.errors import JobCancelled
from jobgate.pipelines.files import InputFile

ArtifactSource = Path | str | bytes


class StageRuntime(Protocol):
    """What a `StageContext` asks of the worker running it. Every method is thread-safe."""

    def report_progress(self, fraction: float, message: str | None) -> None: ...
    def report_log(self, level: str, text: str) -> None: ...
    def report_cost(self, usd: float, item: str) -> None: ...
    def cancel_requested(self) -> bool: ...
    def job_cost(self) -> float: ...
    def save_artifact_blocking(
        self, name: str, source: ArtifactSource, content_type: str | None, primary: bool
    ) -> dict[str, Any]: ...
    async def save_artifact(
        self, name: str, source: ArtifactSource, content_type: str | None, primary: bool
    ) -> dict[str, Any]: ...


class StageContext:
    """Everything a stage sees of its job, and how it reports back.

    Attributes:
        job_id: the job's id.
        stage: this stage's name.
        attempt: 1 on the first run, counting every attempt the stage ever had.
        params: the validated params (the pipeline's model instance, or a dict).
        files: the job's input files.
        outputs: the outputs of the stages this one depends on, by stage name.
        item: for a map stage, the item this run handles (an `InputFile` or a list element).
        item_key: for a map stage, the item's record key.
    """

    def __init__(
        self,
        *,
        job_id: str,
        stage: str,
        attempt: int,
        params: Any,
        files: Sequence[InputFile],
        outputs: Mapping[str, Any],
        runtime: StageRuntime,
        item: Any = None,
        item_key: str | None = None,
    ) -> None:
        self.job_id = job_id
        self.stage = stage
        self.attempt = attempt
        self.params = params
        self.files = list(files)
        self.outputs = dict(outputs)
        self.item = item
        self.item_key = item_key
        self._runtime = runtime

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report this stage's progress, from 0.0 to 1.0 (clamped), with an optional note."""
        self._runtime.report_progress(min(1.0, max(0.0, float(fraction))), message)

    def log(self, text: str, level: str = "info") -> None:
        """Add a `message` event to the job's log."""
        self._runtime.report_log(level, str(text))

    def add_cost(self, usd: float, item: str = "") -> None:
        """Charge the job `usd` dollars.

        Raises:
            BudgetExhausted: the job's actual cost is now over its budget; let it propagate.
        """
        if usd < 0:
            raise ValueError("cost must not be negative")
        self._runtime.report_cost(float(usd), item)

    @property
    def cost_usd(self) -> float:
        """The job's actual cost so far, failed attempts included."""
        return self._runtime.job_cost()

    @property
    def cancelled(self) -> bool:
        """Whether the job's cancellation was requested."""
        return self._runtime.cancel_requested()

    def check_cancelled(self) -> None:
        """Raise `JobCancelled` if the job's cancellation was requested."""
        if self._runtime.cancel_requested():
            raise JobCancelled()

    def save_artifact(
        self,
        name: str,
        source: ArtifactSource,
        *,
        content_type: str | None = None,
        primary: bool = False,
    ) -> dict[str, Any]:
        """Store a file (a path, or bytes) as an artifact of the job; from sync stages.

        Async stages use `asave_artifact`, which does not block the event loop.
        """
        return self._runtime.save_artifact_blocking(name, source, content_type, primary)

    async def asave_artifact(
        self,
        name: str,
        source: ArtifactSource,
        *,
        content_type: str | None = None,
        primary: bool = False,
    ) -> dict[str, Any]:
        """`save_artifact` for async stages."""
        return await self._runtime.save_artifact(name, source, content_type, primary)
