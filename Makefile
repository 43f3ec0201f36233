# `make demo` and `make test` work on a fresh machine: both set up .venv first.
# TORCH picks the PyTorch build; e.g. `make demo TORCH=torch` for the newest (CUDA) release.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/readaptir demo --force demo-workspace

# two workers, the slow tests started first (tests/conftest.py); `pytest` alone runs one process.
# Passive OpenMP waits: torch's threads in one worker sleep rather than spin while the other runs.
test: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -n 2 --dist worksteal

lint: setup
	$(VENV)/bin/ruff check readaptir tests bench
	$(VENV)/bin/ruff format --check readaptir tests bench

clean:
	rm -rf demo-workspace .pytest_cache
