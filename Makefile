# mergelab: two commands do all set-up —  `make demo`  and  `make test`.
# The venv takes PyTorch's CPU wheel (torch==2.13.0) first, so pip never pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mergelab-installed
DEMO_OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test test-slow test-ray lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: setup  ## train two models on digits, merge them several ways, write a report
	$(VENV)/bin/mergelab demo --out $(DEMO_OUT)

test: setup  ## the test suite CI runs (slow studies excluded; property tests included)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/python -m pytest -q -n auto

test-slow: setup  ## also the slow study tests
	$(VENV)/bin/python -m pytest -q -n auto -m "not ray"

test-ray: setup  ## the Ray backend's tests (installs the ray extra)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[ray]"
	$(VENV)/bin/python -m pytest -q -m ray

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: setup  ## zoo accuracies, matching vs rebasin, checkpoint merging vs mergekit/FusionBench (installs the bench extra)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[bench]"
	$(PY) benchmarks/zoo_accuracy.py
	$(PY) benchmarks/matching.py
	$(PY) benchmarks/checkpoints.py --size-mib 256

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
