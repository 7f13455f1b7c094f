"""Schemathesis against a real `jobgate serve`: every operation of `/openapi.json`,
with generated valid (positive) and invalid (negative) input, authenticated as an
admin; invalid input must be refused with a 4xx.

No answer may be a 5xx, and every answer must match the schema (status documented,
content type, body and headers). Bounded and reproducible: a fixed number of
examples per operation and a derandomised (fixed-seed) Hypothesis.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance
from schemathesis.generation import GenerationMode

from jobgate.api.app import create_app
from jobgate.config import Settings
from tests.e2e.conftest import Server, start_server

pytestmark = pytest.mark.e2e

EXAMPLES_PER_OPERATION = 20
# Not checked: that every schema-valid request is accepted. Some refusals depend on
# state the schema cannot express (an unknown pipeline name, an expiry in the past, a
# blob the caller does not own); they are 4xx problems, and still checked for form.


# An endless SSE stream is read for this long (heartbeats and all), then dropped; each
# example costs that much, so it gets fewer.
ENDLESS_STREAMS = {"GET /v1/events"}
STREAM_READ_S = 2.0
STREAM_EXAMPLES = 5


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("fuzz"),
        None,
        worker_concurrency=1,
        settings={
            "JOBGATE_SHUTDOWN_GRACE_S": "0",
            "JOBGATE_CANCEL_GRACE_S": "0",
            "JOBGATE_LOG_LEVEL": "WARNING",
            # Endless streams are read for `STREAM_READ_S`: they must not go silent.
            "JOBGATE_SSE_HEARTBEAT_S": "0.5",
        },
    )
    try:
        yield running
    finally:
        code = running.stop()
        assert code == 0, running.log.read_text()[-5000:]


def _operations() -> dict[str, schemathesis.APIOperation]:
    # The schema of the app itself, built without starting it: the served one is the
    # same document, and this way each operation is its own test at collection time.
    document = create_app(Settings(data_dir=Path("/nonexistent"))).openapi()
    loaded = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in loaded.get_all_operations()]
    return {operation.label: operation for operation in operations}


def _has_input_to_break(operation: schemathesis.APIOperation) -> bool:
    # Invalid input exists only for constrained input: a body or typed query values.
    # (A free-form string in the path has no invalid form to generate.)
    kinds = {parameter.location for parameter in operation.iter_parameters()}
    return bool(operation.body) or "query" in kinds


OPERATIONS = _operations()
CASES = [
    pytest.param(label, mode, id=f"{label} {mode.value}")
    for label, operation in sorted(OPERATIONS.items())
    for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or _has_input_to_break(operation)
]


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_every_operation_answers_within_its_schema(
    label: str, mode: GenerationMode, fuzzed_server: Server
) -> None:
    """No 5xx, and every response conforms to the documented schema."""
    headers = {"Authorization": f"Bearer {fuzzed_server.key}"}

    endless = label in ENDLESS_STREAMS

    @settings(
        max_examples=STREAM_EXAMPLES if endless else EXAMPLES_PER_OPERATION,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=OPERATIONS[label].as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(
            base_url=fuzzed_server.url,
            headers=headers,
            timeout=STREAM_READ_S if endless else 30,
            excluded_checks=[positive_data_acceptance],
        )

    check()
