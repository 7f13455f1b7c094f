"""The example pipelines load from their import paths and run end to end."""

from __future__ import annotations

from jobgate.pipelines import registry as pipeline_registry
from tests.engine.conftest import Engine


async def test_cv_screening_shortlists_the_best_cv(engine: Engine) -> None:
    engine.registry.add(pipeline_registry.load("examples.cv_screening:pipeline"))
    await engine.start_worker()
    files = [
        await engine.upload("alice.txt", b"Python, SQL and Kubernetes for 6 years"),
        await engine.upload("bob.md", b"# Bob\nExcel wizard, some SQL"),
        await engine.upload("broken.txt", b"\xff\xfe not text"),
    ]
    job_id = await engine.submit(
        "cv-screening", {"keywords": ["python", "sql", "kubernetes"], "shortlist": 2}, files=files
    )
    snapshot = await engine.wait(job_id)
    assert snapshot.job["status"] == "succeeded", snapshot.job["error"]
    assert snapshot.job["result"]["shortlist"] == [
        {"cv": "alice.txt", "score": 1.0},
        {"cv": "bob.md", "score": 1 / 3},
    ]
    assert snapshot.job["result"]["unreadable"] == 1
    assert abs(snapshot.job["actual_usd"] - 0.002) < 1e-9
    assert [a["name"] for a in snapshot.artifacts] == ["shortlist.json"]
