# jobgate — two commands: `make run` and `make test`. Everything else bootstraps itself.
PYTHON ?= python3
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
# Test processes: most tests wait on servers and subprocesses, so more than the cores.
TEST_WORKERS ?= 3

.DEFAULT_GOAL := help
.PHONY: help run test lint typecheck unit bench bench-peers bench-compare lock clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(UV):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "jobgate needs Python >= 3.11"; exit 1; }
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check "uv>=0.4,<1"

uv.lock: pyproject.toml | $(UV)
	$(UV) lock --python $(PYTHON)
	@touch $@

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --compile-bytecode --python $(PYTHON)
	@touch $@

lock: $(UV) ## refresh uv.lock after editing pyproject.toml
	$(UV) lock --python $(PYTHON)

run: $(VENV)/.synced ## start the API and a worker on 127.0.0.1:8000 (SQLite, local blobs)
	$(BIN)/jobgate serve

lint: $(VENV)/.synced ## ruff and mypy --strict
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy

test: lint ## lint, type-check and run every test (real servers when reachable)
	@# Tests start jobgate processes by the hundred; with PYTHONDONTWRITEBYTECODE set
	@# each would compile every module again (4 s instead of 1 s per start).
	@$(BIN)/python -m compileall -q -j 0 src tests > /dev/null
	$(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

unit: $(VENV)/.synced ## only the tests that need no server
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

bench: $(VENV)/.synced ## benchmarks (never part of CI); figures go to bench/RESULTS.md
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-peers: $(VENV)/.synced ## peer job queues side by side (venvs in .bench-venvs/; never in CI)
	$(BIN)/python -m bench.peers $(BENCH_ARGS)

bench-compare: $(VENV)/.synced ## this checkout against commit REF, in pairs (never in CI)
	$(BIN)/python -m bench.compare $(REF) $(BENCH_ARGS)

clean: ## remove the virtualenvs and the embedded data
	rm -rf $(VENV) $(TOOLS) .bench-venvs .jobgate .pytest_cache .mypy_cache .ruff_cache
