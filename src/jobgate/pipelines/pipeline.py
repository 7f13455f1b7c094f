"""`Pipeline` and its stages: what users write, checked when it is declared."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from pydantic import BaseModel, ValidationError

from jobgate.errors import PipelineDefinitionError, ValidationFailed
from jobgate.pipelines.files import FileRule, FilesSummary

Isolation = Literal["async", "thread", "process"]
Estimate = Callable[[Any, FilesSummary], float]
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


@dataclass(eq=False)
class Stage:
    """One step of a pipeline: a function, when it may run, and how."""

    name: str
    fn: Callable[..., Any]
    after: tuple[str, ...]
    timeout_s: float | None
    retries: int
    backoff_s: float
    queue: str
    isolation: Isolation
    map_over: str | None = None
    dependency_args: tuple[str, ...] = field(default=())
    takes_item: bool = False
    pipeline: str = ""

    @property
    def is_map(self) -> bool:
        return self.map_over is not None

    @property
    def is_async(self) -> bool:
        return self.isolation == "async"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "after": list(self.after),
            "map": self.is_map,
            "queue": self.queue,
            "timeout_s": self.timeout_s,
            "retries": self.retries,
        }


class Pipeline:
    """A named, versioned DAG of stages with a params schema and a file rule.

    Args:
        name: how clients name it (`POST /v1/jobs {"pipeline": name}`).
        version: a label; jobs record the version that ran them.
        params: a pydantic model the job's params must satisfy (None: any JSON object).
        files: the files a job takes (None: no files).
        estimate: pre-flight cost in USD from the params and the files.
        description: one line for `GET /v1/pipelines`.
        max_running: the most stages of this pipeline running at once, over all workers
            (None: no cap).
    """

    def __init__(
        self,
        name: str,
        version: str = "1",
        *,
        params: type[BaseModel] | None = None,
        files: FileRule | None = None,
        estimate: Estimate | None = None,
        description: str = "",
        max_running: int | None = None,
    ) -> None:
        if not _NAME.match(name):
            raise PipelineDefinitionError(
                f"pipeline name {name!r} must be 1-63 lower-case letters, digits, '_', '.' or '-'"
            )
        self.name = name
        self.version = str(version)
        self.params_model = params
        self.files = files
        if max_running is not None and max_running < 1:
            raise PipelineDefinitionError(f"pipeline {name!r}: max_running must be at least 1")
        self.max_running = max_running
        self.estimate_fn = estimate
        self.description = description or (params.__doc__ or "" if params else "").strip()
        self.stages: dict[str, Stage] = {}
        self._order: tuple[str, ...] | None = None  # computed once every stage is declared

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, version={self.version!r}, stages={list(self.stages)})"

    # -- declaring stages -------------------------------------------------------------

    @overload
    def stage(self, fn: Callable[..., Any], /) -> Stage: ...
    @overload
    def stage(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        after: Iterable[Stage | str] = (),
        timeout: float | None = None,
        retries: int = 0,
        backoff: float = 1.0,
        queue: str = "default",
        isolation: Isolation | None = None,
    ) -> Callable[[Callable[..., Any]], Stage]: ...

    def stage(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        after: Iterable[Stage | str] = (),
        timeout: float | None = None,
        retries: int = 0,
        backoff: float = 1.0,
        queue: str = "default",
        isolation: Isolation | None = None,
    ) -> Stage | Callable[[Callable[..., Any]], Stage]:
        """Declare a stage. Dependencies must already be declared, so cycles cannot form.

        Args:
            name: defaults to the function's name.
            after: stages whose outputs this one receives, by parameter name.
            timeout: seconds one attempt may run (None: no limit).
            retries: further attempts after a failure, with exponential backoff and jitter.
            backoff: the first retry's delay in seconds; it doubles each attempt.
            queue: the queue workers take this stage from.
            isolation: `async` (coroutines), `thread` (default for sync functions) or
                `process` (sync functions, each attempt in a worker subprocess: hard
                timeouts and cancellation, crash and memory containment).
        """

        def register(func: Callable[..., Any]) -> Stage:
            return self._add(func, name, after, timeout, retries, backoff, queue, isolation, None)

        return register(fn) if fn is not None else register

    def map_stage(
        self,
        *,
        over: Stage | str,
        name: str | None = None,
        after: Iterable[Stage | str] = (),
        timeout: float | None = None,
        retries: int = 0,
        backoff: float = 1.0,
        queue: str = "default",
        isolation: Isolation | None = None,
    ) -> Callable[[Callable[..., Any]], Stage]:
        """Declare a stage that runs once per item of `over` (`"files"` or a stage's list).

        Each item succeeds or fails on its own and becomes one of the job's records. The
        stage's output, as later stages receive it, is
        `{"results": [{"key", "index", "data"}], "errors": [{"key", "index", "error"}]}`.
        """
        source = over.name if isinstance(over, Stage) else over

        def register(func: Callable[..., Any]) -> Stage:
            return self._add(func, name, after, timeout, retries, backoff, queue, isolation, source)

        return register

    def _add(
        self,
        fn: Callable[..., Any],
        name: str | None,
        after: Iterable[Stage | str],
        timeout: float | None,
        retries: int,
        backoff: float,
        queue: str,
        isolation: Isolation | None,
        map_over: str | None,
    ) -> Stage:
        stage_name = name or fn.__name__
        where = f"pipeline {self.name!r}, stage {stage_name!r}"
        if not _NAME.match(stage_name):
            raise PipelineDefinitionError(f"{where}: invalid stage name")
        if stage_name in self.stages:
            raise PipelineDefinitionError(f"{where}: a stage of that name is already declared")
        deps: list[str] = []
        for dep in after:
            dep_name = dep.name if isinstance(dep, Stage) else str(dep)
            known = self.stages.get(dep_name)
            if known is None or (isinstance(dep, Stage) and known is not dep):
                raise PipelineDefinitionError(
                    f"{where}: depends on {dep_name!r}, which is not a stage declared before it "
                    "in this pipeline"
                )
            if dep_name not in deps:
                deps.append(dep_name)
        if map_over is not None and map_over != "files":
            if map_over not in self.stages:
                raise PipelineDefinitionError(
                    f"{where}: maps over {map_over!r}, "
                    "which is neither 'files' nor a declared stage"
                )
            if map_over not in deps:
                deps.append(map_over)
        if map_over == "files" and self.files is None:
            raise PipelineDefinitionError(f"{where}: maps over files but the pipeline takes none")
        if retries < 0 or backoff < 0 or (timeout is not None and timeout <= 0):
            raise PipelineDefinitionError(f"{where}: retries, backoff and timeout must be positive")
        is_coroutine = inspect.iscoroutinefunction(fn)
        chosen: Isolation = isolation or ("async" if is_coroutine else "thread")
        if chosen == "async" and not is_coroutine:
            raise PipelineDefinitionError(f"{where}: isolation='async' needs an async function")
        if chosen != "async" and is_coroutine:
            raise PipelineDefinitionError(f"{where}: an async function runs with isolation='async'")
        if chosen == "process" and getattr(fn, "__module__", "__main__") == "__main__":
            raise PipelineDefinitionError(
                f"{where}: isolation='process' needs the function in an importable module "
                "(not __main__), so the stage's subprocess can import it"
            )
        signature = inspect.signature(fn)
        params = list(signature.parameters)
        if not params:
            raise PipelineDefinitionError(f"{where}: the function must take the StageContext first")
        accepts_any = any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
        )
        dependency_args = tuple(d for d in deps if accepts_any or d in params[1:])
        for extra in params[1:]:
            kind = signature.parameters[extra].kind
            if kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
                continue
            if (
                extra not in deps
                and extra != "item"
                and signature.parameters[extra].default is (inspect.Parameter.empty)
            ):
                raise PipelineDefinitionError(
                    f"{where}: parameter {extra!r} names no stage in after=[...]"
                )
        stage = Stage(
            name=stage_name,
            fn=fn,
            after=tuple(deps),
            timeout_s=timeout,
            retries=retries,
            backoff_s=backoff,
            queue=queue,
            isolation=chosen,
            map_over=map_over,
            dependency_args=dependency_args,
            takes_item=map_over is not None and ("item" in params[1:] or accepts_any),
            pipeline=self.name,
        )
        self.stages[stage_name] = stage
        self._order = None
        return stage

    # -- reading the DAG ----------------------------------------------------------------

    def check(self) -> None:
        """Raise `PipelineDefinitionError` unless the pipeline can run."""
        if not self.stages:
            raise PipelineDefinitionError(f"pipeline {self.name!r} has no stages")
        self.topological_order()

    def topological_order(self) -> tuple[str, ...]:
        """Stage names with every stage after its dependencies (computed once: every
        submit reads it)."""
        if self._order is None:
            self._order = self._sort()
        return self._order

    def _sort(self) -> tuple[str, ...]:
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(name: str, path: tuple[str, ...]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = " -> ".join((*path, name))
                raise PipelineDefinitionError(f"pipeline {self.name!r} has a cycle: {cycle}")
            state[name] = 1
            for dep in self.stages[name].after:
                visit(dep, (*path, name))
            state[name] = 2
            order.append(name)

        for stage_name in self.stages:
            visit(stage_name, ())
        return tuple(order)

    def roots(self) -> list[str]:
        return [s.name for s in self.stages.values() if not s.after]

    def sinks(self) -> list[str]:
        needed = {dep for s in self.stages.values() for dep in s.after}
        return [name for name in self.topological_order() if name not in needed]

    def dependents(self, name: str) -> list[str]:
        return [s.name for s in self.stages.values() if name in s.after]

    # -- validating a submission --------------------------------------------------------

    def validate_params(self, raw: Any) -> dict[str, Any]:
        """The params as stored: validated by the model, defaults filled in, JSON-ready.

        Raises:
            ValidationFailed: with `errors[].loc` starting at `params`.
        """
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ValidationFailed(
                "params must be a JSON object",
                errors=[{"loc": ["params"], "msg": "Input should be a valid dictionary"}],
            )
        if self.params_model is None:
            return dict(raw)
        try:
            model = self.params_model.model_validate(dict(raw))
        except ValidationError as exc:
            raise ValidationFailed(
                "params do not match the pipeline's schema",
                errors=[
                    {"loc": ["params", *err["loc"]], "msg": err["msg"], "type": err["type"]}
                    for err in exc.errors(include_input=False, include_url=False)
                ],
            ) from None
        return model.model_dump(mode="json")

    def parse_params(self, stored: Mapping[str, Any]) -> Any:
        """Stored params as stage code sees them: the model instance, or a dict."""
        if self.params_model is None:
            return dict(stored)
        return self.params_model.model_validate(dict(stored))

    def estimate(self, params: Mapping[str, Any], files: Sequence[Mapping[str, Any]]) -> float:
        """The pre-flight cost estimate in USD (0 without an `estimate`)."""
        if self.estimate_fn is None:
            return 0.0
        value = self.estimate_fn(
            self.parse_params(params), FilesSummary(tuple(dict(f) for f in files))
        )
        return max(0.0, float(value))

    def params_schema(self) -> dict[str, Any]:
        if self.params_model is None:
            return {"type": "object", "additionalProperties": True}
        return self.params_model.model_json_schema()

    def describe(self) -> dict[str, Any]:
        """The pipeline as `GET /v1/pipelines` shows it."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "params_schema": self.params_schema(),
            "files": self.files.describe() if self.files else None,
            "stages": [self.stages[n].describe() for n in self.topological_order()],
        }
