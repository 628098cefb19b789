# pqueue — every target sets itself up: `make test` and `make cluster` work on
# a fresh clone with only python3 (3.11+) installed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROTOS := $(wildcard proto/pqueue/v1/*.proto)
# Tests marked slow (soak, long fault runs) are left out of `make test`.
PYTEST_ARGS ?= -m "not slow"

.PHONY: install proto proto-bundle proto-check lint typecheck test test-all screenshots cluster bench bench-quick bench-tenants bench-shared bench-scale clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,web]'
	touch $(STAMP)

install: $(STAMP)

# Generated code lives in pqueue/v1/, is committed, and is never edited by hand.
proto: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m grpc_tools.protoc -I proto \
	  --python_out=. --mypy_out=. --grpc_python_out=. --mypy_grpc_out=. $(PROTOS)

# proto-bundle/ is the contract for other languages: our protos plus the
# google.rpc and google.protobuf files they need (its README says whence).
proto-bundle: $(STAMP)
	$(PY) proto/bundle.py proto-bundle

proto-check: proto proto-bundle
	@git diff --exit-code -- pqueue/v1 proto-bundle || { echo "generated code is stale: run 'make proto proto-bundle' and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- pqueue/v1 proto-bundle)" || { git status --porcelain -- pqueue/v1 proto-bundle; echo "generated code is not committed: run 'make proto proto-bundle' and commit"; exit 1; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(VENV)/bin/pytest

# The dashboard's screenshots in docs/img/ (docs/web.md shows them), taken by
# its browser test in headless Chromium (Debian packages chromium, chromium-driver).
screenshots: $(STAMP)
	PQ_SCREENSHOTS=docs/img PQ_TEST_REQUIRE_BROWSER=1 $(VENV)/bin/pytest -q tests/integration/test_web_dashboard.py

# A local cluster (3 nodes; NODES=5 for five) on SQLite under .cluster/, or
# with STORE=postgres on the PostgreSQL at PG_DSN (schemas pq_n1, pq_n2, ...).
NODES ?= 3
STORE ?= sqlite
PG_DSN ?= postgresql://postgres@127.0.0.1:5432/test
cluster: $(STAMP)
	$(VENV)/bin/pq dev-cluster --dir .cluster --nodes $(NODES) \
	  $(if $(filter postgres postgresql,$(STORE)),--store $(PG_DSN))

# End to end as users run it (Client.enqueue, Worker), through the balancer and
# direct, beside PostgreSQL SKIP LOCKED and NATS JetStream R3 (bench/run.py):
# a table, a JSON and a PNG under bench/out/. ARGS="--quick" (or make
# bench-quick) for a smoke run; ARGS="-o json", ARGS="--before FILE.json": --help.
# The tree before issue 15 (BEFORE, from this checkout's history) runs its
# single-job cells here first, for the CPU target; BEFORE= leaves it out.
BEFORE ?= 891eb5c7b4d373ad8847511eec63ba2374e23c0c
bench: $(STAMP)
	$(PY) -m bench.run $(if $(BEFORE),--before-commit $(BEFORE)) $(ARGS)

bench-quick: $(STAMP)
	$(PY) -m bench.run --quick $(ARGS)

# A flooding tenant beside a calm one (quotas): the calm tenant's lease latency.
bench-tenants: $(STAMP)
	$(PY) -m bench.tenants

bench-shared: $(STAMP)
	$(PY) -m bench.shared

# State at scale (issue 14): one node, then 3, at 100k and 1M pending jobs:
# RSS per job, snapshots, restart after kill -9, catch-up, lease+ack at depth.
# ARGS="--scale 10m" adds 10M; ARGS="--jobs 100k -o json" and more: --help.
bench-scale: $(STAMP)
	$(PY) -m bench.scale $(ARGS)

clean:
	rm -rf $(VENV) .cluster .mypy_cache .pytest_cache .ruff_cache
