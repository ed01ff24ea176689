# Everything runs from a virtualenv under the repo (.venv), created on first use;
# each target installs only what it needs, once per change of pyproject.toml.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: help venv test lint typecheck pytest demo bench bench-compare clean redis-server

help:
	@echo "make demo   - live batching demo (sets up .venv first)"
	@echo "make test   - ruff + mypy --strict + pytest (asyncio and uvloop) with coverage"
	@echo "make bench  - per-item overhead benchmark (asyncio and uvloop)"
	@echo "make bench-compare - asyncbatch vs the alternatives (own venv: .venv-bench)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(VENV)/.stamp-base: pyproject.toml | $(PY)
	$(PIP) -e ".[uvloop]"
	@touch $@

$(VENV)/.stamp-test: pyproject.toml | $(PY)
	$(PIP) -e ".[test]"
	@touch $@

$(VENV)/.stamp-bench: pyproject.toml | $(PY)
	$(PIP) -e ".[bench]"
	@touch $@

venv: $(VENV)/.stamp-test

lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check asyncbatch tests examples benchmarks
	$(VENV)/bin/ruff format --check asyncbatch tests examples benchmarks

typecheck: $(VENV)/.stamp-test
	$(VENV)/bin/mypy

pytest: $(VENV)/.stamp-test redis-server
	$(PY) -m pytest --cov --cov-report=term $(PYTEST_ARGS)

# The Redis Streams tests start their own redis-server (>= 6.2) on 127.0.0.1.
# Use an installed one, else install Debian's package (7.0.x; we run as root
# in CI). If that fails the tests fail in CI (CI=true) and skip elsewhere.
redis-server:
	@command -v redis-server >/dev/null || { \
		echo "installing redis-server (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null \
		|| echo "could not install redis-server: the Redis tests will fail in CI, skip elsewhere"; }

test: lint typecheck pytest

demo: $(VENV)/.stamp-base
	$(VENV)/bin/asyncbatch demo $(DEMO_ARGS)

bench: $(VENV)/.stamp-bench
	$(PY) benchmarks/overhead.py $(BENCH_ARGS)

# The competitors (Ray among them) live in their own venv, never in the test one.
.venv-bench/.stamp: pyproject.toml benchmarks/requirements-compare.txt
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install --quiet --disable-pip-version-check \
		-e . -r benchmarks/requirements-compare.txt
	@touch $@

bench-compare: .venv-bench/.stamp
	.venv-bench/bin/python benchmarks/compare.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .coverage htmlcov
