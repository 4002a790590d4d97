# Stepline front door: `make setup`, `make test`, `make quickstart`, `make bench`.
# Everything runs from the project virtualenv in .venv, which `setup` creates.

SHELL := /bin/bash

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp
# The runtime alone (no test or bench extras): what `quickstart` needs.
RUN_STAMP := $(VENV)/.stamp-run

# Extra arguments for pytest, e.g. `make test PYTEST_ARGS='-k sqlite -x'`.
PYTEST_ARGS ?=

.PHONY: setup quickstart lint apidoc images test test-testcontainers bench bench-peers soak clean

# setup: create .venv and install stepline editable with test+bench extras (skipped while the stamp is newer than pyproject.toml).
setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip 'setuptools>=77' wheel
	$(PY) -m pip install --quiet -e '.[test,bench]'
	@touch $@ $(RUN_STAMP)

# The runtime install: stepline editable, its dependencies only (skipped after `setup`, which has it all).
$(RUN_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip 'setuptools>=77' wheel
	$(PY) -m pip install --quiet -e .
	@touch $@

# quickstart: run the example: embedded worker, trigger an order, print the result
# (installs the runtime only, not the test and bench extras).
quickstart: $(RUN_STAMP)
	$(PY) examples/process_order.py

# lint: ruff, mypy --strict on the package as it installs (scripts/typecheck.sh), then the layering
# contracts of docs/architecture.md (import-linter, scripts/importlint.sh); fails on any finding.
lint: setup
	$(PY) -m ruff check engine projections consumers schemas tests examples bench
	PY=$(PY) scripts/typecheck.sh
	PY=$(PY) scripts/importlint.sh

# apidoc: write docs/api/ (signatures and docstrings of the public API) and the settings table of
# docs/configuration.md from the code; tests/test_apidoc.py fails while they are stale.
apidoc: setup
	$(PY) scripts/apidoc.py

# images: a Docker engine (scripts/docker.sh: Debian's docker.io, docker-compose, debootstrap;
# dockerd started when none answers) and the images built offline (scripts/images.sh):
# stepline/debian:bookworm, apache/kafka:<version> from Maven Central's jars, stepline/stepline:local.
# Cached: a second run only checks. Needs root the first time.
images: setup
	scripts/images.sh build

# test: run the test suite; fails on test failures and also when no test is collected (pytest exit code 5).
# The dashboard's browser tests need Debian's chromium, the container tests (tests/test_compose.py,
# tests/test_testcontainers.py, tests/test_docker_images.py) Docker and the images: installed or
# built here when missing (a failure under CI=true; elsewhere, without root, those tests skip).
# The suite's Kafka broker comes from Maven Central's jars (scripts/kafka.sh); the Kafka tests also
# run on a broker in a container, inside the suite (tests/test_testcontainers.py). Ryuk is off: its
# image cannot be pulled without a registry.
test: setup lint
	scripts/browser.sh || test "$${CI:-}" != true
	scripts/images.sh build || test "$${CI:-}" != true
	TESTCONTAINERS_RYUK_DISABLED=true $(PY) -m pytest -q -ra $(PYTEST_ARGS)

# test-testcontainers: only the Kafka tests, on a broker testcontainers starts on the local image.
test-testcontainers: images
	TESTCONTAINERS_RYUK_DISABLED=true $(PY) -m pytest -q -ra tests/test_testcontainers.py -k kafka_suite

# bench: run the benchmarks.
bench: setup
	$(PY) bench/run.py

# bench-peers: Stepline beside DBOS (SQLite, PostgreSQL) and Celery+Redis, installed by bench/peers/setup.sh (needs root for apt).
bench-peers: setup
	bash bench/peers/setup.sh
	$(PY) bench/peers/run_peers.py

# soak: SIGKILL workers under load for 5 minutes (not part of `test`); e.g. SOAK_ARGS='--log kafka --duration 60'.
soak: setup
	$(PY) bench/soak.py $(SOAK_ARGS)

# clean: remove the virtualenv, build artefacts and local run state (not the Docker images:
# `docker image rm` them by the names `scripts/images.sh names` prints).
clean:
	rm -rf $(VENV) build dist *.egg-info .stepline
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
