# Everything runs from a virtualenv under the repo, created on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: help venv test lint typecheck pytest demo bench clean

help:
	@echo "make demo   - live batching demo (sets up .venv first)"
	@echo "make test   - ruff + mypy --strict + pytest (asyncio and uvloop) with coverage"
	@echo "make bench  - per-item overhead benchmark (asyncio and uvloop)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test,bench]"
	@touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check asyncbatch tests examples benchmarks
	$(VENV)/bin/ruff format --check asyncbatch tests examples benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest --cov --cov-report=term $(PYTEST_ARGS)

test: lint typecheck pytest

demo: $(STAMP)
	$(VENV)/bin/asyncbatch demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .coverage htmlcov
