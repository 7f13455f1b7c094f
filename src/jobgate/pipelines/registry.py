"""Which pipelines a process knows: the built-ins plus those named in settings."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator

from jobgate.errors import PipelineDefinitionError, UnknownPipeline
from jobgate.pipelines.pipeline import Pipeline


def load(path: str) -> Pipeline:
    """Import `module:attribute` and return the `Pipeline` it names."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise PipelineDefinitionError(f"pipeline path {path!r} must look like 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PipelineDefinitionError(f"cannot import {module_name!r} for {path!r}: {exc}") from exc
    value = getattr(module, attribute, None)
    if not isinstance(value, Pipeline):
        raise PipelineDefinitionError(f"{path!r} is not a jobgate Pipeline")
    return value


class Registry:
    """Pipelines by name; one version of each name."""

    def __init__(self, pipelines: Iterable[Pipeline] = ()) -> None:
        self._pipelines: dict[str, Pipeline] = {}
        for pipeline in pipelines:
            self.add(pipeline)

    @classmethod
    def from_paths(cls, paths: Iterable[str], *, builtins: bool = True) -> Registry:
        """The built-in pipelines (unless told not to) and those at `paths`."""
        registry = cls()
        if builtins:
            from jobgate.pipelines import builtins as builtin_module

            for pipeline in builtin_module.ALL:
                registry.add(pipeline)
        for path in paths:
            registry.add(load(path))
        return registry

    def add(self, pipeline: Pipeline) -> None:
        pipeline.check()
        if pipeline.name in self._pipelines and self._pipelines[pipeline.name] is not pipeline:
            raise PipelineDefinitionError(f"two pipelines are named {pipeline.name!r}")
        self._pipelines[pipeline.name] = pipeline

    def get(self, name: str, version: str | None = None) -> Pipeline:
        """The pipeline named `name` (at `version`, if given).

        Raises:
            UnknownPipeline: no such name, or not at that version.
        """
        pipeline = self._pipelines.get(name)
        if pipeline is None:
            raise UnknownPipeline(f"no pipeline named {name!r}")
        if version is not None and str(version) != pipeline.version:
            raise UnknownPipeline(
                f"pipeline {name!r} has version {pipeline.version!r}, not {version!r}"
            )
        return pipeline

    def __iter__(self) -> Iterator[Pipeline]:
        return iter(sorted(self._pipelines.values(), key=lambda p: p.name))

    def __contains__(self, name: object) -> bool:
        return name in self._pipelines

    def names(self) -> list[str]:
        return sorted(self._pipelines)
