"""The views' dicts are exactly what their response models would send.

Hot routes return `views.respond(...)` and so skip FastAPI's re-validation against
the route's `response_model`; these tests are what keeps the two shapes one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.responses import JSONResponse

from jobgate.api import views
from jobgate.api.models import Job, JobBatch
from jobgate.store.repositories.jobs import JobSnapshot

_FRESH_JOB: dict[str, Any] = {
    "id": "0190a0c2-0000-7000-8000-000000000001",
    "pipeline": "noop",
    "pipeline_version": "1",
    "owner": "alice",
    "status": "queued",
    "cancel_requested": False,
    "progress": 0.0,
    "stage": None,
    "params": {},
    "files": [],
    "priority": 0,
    "correlation_id": None,
    "estimated_usd": 0.0,
    "actual_usd": 0.0,
    "budget_usd": 1.0,
    "result": None,
    "error": None,
    "records_succeeded": 0,
    "records_failed": 0,
    "records_expected": 0,
    "created_at": 1_764_000_000.25,
    "started_at": None,
    "finished_at": None,
}
_FRESH_STAGE: dict[str, Any] = {
    "name": "run",
    "status": "queued",
    "attempt": 0,
    "progress": 0.0,
    "started_at": None,
    "finished_at": None,
    "error": None,
}


def _finished() -> JobSnapshot:
    job = {
        **_FRESH_JOB,
        "status": "failed",
        "progress": 0.5,
        "stage": "score",
        "params": {"threshold": 0.7, "tags": ["a", "b"], "nested": {"k": None}},
        "files": [
            {"name": "cv.pdf", "sha256": "ab" * 32, "size": 1234, "content_type": "application/pdf"}
        ],
        "priority": -3,
        "correlation_id": "corr-1",
        "estimated_usd": 0.02,
        "actual_usd": 0.0125,
        "result": {"score": 0.9, "labels": ["x"]},
        "error": {"type": "stage_failed", "message": "boom", "stage": "score"},
        "records_succeeded": 3,
        "records_failed": 1,
        "records_expected": 4,
        "started_at": 1_764_000_001.5,
        "finished_at": 1_764_000_009.0,
    }
    stages = [
        {**_FRESH_STAGE, "name": "parse", "status": "succeeded", "attempt": 1, "progress": 1.0,
         "started_at": 1_764_000_001.5, "finished_at": 1_764_000_002.0},
        {**_FRESH_STAGE, "name": "score", "status": "failed", "attempt": 3, "progress": 0.5,
         "started_at": 1_764_000_002.0, "finished_at": 1_764_000_009.0,
         "error": {"type": "stage_failed", "message": "boom"}},
    ]  # fmt: skip
    artifacts = [
        {"name": "report.json", "sha256": "cd" * 32, "size": 99,
         "content_type": "application/json", "is_primary": True},
    ]  # fmt: skip
    return JobSnapshot(job=job, stages=stages, artifacts=artifacts)


SNAPSHOTS = {
    "fresh": JobSnapshot(job=_FRESH_JOB, stages=[_FRESH_STAGE]),
    "finished": _finished(),
}


@pytest.mark.parametrize("name", sorted(SNAPSHOTS))
def test_a_job_view_is_what_the_job_model_sends(name: str) -> None:
    view = views.job(SNAPSHOTS[name])
    modelled = Job.model_validate(view).model_dump(mode="json", by_alias=True)
    assert view == modelled
    # and the bytes on the wire parse back to the same document
    assert json.loads(views.respond(view).body) == modelled


def test_a_batch_view_is_what_the_batch_model_sends() -> None:
    body = {"jobs": [views.job(s) for s in SNAPSHOTS.values()]}
    assert body == JobBatch.model_validate(body).model_dump(mode="json", by_alias=True)


def test_the_wire_form_is_starlettes_compact_utf8_json() -> None:
    """`respond` renders what Starlette's `JSONResponse` would (compact, UTF-8, not
    ASCII-escaped), except that a float JSON cannot hold is `null`, not a 500."""
    body = {"name": "façade ✓ \u2028", "n": [1, 2.5, None, True], "deep": {"x": {}}}
    assert views.respond(body).body == JSONResponse(body).body
    assert json.loads(views.respond({"x": float("nan"), "y": float("inf")}).body) == {
        "x": None,
        "y": None,
    }
