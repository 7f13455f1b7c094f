"""`tune_gc`: what `jobgate serve` and `jobgate worker` do to the garbage collector."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobgate.cli import app
from jobgate.tuning import tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_tuning_raises_the_young_threshold_and_freezes_the_startup_heap() -> None:
    gc.unfreeze()
    middle, old = gc.get_threshold()[1:]
    tune_gc(50_000)
    assert gc.get_threshold() == (50_000, middle, old)
    assert gc.get_freeze_count() > 0
    # cycles made after start-up are still collected
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1


@pytest.mark.usefixtures("restored_gc")
def test_zero_keeps_pythons_defaults() -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    tune_gc(0)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


@pytest.mark.usefixtures("restored_gc")
def test_jobgate_serve_tunes_the_collector_before_it_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`jobgate serve` applies `JOBGATE_GC_THRESHOLD` before uvicorn starts serving."""
    import uvicorn

    gc.unfreeze()
    seen: list[tuple[int, int, int]] = []

    def run_nothing(self: uvicorn.Server, sockets: object = None) -> None:
        seen.append(gc.get_threshold())

    monkeypatch.setattr(uvicorn.Server, "run", run_nothing)
    # Logging is the process's: left alone, it would write to the runner's closed stdout.
    monkeypatch.setattr("jobgate.observability.logging.configure_logging", lambda _: None)
    env = {"JOBGATE_DATA_DIR": str(tmp_path / "data"), "JOBGATE_GC_THRESHOLD": "12345"}
    result = CliRunner().invoke(app, ["serve", "--worker-concurrency", "0"], env=env)
    assert result.exit_code == 3, result.output  # never started: run did nothing
    assert [threshold[0] for threshold in seen] == [12345]
    assert gc.get_freeze_count() > 0
