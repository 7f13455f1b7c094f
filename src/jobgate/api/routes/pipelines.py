"""`GET /v1/pipelines` and `GET /v1/pipelines/{name}`: what can be submitted."""

from __future__ import annotations

from fastapi import APIRouter

from jobgate.api.deps import CurrentPrincipal, StateDep
from jobgate.api.schemas import PipelineList, PipelineView, problem_responses
from jobgate.errors import NotFound, UnknownPipeline

router = APIRouter(prefix="/v1/pipelines", tags=["pipelines"])


@router.get("", response_model=PipelineList, responses=problem_responses(401))
async def list_pipelines(state: StateDep, principal: CurrentPrincipal) -> PipelineList:
    """Every pipeline this deployment runs, by name."""
    del principal
    return PipelineList(
        pipelines=[PipelineView.model_validate(p.describe()) for p in state.registry]
    )


@router.get("/{name}", response_model=PipelineView, responses=problem_responses(401, 404))
async def get_pipeline(name: str, state: StateDep, principal: CurrentPrincipal) -> PipelineView:
    """One pipeline: its params schema, file rule and stages."""
    del principal
    try:
        pipeline = state.registry.get(name)
    except UnknownPipeline as exc:
        raise NotFound(f"no pipeline named {name!r}") from exc
    return PipelineView.model_validate(pipeline.describe())
