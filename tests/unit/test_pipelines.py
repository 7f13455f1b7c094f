"""Pipelines are checked when declared, and validate what jobs bring."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from jobgate import FileRule, Pipeline, StageContext
from jobgate.errors import PipelineDefinitionError, UnknownPipeline, ValidationFailed
from jobgate.pipelines import Registry
from jobgate.pipelines.builtins import steps


def test_unknown_dependency_is_refused_with_its_name() -> None:
    p = Pipeline("p")
    with pytest.raises(PipelineDefinitionError, match="'nope'"):

        @p.stage(after=["nope"])
        async def a(ctx: StageContext) -> None: ...


def test_stage_of_another_pipeline_is_refused() -> None:
    other = Pipeline("other")

    @other.stage
    async def first(ctx: StageContext) -> None: ...

    p = Pipeline("p")

    @p.stage(name="first")
    async def mine(ctx: StageContext) -> None: ...

    with pytest.raises(PipelineDefinitionError, match="not a stage declared before it"):

        @p.stage(after=[first])
        async def second(ctx: StageContext) -> None: ...


def test_duplicate_stage_name_is_refused() -> None:
    p = Pipeline("p")

    @p.stage
    async def a(ctx: StageContext) -> None: ...

    with pytest.raises(PipelineDefinitionError, match="already declared"):
        p.stage(name="a")(a.fn)


def test_parameter_that_names_no_dependency_is_refused() -> None:
    p = Pipeline("p")
    with pytest.raises(PipelineDefinitionError, match="'missing' names no stage"):

        @p.stage
        async def a(ctx: StageContext, missing: dict) -> None: ...


def test_isolation_must_fit_the_function() -> None:
    p = Pipeline("p")
    with pytest.raises(PipelineDefinitionError, match="async function"):

        @p.stage(isolation="thread")
        async def a(ctx: StageContext) -> None: ...

    with pytest.raises(PipelineDefinitionError, match="needs an async function"):

        @p.stage(isolation="async")
        def b(ctx: StageContext) -> None: ...


def test_process_isolation_is_for_sync_functions_in_importable_modules() -> None:
    p = Pipeline("p")

    @p.stage(isolation="process")
    def a(ctx: StageContext) -> None: ...

    assert a.isolation == "process"
    assert not a.is_async
    assert a.pipeline == "p"
    with pytest.raises(PipelineDefinitionError, match="runs with isolation='async'"):

        @p.stage(isolation="process")
        async def b(ctx: StageContext) -> None: ...

    def c(ctx: StageContext) -> None: ...

    c.__module__ = "__main__"
    with pytest.raises(PipelineDefinitionError, match="importable module"):
        p.stage(isolation="process")(c)


def test_map_over_files_needs_a_file_rule() -> None:
    p = Pipeline("p")
    with pytest.raises(PipelineDefinitionError, match="takes none"):

        @p.map_stage(over="files")
        def a(ctx: StageContext, item: object) -> None: ...


def test_invalid_names_are_refused() -> None:
    with pytest.raises(PipelineDefinitionError):
        Pipeline("Bad Name")


def test_dag_order_roots_and_sinks() -> None:
    p = Pipeline("p")

    @p.stage
    async def a(ctx: StageContext) -> None: ...

    @p.stage(after=[a])
    async def b(ctx: StageContext) -> None: ...

    @p.stage(after=[a])
    async def c(ctx: StageContext) -> None: ...

    @p.stage(after=[b, c])
    async def d(ctx: StageContext, b: object, c: object) -> None: ...

    order = p.topological_order()
    assert order.index("a") < order.index("b") < order.index("d")
    assert order.index("c") < order.index("d")
    assert p.roots() == ["a"]
    assert p.sinks() == ["d"]
    assert d.dependency_args == ("b", "c")
    assert p.describe()["stages"][-1] == {
        "name": "d",
        "after": ["b", "c"],
        "map": False,
        "queue": "default",
        "timeout_s": None,
        "retries": 0,
    }


def test_empty_pipeline_is_refused_by_the_registry() -> None:
    with pytest.raises(PipelineDefinitionError, match="no stages"):
        Registry([Pipeline("empty")])


class Params(BaseModel):
    prompt: str = Field(min_length=3)
    n: int = 1


def test_params_are_validated_with_locations_under_params() -> None:
    p = Pipeline("p", params=Params)
    with pytest.raises(ValidationFailed) as caught:
        p.validate_params({"prompt": "x", "n": "many"})
    assert caught.value.errors is not None
    locs = sorted(tuple(e["loc"]) for e in caught.value.errors)
    assert locs == [("params", "n"), ("params", "prompt")]
    assert p.validate_params({"prompt": "hello"}) == {"prompt": "hello", "n": 1}


def test_params_must_be_an_object() -> None:
    with pytest.raises(ValidationFailed):
        Pipeline("p").validate_params([1, 2])


def test_steps_estimate_and_schema() -> None:
    stored = steps.validate_params({"steps": 4, "cost_per_step": 0.5})
    assert steps.estimate(stored, []) == 2.0
    assert steps.params_schema()["properties"]["steps"]["maximum"] == 10_000
    with pytest.raises(ValidationFailed):
        steps.validate_params({"steps": 0})
    with pytest.raises(ValidationFailed):
        steps.validate_params({"unknown": 1})


def test_registry_versions() -> None:
    registry = Registry.from_paths([])
    assert registry.names() == ["noop", "steps", "text-stats"]
    assert registry.get("steps", "1") is steps
    with pytest.raises(UnknownPipeline):
        registry.get("steps", "2")
    with pytest.raises(UnknownPipeline):
        registry.get("nope")


def test_registry_loads_import_paths() -> None:
    registry = Registry.from_paths(["tests.engine.pipelines:diamond"], builtins=False)
    assert registry.names() == ["diamond"]
    with pytest.raises(PipelineDefinitionError, match="module:attribute"):
        Registry.from_paths(["nocolon"])
    with pytest.raises(PipelineDefinitionError, match="cannot import"):
        Registry.from_paths(["no.such.module:x"])
    with pytest.raises(PipelineDefinitionError, match="not a jobgate Pipeline"):
        Registry.from_paths(["jobgate.pipelines.builtins:ALL"])


def test_file_rule_wildcards() -> None:
    rule = FileRule(types=["text/*", "audio/wav"])
    assert rule.accepts("text/csv")
    assert rule.accepts("audio/wav")
    assert not rule.accepts("image/png")
    assert FileRule().accepts("anything/at-all")
