# Lever → BigQuery sync. `make demo` runs a sync from the built-in Lever simulator into a local
# BigQuery emulator; `make test` runs every test against the same local services.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
STAMP := $(VENV)/.installed
DEMO_OPPORTUNITIES ?= 100
DEMO_START_DATE ?= 2020-01-01

.PHONY: help venv build-local demo test test-unit chaos lint fmt clean build deploy bench

help:
	@echo "make demo   - sync the simulator's Lever account into a local BigQuery emulator and show what landed"
	@echo "make test   - unit and end-to-end tests (starts the emulator itself)"
	@echo "make chaos  - the whole fault-injection matrix (make test runs one seeded scenario per family)"
	@echo "make bench  - a 5,000-opportunity account synced twice (full, then incremental): requests, rate, memory"
	@echo "make lint   - formatting, clippy, and the template through cfn-lint and checkov"
	@echo "make build  - the Lambda zips (cargo lambda, arm64); make deploy - sam deploy"

$(STAMP): requirements-dev.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	# The emulator loads DuckDB's spatial extension from the PyPI package, never from the network.
	$(VENV)/bin/python -c "from duckdb_extensions import import_extension; import_extension('spatial')"
	touch $(STAMP)

venv: $(STAMP)

build-local:
	cargo build --release -p lever-sync -p lever-sim

demo: venv build-local
	@trap 'scripts/services.sh stop' EXIT; \
	set -e; \
	eval "export $$(scripts/services.sh start-bq)"; \
	eval "export $$(scripts/services.sh start-sim --opportunities $(DEMO_OPPORTUNITIES))"; \
	export LEVER_API_KEY=sim-api-key LEVER_START_DATE=$(DEMO_START_DATE) \
	  BIGQUERY_PROJECT=lever-demo BIGQUERY_DATASET=lever BIGQUERY_API_URL=$$BIGQUERY_EMULATOR_URL BIGQUERY_EMULATOR=true; \
	echo "== lever-sync check"; target/release/lever-sync check; \
	echo "== lever-sync sync (the simulator allows Lever's 10 requests/second)"; target/release/lever-sync sync; \
	echo "== what landed"; target/release/demo-report

# Numbers, not pass/fail: see tests/src/bin/lever-bench.rs. BENCH_ARGS passes options, e.g.
# BENCH_ARGS="--opportunities 1000 --children sweep".
BENCH_ARGS ?=
bench: venv
	cargo build --release -p lever-sync -p lever-sim
	@trap 'scripts/services.sh stop' EXIT; \
	set -e; \
	eval "export $$(scripts/services.sh start-bq)"; \
	target/release/lever-bench --sync-bin target/release/lever-sync $(BENCH_ARGS)

test: venv lint
	@trap 'scripts/services.sh stop' EXIT; \
	set -e; \
	eval "export $$(scripts/services.sh start-bq)"; \
	eval "export $$(scripts/services.sh start-moto)"; \
	cargo test --workspace --all-targets

# Every scenario of the fault-injection suite (tests/tests/chaos.rs); CHAOS_SEED=<n> replays a
# run's choices, CHAOS_ONLY=<text> keeps the scenarios whose name contains the text.
chaos: venv
	@trap 'scripts/services.sh stop' EXIT; \
	set -e; \
	eval "export $$(scripts/services.sh start-bq)"; \
	eval "export $$(scripts/services.sh start-moto)"; \
	CHAOS_FULL=1 cargo test -p lever-sim --test chaos -- --nocapture

test-unit:
	cargo test --workspace --lib --bins

lint: venv
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/python scripts/lint_template.py

# The Lambda functions for arm64, in target/lambda/<function>/bootstrap (the template's
# CodeUri; sam deploy zips them). cargo-lambda and zig for the cross-build come from PyPI.
BUILD_STAMP := $(VENV)/.build-tools
$(BUILD_STAMP): requirements-build.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-build.txt
	rustup target add aarch64-unknown-linux-gnu
	touch $(BUILD_STAMP)

build: $(BUILD_STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cargo lambda build --release --arm64 -p sync-table -p dispatch
	@ls -l target/lambda/*/bootstrap

# First time: make deploy DEPLOY_ARGS=--guided (asks for the parameters and saves them). The SAM
# CLI gets a virtualenv of its own: its pinned AWS libraries clash with the test tools'.
STACK ?= lever-sync
DEPLOY_VENV := .venv-deploy
$(DEPLOY_VENV)/.installed: requirements-deploy.txt
	python3 -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-deploy.txt
	touch $@

deploy: build $(DEPLOY_VENV)/.installed
	$(DEPLOY_VENV)/bin/sam deploy --template-file infra/template.yaml --stack-name $(STACK) \
	  --capabilities CAPABILITY_IAM --resolve-s3 $(DEPLOY_ARGS)

fmt:
	cargo fmt --all

clean:
	scripts/services.sh stop
	rm -rf .run
