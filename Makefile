# `make demo` and `make test` work on a fresh machine: both set up .venv first.
# TORCH picks the PyTorch release and TORCH_INDEX where pip takes it from; e.g.
# `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` for the CPU build where PyPI's
# default is a CUDA one.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH)"
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
